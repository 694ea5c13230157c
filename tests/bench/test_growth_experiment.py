"""The growth experiment's own machinery: a paired stream, honest compositions, budgets and verdicts."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "growth_experiment", REPO / "bench" / "growth_experiment.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["growth_experiment"] = module
    spec.loader.exec_module(module)
    return module


gx = _load()


def _caption(msg) -> str:  # type: ignore[no-untyped-def]
    return dict(msg.headers)["caption"].decode()


def test_arms_of_a_seed_see_the_same_records_of_each_kind_whatever_their_pace() -> None:
    """Two arms spending compute at different rates get different stage mixes, but the k-th record
    of each kind is the same in both: the comparison is paired by seed."""
    fast, slow = gx.StagedStream(3), gx.StagedStream(3)
    fast_msgs = [fast.next(progress=i / 300) for i in range(300)]  # goes through all three stages
    slow_msgs = [slow.next(progress=i / 3000) for i in range(300)]  # stays in the first stage
    kinds_fast: dict[str, list[tuple[str, str, bytes]]] = {"single": [], "mosaic": [], "human": []}
    kinds_slow: dict[str, list[tuple[str, str, bytes]]] = {"single": [], "mosaic": [], "human": []}
    for msgs, kinds in ((fast_msgs, kinds_fast), (slow_msgs, kinds_slow)):
        for m in msgs:
            rid = dict(m.headers)["id"].decode()
            kind = "single" if rid.startswith("fmnist") else "mosaic" if rid.startswith("mosaic") else "human"
            kinds[kind].append((rid, _caption(m), m.value))
    assert kinds_fast["mosaic"] and kinds_fast["human"] and not kinds_slow["mosaic"]
    n = min(len(kinds_fast["single"]), len(kinds_slow["single"]))
    assert n > 50 and kinds_fast["single"][:n] == kinds_slow["single"][:n]
    other = gx.StagedStream(4)
    assert [other.next(0.0).value for _ in range(20)] != [m.value for m in slow_msgs[:20]]


def test_a_composition_caption_says_where_each_item_is() -> None:
    rng = random.Random(0)
    classes = gx._fashion("train")[2]
    for i in range(40):
        msg = gx.mosaic("train", rng, f"m{i}")
        pixels = cv2.imdecode(np.frombuffer(msg.value, np.uint8), cv2.IMREAD_GRAYSCALE)
        cells = {cell: pixels[14 * (cell // 2) :, 14 * (cell % 2) :][:14, :14] for cell in range(4)}
        filled = [cell for cell, block in cells.items() if block.any()]
        assert len(filled) == 2, "two items in two of the four cells"
        caption = _caption(msg)
        (r0, c0), (r1, c1) = divmod(filled[0], 2), divmod(filled[1], 2)
        relations = {gx._RELATION[(r0 - r1, c0 - c1)], gx._RELATION[(r1 - r0, c1 - c0)]}
        assert any(f" {rel} " in caption for rel in relations), caption
        assert caption.split()[0] in ("a", "an") and any(c in caption for c in classes)


def test_flops_to_reach_interpolates_and_says_never() -> None:
    curve = [{"flops": 10.0, "holdout_loss": 3.0}, {"flops": 20.0, "holdout_loss": 2.0}]
    assert gx.flops_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert gx.flops_to_reach(curve, 3.5) == 10.0
    assert gx.flops_to_reach(curve, 1.0) is None


def test_recall_counts_an_identical_caption_as_a_hit() -> None:
    sims = np.array([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    assert gx.recall_at_1(sims, ["a", "a", "b"]) == (1.0, 1.0)
    assert gx.recall_at_1(sims, ["a", "c", "b"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))


@pytest.mark.slow
def test_smoke_run_spends_each_arm_budget_and_writes_only_where_told(tmp_path: Path) -> None:
    out = gx.run("smoke", tmp_path, arms=("fixed_small", "grown_search", "fixed_large"))
    budget = out["meta"]["budget_flops"]
    runs = out["runs"]
    assert [r["arm"] for r in runs] == ["fixed_small", "grown_search", "fixed_large"]
    for r in runs:
        spent = r["final"]["train_flops"] + r["final"]["growth_flops"]
        # an arm stops at the first step past its budget; a growth search that began just before it
        # runs out still finishes (a smoke budget is a few searches long; the quick run records ~1%)
        assert budget <= spent < budget * 1.6, (r["arm"], spent, budget)
        assert r["final"]["train_flops"] < budget * 1.05, "training itself stops at the budget"
        assert len(r["curve"]) >= 3 and all(np.isfinite(p["holdout_loss"]) for p in r["curve"])
    grown, large = runs[1], runs[2]
    assert large["final"]["arch"] == grown["final"]["arch"], "fixed_large is the size the grown arm ends at"
    assert grown["final"]["growth_flops"] > 0, "growth work is charged to the grown arm's budget"
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"growth_experiment_smoke.{suffix}").stat().st_size > 0
    assert json.loads((tmp_path / "growth_experiment_smoke.json").read_text())["summary"]["arms"]
    with pytest.raises(SystemExit):
        gx.main(["--mode", "smoke"])  # a smoke run needs --out: it never writes bench/results
