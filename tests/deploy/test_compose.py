"""The compose example: Apache Kafka in KRaft mode, the daemon, Prometheus with monitoring/'s alert
rules, Grafana with monitoring/'s dashboard. Validated against the compose-spec schema; every file it
mounts exists; its ports, paths and environment agree with the daemon's config schema."""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from growclip_daemon.config import load_config
from tests.deploy.test_deploy_files import ROOT, _secret_env_names, _state_dir, _stop_timeout_s

COMPOSE = ROOT / "daemon" / "compose"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def test_compose_file_validates_against_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema")
    schema = json.loads(
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
        .joinpath("compose-spec.json")
        .read_text()
    )
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    # and the check bites: an unknown service key is refused
    broken = _compose()
    broken["services"]["growclip"]["stop_grace"] = "150s"
    assert list(validator.iter_errors(broken))


def _host_paths(service: dict[str, Any]) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        src, target = volume.split(":")[:2]
        if src.startswith((".", "/")):
            out.append(((COMPOSE / src).resolve(), target))
    return out


def test_every_file_the_compose_example_references_exists() -> None:
    compose = _compose()
    referenced = [p for svc in compose["services"].values() for p, _ in _host_paths(svc)]
    build = compose["services"]["growclip"]["build"]
    referenced += [
        (COMPOSE / build["context"]).resolve(),
        (COMPOSE / build["context"] / build["dockerfile"]).resolve(),
    ]
    missing = [str(p.relative_to(ROOT)) for p in referenced if not p.exists()]
    assert missing == []
    assert any("monitoring" in p.parts for p in referenced)  # Prometheus rules and Grafana from monitoring/


def test_compose_kafka_runs_kraft_and_the_daemon_config_agrees_with_it() -> None:
    compose = _compose()
    kafka = compose["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"] and "KAFKA_ZOOKEEPER_CONNECT" not in kafka
    daemon = compose["services"]["growclip"]
    mounts = dict((target, src) for src, target in _host_paths(daemon))
    args = daemon["command"]
    config_target = args[args.index("--config") + 1]
    cfg = load_config(mounts[config_target])
    advertised = dict(item.split("://") for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert cfg.kafka.bootstrap in advertised.values() and not cfg.kafka.embedded
    assert f"{cfg.serve.port}:{cfg.serve.port}" in daemon["ports"] and cfg.serve.host == "0.0.0.0"
    named = {v.split(":")[1] for v in daemon["volumes"] if not v.startswith((".", "/"))}
    assert str(_state_dir(cfg)) in named
    assert set(daemon.get("environment", {})) == _secret_env_names(cfg)
    assert float(daemon["stop_grace_period"].rstrip("s")) > _stop_timeout_s()


def test_compose_prometheus_scrapes_the_daemon_with_the_monitoring_rules(tmp_path: Path) -> None:
    compose = _compose()
    prom = compose["services"]["prometheus"]
    mounts = {target: src for src, target in _host_paths(prom)}
    config_target = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(mounts[config_target].read_text())
    daemon_cfg = load_config(COMPOSE / "growclip.yaml")
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"growclip:{daemon_cfg.serve.port}"]
    for rule_file in config["rule_files"]:  # resolved beside the config inside the container
        target = str(PurePosixPath(config_target).parent / rule_file)
        assert target in mounts and mounts[target].is_file()
    promtool = shutil.which("promtool")
    if promtool:  # the scrape config and the rules it loads, as Prometheus will read them
        shutil.copy(mounts[config_target], tmp_path / "prometheus.yml")
        for rule_file in config["rule_files"]:
            shutil.copy(mounts[str(PurePosixPath(config_target).parent / rule_file)], tmp_path / rule_file)
        result = subprocess.run(
            [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    grafana = {target: src for src, target in _host_paths(compose["services"]["grafana"])}
    provisioning = grafana["/etc/grafana/provisioning/dashboards"]
    for provider_file in provisioning.glob("*.y*ml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            folder = provider["options"]["path"]
            assert folder in grafana and any(grafana[folder].glob("*.json")), folder
