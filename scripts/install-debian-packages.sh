#!/usr/bin/env bash
# Installs, once, what the demo and the tests need from outside PyPI:
# - Debian packages: the real datasets they stream (dataset-fashion-mnist, tuxpaint-stamps-default,
#   openclipart-png), promtool (package prometheus) to check the metrics exposition, and kcat, an
#   independent Kafka client for the interoperability tests; systemd-analyze (package systemd) to
#   verify the service unit in daemon/systemd;
# - the npm dataset emoji-datasource-twitter, project-locally under .datasets/npm
#   (GROWCLIP_NPM_PREFIX overrides where), pinned to one version.
# Idempotent: it checks files first and installs only what is missing, so when everything is
# present it returns at once (it runs at every `make test` and `make run`).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
npm_prefix="${GROWCLIP_NPM_PREFIX:-$repo/.datasets/npm}"
emoji_package="emoji-datasource-twitter@16.0.0"
emoji_stamp="$npm_prefix/.installed-$emoji_package"

need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/tuxpaint/stamps/animals/birds/crow.txt ] || need+=(tuxpaint-stamps-default)
[ -d /usr/share/openclipart/png/animals ] || need+=(openclipart-png)
command -v promtool >/dev/null || need+=(prometheus)
command -v kcat >/dev/null || need+=(kcat)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ! -f "$emoji_stamp" ] && ! command -v npm >/dev/null; then
    need+=(npm)
fi

if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    # --no-install-recommends: tuxpaint-stamps-default would otherwise pull in Tux Paint itself
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if [ ! -f "$emoji_stamp" ]; then
    echo "installing npm package $emoji_package into $npm_prefix"
    mkdir -p "$npm_prefix"
    # the folder ignores itself, so that git never sees the installed dataset
    [ -f "$npm_prefix/.gitignore" ] || printf '*\n' >"$npm_prefix/.gitignore"
    npm install --prefix "$npm_prefix" --no-save --no-audit --no-fund --no-package-lock \
        --loglevel=error "$emoji_package"
    test -f "$npm_prefix/node_modules/emoji-datasource-twitter/emoji.json"
    touch "$emoji_stamp"  # last: an interrupted install is redone
fi
