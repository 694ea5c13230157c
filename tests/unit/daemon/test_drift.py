"""Embedding drift: the comparison measures, and the monitor that runs them off the training thread."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from growclip_daemon.drift import DriftMonitor, Probes, compare
from growclip_daemon.metrics import Metrics
from growclip_stream.data.records import RecordLimits
from growclip_stream.serving import ModelSnapshot, SnapshotStore
from tests.helpers import random_model, tiny_arch


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_compare_identical_rotated_and_unrelated_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    emb = unit(torch.randn(64, 16, generator=g))
    same = compare(emb, emb.clone())
    assert same == {"mean_cosine": pytest.approx(1.0), "neighbour_overlap_at_10": 1.0}

    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    rotated = compare(emb @ rotation, emb)  # every vector moved, every neighbourhood kept
    assert rotated["neighbour_overlap_at_10"] == pytest.approx(1.0)
    assert rotated["mean_cosine"] < 0.5

    unrelated = compare(unit(torch.randn(64, 16, generator=g)), emb)
    assert abs(unrelated["mean_cosine"]) < 0.2
    assert unrelated["neighbour_overlap_at_10"] < 0.35  # chance is 10/63


def snapshot(generation: int, step: int, seed: int) -> ModelSnapshot:
    return ModelSnapshot.capture(
        random_model(tiny_arch(), seed=seed),
        generation=generation,
        step=step,
        samples_trained=0,
        growth_history=[],
    )


@pytest.fixture(scope="module")
def probes() -> Probes:
    return Probes.from_dataset("fashion-mnist", 48)


def test_probes_are_the_reserved_test_split(probes: Probes) -> None:
    assert len(probes.images) == len(probes.texts) == 48
    assert probes == Probes.from_dataset("fashion-mnist", 48)  # fixed: the same for every version


def test_monitor_measures_each_new_generation_against_previous_and_oldest(probes: Probes) -> None:
    store, metrics = SnapshotStore(keep_versions=2), Metrics()
    monitor = DriftMonitor(store, metrics, probes, RecordLimits(), interval_s=3600)
    measured_on: list[str] = []
    original = monitor._measure

    def measure(snap: ModelSnapshot) -> None:
        measured_on.append(threading.current_thread().name)
        original(snap)

    monitor._measure = measure  # type: ignore[method-assign]
    monitor.start()
    try:
        gen0, gen1, gen2 = snapshot(0, 10, seed=0), snapshot(1, 20, seed=1), snapshot(2, 30, seed=2)
        for snap in (gen0, gen1, gen2):
            store.publish(snap)
            monitor.notify(snap)
            assert monitor.wait_measured(snap.version, 60), monitor.status()
            if snap is gen0:
                first = monitor.status()["latest"]
                assert first["against_previous"] is None
                assert first["against_oldest"]["image"]["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
        status = monitor.status()
    finally:
        monitor.stop()
    assert set(measured_on) == {"drift"}  # never on the publishing (training) thread
    latest = status["latest"]
    assert latest["version"] == "2.30"
    assert latest["against_previous"]["version"] == "1.20" and latest["against_previous"]["generations"] == 1
    assert latest["against_oldest"]["version"] == "1.20"  # keep_versions=2: generation 0 is gone
    for modality in ("image", "text"):
        moved = latest["against_previous"][modality]
        assert moved["mean_cosine"] < 0.99 and 0 <= moved["neighbour_overlap_at_10"] <= 1
    assert set(status["by_generation"]) == {"1", "2"}
    assert status["by_generation"]["2"] == latest["against_previous"]
    r = metrics.registry
    cos = r.get_sample_value(
        "growclip_embedding_drift_mean_cosine", {"modality": "text", "against": "previous"}
    )
    assert cos == latest["against_previous"]["text"]["mean_cosine"]
    overlap = r.get_sample_value(
        "growclip_embedding_drift_neighbour_overlap_ratio", {"modality": "image", "against": "oldest"}
    )
    assert overlap is not None and not math.isnan(overlap)
    assert r.get_sample_value("growclip_embedding_drift_generations", {"against": "previous"}) == 1


def test_within_a_generation_drift_waits_for_the_interval(probes: Probes) -> None:
    store, metrics = SnapshotStore(), Metrics()
    monitor = DriftMonitor(store, metrics, probes, RecordLimits(), interval_s=0.5)
    monitor.start()
    try:
        a, b = snapshot(0, 10, seed=0), snapshot(0, 20, seed=3)
        store.publish(a)
        monitor.notify(a)
        assert monitor.wait_measured("0.10", 60)
        store.publish(b)
        monitor.notify(b)  # same generation: measured once the interval has passed
        assert monitor.wait_measured("0.20", 60)
        assert monitor.measurements == 2
    finally:
        monitor.stop()
