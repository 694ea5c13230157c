"""docs/operations.md stays true: it explains every alert the rules define, and the repository files
it names exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "operations.md").read_text()


def test_every_alert_rule_is_explained() -> None:
    rules = yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    rows = {m.group(1) for m in re.finditer(r"^\| `(\w+)`", DOC, re.MULTILINE)}
    assert [a for a in alerts if a not in rows] == []


def test_repository_files_it_names_exist() -> None:
    named = set(re.findall(r"`((?:daemon|configs|monitoring|docs|bench)/[\w./-]+|Dockerfile)`", DOC))
    assert {"Dockerfile", "configs/kafka.yaml", "monitoring/alerts.yml"} <= named
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
