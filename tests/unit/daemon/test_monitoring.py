"""monitoring/: the Prometheus config and alert rules pass promtool, every alert has a rule test, and
every series the dashboard and the alerts query is one the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from growclip_daemon.metrics import Metrics

ROOT = Path(__file__).resolve().parents[3]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "growclip.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")

# Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan",
}  # fmt: skip


def exported_series() -> set[str]:
    """Every series name the daemon's registry can export: counters with _total, histograms with
    _bucket/_count/_sum, from the exposition's TYPE lines (so unlabelled-yet families count too)."""
    text = generate_latest(Metrics().registry).decode()
    names: set[str] = set()
    for line in text.splitlines():
        if m := re.match(r"^# TYPE (\S+) (\S+)$", line):
            name, kind = m.groups()
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            else:
                names.add(name)
    return names


def series_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or durations)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)  # dashboard variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m.group(0)
        if expr[m.end() :].lstrip().startswith("("):  # a function call
            continue
        if word.lower() in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]?", word):
            continue
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # the exponent or unit of a number (1e3, 2^30)
        names.add(word)
    return names


def dashboard_exprs(node: Any) -> list[str]:
    """Every query in the dashboard JSON: panel targets and annotations (``expr``) and the
    templating's ``label_values(<series>, <label>)`` (its series)."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "definition" and isinstance(value, str):
                m = re.fullmatch(r"label_values\((.*),\s*\w+\)", value.strip())
                assert m, value
                found.append(m.group(1))
            else:
                found += dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            found += dashboard_exprs(item)
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_series_in_parses_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, route) (rate(growclip_http_request_duration_seconds_bucket"
        '{route="/v1/embeddings",instance=~"$instance"}[5m]))) > 1 and on() process_open_fds / 2^30 '
        "unless time() - growclip_checkpoint_last_success_timestamp_seconds > 1e3"
    )
    assert series_in(expr) == {
        "growclip_http_request_duration_seconds_bucket",
        "process_open_fds",
        "growclip_checkpoint_last_success_timestamp_seconds",
    }


def test_the_dashboard_queries_only_exported_series() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 30
    queried = set().union(*(series_in(e) for e in exprs))
    unknown = queried - exported_series() - PROMETHEUS_SERIES
    assert not unknown, unknown
    # It covers what an operator watches: training, growth, ingest, serving, evaluation, drift.
    for needed in (
        "growclip_train_samples_total",
        "growclip_model_generation",
        "growclip_kafka_consumer_lag_records",
        "growclip_http_request_duration_seconds_bucket",
        "growclip_serve_batch_size_bucket",
        "growclip_eval_zeroshot_top1_ratio",
        "growclip_embedding_drift_mean_cosine",
        "growclip_model_parameters",
    ):
        assert needed in queried, needed
    annotations = [a["expr"] for a in dashboard["annotations"]["list"]]
    assert any("growclip_model_generation" in a for a in annotations)  # growths on the timeline


def test_the_alerts_query_only_exported_series() -> None:
    exported = exported_series() | PROMETHEUS_SERIES
    for rule in alert_rules():
        unknown = series_in(rule["expr"]) - exported
        assert not unknown, (rule["alert"], unknown)


def test_every_alert_has_a_rule_test() -> None:
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    tested = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a test that expects it to fire
    }
    assert {rule["alert"] for rule in alert_rules()} <= tested


@needs_promtool
def test_promtool_check_config() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", "prometheus.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts_test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
