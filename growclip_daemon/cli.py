"""`growclip-daemon`: start, stop, status, produce."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from growclip_daemon.config import ConfigError, DaemonConfig, load_config

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Online, self-growing CLIP training and serving."
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable).")
]


def _config(config: Path | None, overrides: list[str] | None) -> DaemonConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def start(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT, then stop cleanly."""
    from growclip_daemon.engine import Daemon
    from growclip_daemon.logs import setup_logging

    cfg = _config(config, set_)
    setup_logging(cfg.log_level, cfg.log_format)
    raise typer.Exit(Daemon(cfg).run())


@app.command()
def stop(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean exit.")] = 120.0,
) -> None:
    """Signal a running daemon (through its pidfile) and wait for its clean exit."""
    cfg = _config(config, set_)
    try:
        pid = int(cfg.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        typer.echo(f"no running daemon (no pidfile at {cfg.pidfile})", err=True)
        raise typer.Exit(1) from None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        typer.echo(f"daemon {pid} is not running; removing stale pidfile", err=True)
        cfg.pidfile.unlink(missing_ok=True)
        raise typer.Exit(1) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            typer.echo(f"daemon {pid} stopped")
            return
        time.sleep(0.2)
    typer.echo(f"daemon {pid} did not stop within {timeout:.0f}s", err=True)
    raise typer.Exit(1)


@app.command()
def status(
    url: Annotated[str, typer.Option(help="Base URL of the daemon's HTTP API.")] = "http://127.0.0.1:8080",
) -> None:
    """Print the daemon's state as JSON: model, growth history, training, source positions and lag."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}/v1/model", timeout=10)
    except httpx.HTTPError as err:
        typer.echo(f"error: cannot reach {url}: {err}", err=True)
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        typer.echo(f"error: {url} answered {resp.status_code}: {resp.text}", err=True)
        raise typer.Exit(1)
    json.dump(resp.json(), sys.stdout, indent=2)
    sys.stdout.write("\n")


@app.command()
def produce(
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap HOST:PORT.")],
    topic: Annotated[str, typer.Option(help="Topic to publish to (created if missing).")],
    dataset: Annotated[str, typer.Option(help="Dataset name, e.g. fashion-mnist.")],
    limit: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
    rate: Annotated[
        float | None, typer.Option(help="Records per second (default: as fast as possible).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="json or binary.")] = "json",
    split: Annotated[
        str, typer.Option(help="Dataset split; the test split is reserved for evaluation.")
    ] = "train",
    repeat: Annotated[bool, typer.Option(help="Loop over the dataset forever (ids stay unique).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the caption choice.")] = 0,
) -> None:
    """Publish image-text records to Kafka (demos, tests, backfills)."""
    from growclip_stream.data.datasets import DATASETS, iter_records
    from growclip_stream.data.produce import ensure_topics
    from growclip_stream.data.produce import produce as produce_records

    if dataset not in DATASETS:
        typer.echo(f"error: unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}", err=True)
        raise typer.Exit(2)
    if format not in ("json", "binary"):
        typer.echo(f"error: --format must be json or binary, not {format!r}", err=True)
        raise typer.Exit(2)
    if split not in ("train", "test"):
        typer.echo(f"error: --split must be train or test, not {split!r}", err=True)
        raise typer.Exit(2)
    ensure_topics(bootstrap, [topic, f"{topic}.dlq"])
    records = iter_records(dataset, split=split, seed=seed, repeat=repeat)  # type: ignore[arg-type]
    sent = produce_records(bootstrap, topic, records, fmt=format, rate=rate, limit=limit)  # type: ignore[arg-type]
    typer.echo(json.dumps({"topic": topic, "records": sent}))


if __name__ == "__main__":
    app()
