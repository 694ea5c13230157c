"""The metric families: own registry, names that follow Prometheus conventions, model series."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

import pytest
import torch
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from growclip_daemon.metrics import GROWTH_PHASES, Metrics
from growclip_stream.evaluation import SuiteResult
from growclip_stream.model.clip import ArchConfig, GrowCLIP, TowerConfig
from growclip_stream.serving import ModelSnapshot

EXPECTED_FAMILIES = {
    # name in the exposition (counters with _total): type
    "growclip_train_samples_total": "counter",
    "growclip_train_steps_total": "counter",
    "growclip_train_loss": "gauge",
    "growclip_train_step_duration_seconds": "histogram",
    "growclip_train_samples_per_second": "gauge",
    "growclip_train_data_wait_duration_seconds": "histogram",
    "growclip_eval_holdout_loss": "gauge",
    "growclip_eval_zeroshot_top1_ratio": "gauge",
    "growclip_eval_retrieval_recall_ratio": "gauge",
    "growclip_model_generation": "gauge",
    "growclip_model_step": "gauge",
    "growclip_model_published_timestamp_seconds": "gauge",
    "growclip_model_parameters": "gauge",
    "growclip_model_flops_per_sample": "gauge",
    "growclip_growth_events_total": "counter",
    "growclip_growth_phase": "gauge",
    "growclip_growth_failures_total": "counter",
    "growclip_growth_last_duration_seconds": "gauge",
    "growclip_growth_declined_total": "counter",
    "growclip_growth_search_seconds": "gauge",
    "growclip_growth_search_flops": "gauge",
    "growclip_growth_search_fraction": "gauge",
    "growclip_ingest_records_total": "counter",
    "growclip_ingest_decode_worker_deaths_total": "counter",
    "growclip_ingest_decode_stalls_total": "counter",
    "growclip_kafka_consumer_lag_records": "gauge",
    "growclip_checkpoint_duration_seconds": "histogram",
    "growclip_checkpoint_stall_seconds": "histogram",
    "growclip_checkpoint_last_success_timestamp_seconds": "gauge",
    "growclip_checkpoint_failures_total": "counter",
    "growclip_http_requests_total": "counter",
    "growclip_http_request_duration_seconds": "histogram",
    "growclip_http_requests_in_flight": "gauge",
    "growclip_serve_batch_size": "histogram",
    "growclip_serve_queue_wait_seconds": "histogram",
    "growclip_serve_queue_items": "gauge",
    "growclip_serve_rejected_requests_total": "counter",
    "growclip_serve_versions_held": "gauge",
    "growclip_shard_source_lag_records": "gauge",
    "growclip_dead_letter_write_failures_total": "counter",
    "growclip_embedding_drift_mean_cosine": "gauge",
    "growclip_embedding_drift_neighbour_overlap_ratio": "gauge",
    "growclip_embedding_drift_generations": "gauge",
    "growclip_embedding_drift_computed_timestamp_seconds": "gauge",
}
STANDARD_FAMILIES = {
    # prometheus_client's process, GC and platform collectors
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "python_gc_collections_total": "counter",
    "python_gc_objects_collected_total": "counter",
    "python_info": "gauge",
}

# The naming rules `promtool check metrics` applies (client_golang's promlint), on the text format.
_TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$")
_HELP_LINE = re.compile(r"^# HELP (\S+) (.*)$")
_NON_BASE_UNITS = (
    "milliseconds",
    "microseconds",
    "nanoseconds",
    "minutes",
    "hours",
    "days",
    "kilobytes",
    "megabytes",
)
_ABBREVIATIONS = ("sec", "secs", "ms", "us", "ns", "min", "mins", "hr", "hrs", "kb", "mb", "gb", "pct")
_TYPE_WORDS = ("counter", "gauge", "histogram", "summary", "untyped")


def lint(exposition: str) -> list[str]:
    problems = []
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    for line in exposition.splitlines():
        if m := _TYPE_LINE.match(line):
            types[m.group(1)] = m.group(2)
        elif m := _HELP_LINE.match(line):
            helps[m.group(1)] = m.group(2)
        elif line and not line.startswith("#"):
            labels = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=\"", line)
            problems += [f"{line}: camelCase label {lab}" for lab in labels if lab != lab.lower()]
    for name, kind in types.items():
        words = name.split("_")
        if not helps.get(name, "").strip():
            problems.append(f"{name}: no help text")
        if kind == "counter" and not name.endswith("_total"):
            problems.append(f"{name}: counter without _total")
        if kind != "counter" and name.endswith("_total"):
            problems.append(f"{name}: non-counter ending in _total")
        if kind not in ("histogram", "summary") and re.search(r"_(bucket|count|sum)$", name):
            problems.append(f"{name}: reserved histogram suffix")
        if ":" in name or name != name.lower():
            problems.append(f"{name}: not snake_case")
        problems += [f"{name}: non-base unit {w}" for w in words if w in _NON_BASE_UNITS]
        problems += [f"{name}: abbreviated unit {w}" for w in words if w in _ABBREVIATIONS]
        problems += [f"{name}: type {w} in name" for w in words if w in _TYPE_WORDS]
    return problems


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode("utf-8")


def test_every_family_is_exported_with_its_type() -> None:
    text = exposition(Metrics())
    types = {m.group(1): m.group(2) for m in map(_TYPE_LINE.match, text.splitlines()) if m}
    for name, kind in EXPECTED_FAMILIES.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    for name, kind in STANDARD_FAMILIES.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)}"
    ours = {name for name in types if name.startswith("growclip_") and not name.endswith("_created")}
    assert all(name.startswith(("growclip_", "process_", "python_")) for name in types)
    assert ours == set(EXPECTED_FAMILIES), ours ^ set(EXPECTED_FAMILIES)


def test_names_follow_prometheus_conventions() -> None:
    m = Metrics()
    # Fill every labelled family so its samples are linted too.
    m.ingest_records.labels(source="kafka", status="trained").inc()
    m.kafka_lag.labels(topic="pairs", partition="0").set(3)
    m.http_requests.labels(route="/v1/embeddings", method="POST", code="200").inc()
    m.http_latency.labels(route="/v1/embeddings").observe(0.01)
    fill_evaluation(m)
    assert lint(exposition(m)) == []


def test_the_linter_catches_bad_names() -> None:
    bad = "\n".join(
        [
            "# HELP x_requests Requests.",
            "# TYPE x_requests counter",
            "# HELP x_latency_milliseconds",
            "# TYPE x_latency_milliseconds gauge",
            "# HELP x_errors_total Errors.",
            "# TYPE x_errors_total gauge",
        ]
    )
    problems = lint(bad)
    assert any("counter without _total" in p for p in problems)
    assert any("no help text" in p for p in problems)
    assert any("non-base unit" in p for p in problems)
    assert any("non-counter ending in _total" in p for p in problems)


def fill_evaluation(m: Metrics) -> None:
    """The evaluation series as the evaluator sets them."""
    m.set_evaluation("fashion-mnist", SuiteResult("zeroshot", 1000, 10, 0, 0.5, top1=0.4))
    recall = {d: {1: 0.1, 5: 0.3, 10: 0.5} for d in ("image_to_text", "text_to_image")}
    m.set_evaluation("tuxpaint", SuiteResult("retrieval", 76, 74, 0, 0.2, recall=recall))


def test_set_evaluation_exports_every_suite_direction_and_k() -> None:
    m = Metrics()
    fill_evaluation(m)
    r = m.registry
    assert r.get_sample_value("growclip_eval_zeroshot_top1_ratio", {"suite": "fashion-mnist"}) == 0.4
    assert r.get_sample_value("growclip_eval_zeroshot_top1_ratio", {"suite": "tuxpaint"}) is None
    families = {f.name: f for f in text_string_to_metric_families(exposition(m))}
    recall = {
        (s.labels["suite"], s.labels["direction"], s.labels["k"]): s.value
        for s in families["growclip_eval_retrieval_recall_ratio"].samples
    }
    assert recall == {
        ("tuxpaint", d, k): v
        for d in ("image_to_text", "text_to_image")
        for k, v in (("1", 0.1), ("5", 0.3), ("10", 0.5))
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed here")
def test_promtool_check_metrics_is_clean() -> None:
    m = Metrics()
    m.http_requests.labels(route="/healthz", method="GET", code="200").inc()
    fill_evaluation(m)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition(m), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_own_registry_and_no_clash() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    assert a.registry is not b.registry and a.registry is not REGISTRY
    a.train_samples.inc(128)
    assert b.registry.get_sample_value("growclip_train_samples_total") == 0
    assert a.registry.get_sample_value("growclip_train_samples_total") == 128
    assert REGISTRY.get_sample_value("growclip_train_samples_total") is None


def test_initial_values() -> None:
    m = Metrics()
    r = m.registry
    assert math.isnan(r.get_sample_value("growclip_train_loss"))  # type: ignore[arg-type]
    assert math.isnan(r.get_sample_value("growclip_eval_holdout_loss"))  # type: ignore[arg-type]
    assert r.get_sample_value("growclip_growth_phase", {"growclip_growth_phase": GROWTH_PHASES[0]}) == 1
    assert r.get_sample_value("growclip_growth_events_total", {"trigger": "plateau"}) == 0
    m.growth_phase.state("training_supernet")
    assert r.get_sample_value("growclip_growth_phase", {"growclip_growth_phase": "idle"}) == 0
    assert r.get_sample_value("growclip_growth_phase", {"growclip_growth_phase": "training_supernet"}) == 1


def test_set_model_publishes_generation_parameters_and_flops() -> None:
    arch = ArchConfig(
        image=TowerConfig(width=32, depth=1, mlp_hidden=64),
        text=TowerConfig(width=16, depth=2, mlp_hidden=32),
        shared=TowerConfig(width=32, depth=0, mlp_hidden=64),
        embed_dim=16,
    )
    torch.manual_seed(0)
    snap = ModelSnapshot.capture(GrowCLIP(arch), generation=3, step=900, samples_trained=5, growth_history=[])
    m = Metrics()
    m.set_model(snap)
    r = m.registry
    assert r.get_sample_value("growclip_model_generation") == 3
    assert r.get_sample_value("growclip_model_step") == 900
    assert r.get_sample_value("growclip_model_published_timestamp_seconds") == snap.published_at
    assert r.get_sample_value("growclip_model_flops_per_sample") == arch.flops_per_sample()
    by_tower = {
        t: r.get_sample_value("growclip_model_parameters", {"tower": t}) for t in snap.parameters_by_tower()
    }
    assert by_tower == {t: float(n) for t, n in snap.parameters_by_tower().items()}
    assert by_tower["total"] == arch.num_params()

    families = {f.name: f for f in text_string_to_metric_families(exposition(m))}
    assert {s.labels["tower"] for s in families["growclip_model_parameters"].samples} == {
        "image",
        "text",
        "shared",
        "total",
    }


def test_growth_decisions_and_search_work_are_exported() -> None:
    from growclip_daemon.observer import MetricsObserver
    from growclip_stream.growth.budget import WorkLedger
    from growclip_stream.growth.controller import GrowthEvent

    metrics = Metrics()
    observer = MetricsObserver(metrics, "kafka")
    work = WorkLedger(train_seconds=90.0, train_flops=9e12, growth_seconds=10.0, growth_flops=1e12)
    arch = {"image": {}}

    def event(outcome: str) -> GrowthEvent:
        return GrowthEvent(
            generation=1, step=10, samples=100, trigger="data_volume", ops=(), reason="", candidates=(),
            params_before=1, params_after=1, flops_before=1, flops_after=1, arch_after=arch, duration_s=2.0,
            finished_at=0.0, outcome=outcome, work=work.to_dict(),
        )  # fmt: skip

    for outcome in ("grown", "declined", "declined", "rolled_back"):
        observer.on_growth(event(outcome))
    r = metrics.registry
    assert r.get_sample_value("growclip_growth_events_total", {"trigger": "data_volume"}) == 1
    assert r.get_sample_value("growclip_growth_declined_total") == 2
    assert r.get_sample_value("growclip_growth_failures_total", {"outcome": "rolled_back"}) == 1
    assert r.get_sample_value("growclip_growth_search_seconds") == 10.0
    assert r.get_sample_value("growclip_growth_search_flops") == 1e12
    assert r.get_sample_value("growclip_growth_search_fraction", {"basis": "wall"}) == 0.1
    assert r.get_sample_value("growclip_growth_search_fraction", {"basis": "flops"}) == 0.1


def test_data_wait_is_observed_per_step() -> None:
    from growclip_daemon.observer import MetricsObserver
    from growclip_stream.train.trainer import StepStats

    m = Metrics()
    observer = MetricsObserver(m, source_label="kafka")
    for wait in (0.02, 3.0, 0.0):
        observer.on_step(StepStats(1, 1.0, 1e-3, 0.1, 8, 8), data_wait_s=wait)
    r = m.registry
    name = "growclip_train_data_wait_duration_seconds"
    assert r.get_sample_value(f"{name}_count") == 3
    assert r.get_sample_value(f"{name}_sum") == pytest.approx(3.02)
    assert r.get_sample_value(f"{name}_bucket", {"le": "0.0"}) == 1  # steps that found a batch ready
    assert r.get_sample_value(f"{name}_bucket", {"le": "0.025"}) == 2
