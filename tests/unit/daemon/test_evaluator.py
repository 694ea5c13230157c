"""The evaluator service: it evaluates published snapshots in its own thread, on its cadence, into
the metrics and /v1/model; a suite without data is reported, the rest carries on."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from growclip_daemon.config import EvaluationSettings, load_config
from growclip_daemon.engine import Daemon
from growclip_daemon.evaluator import EvaluatorService
from growclip_daemon.metrics import Metrics
from growclip_stream.data.records import RecordLimits
from growclip_stream.evaluation import SuiteConfig, decode_suite, evaluate, read_suite
from growclip_stream.model import GrowCLIP
from growclip_stream.serving import ModelSnapshot, SnapshotStore
from tests.helpers import random_model, tiny_arch

ARCH = tiny_arch()
FMNIST = SuiteConfig(task="zeroshot", dataset="fashion-mnist", limit=60)
EMOJI = SuiteConfig(task="retrieval", dataset="emoji", limit=30)


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def snapshot(model: GrowCLIP, generation: int, step: int) -> ModelSnapshot:
    return ModelSnapshot.capture(
        model, generation=generation, step=step, samples_trained=step, growth_history=[]
    )


@pytest.fixture(scope="module")
def model() -> GrowCLIP:
    return random_model(ARCH, seed=11)


def running(settings: EvaluationSettings, store: SnapshotStore, metrics: Metrics) -> EvaluatorService:
    service = EvaluatorService(settings, store, metrics, geometry=(ARCH.image_size, ARCH.channels))
    service.start()
    return service


@pytest.fixture
def store() -> SnapshotStore:
    return SnapshotStore()


def test_evaluates_a_publish_in_its_own_thread_into_the_metrics(
    model: GrowCLIP, store: SnapshotStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="growclip_daemon.evaluator")
    metrics = Metrics()
    threads_before = torch.get_num_threads()
    service = running(EvaluationSettings(suites={"fashion-mnist": FMNIST, "emoji": EMOJI}), store, metrics)
    try:
        snap = snapshot(model, generation=0, step=10)
        store.publish(snap)
        service.notify()  # returns at once; the work happens in the evaluator's thread
        wait_for(lambda: service.rounds >= 1, "an evaluation")
        latest = service.latest()
    finally:
        service.stop()
    assert not service.alive

    # the numbers are the library's on the same snapshot, and carry its version
    expected = {
        name: evaluate(snap.model, cfg, decode_suite(read_suite(cfg), 28, 1, RecordLimits()))
        for name, cfg in (("fashion-mnist", FMNIST), ("emoji", EMOJI))
    }
    assert latest["fashion-mnist"]["model_version"] == "0.10" and latest["emoji"]["step"] == 10
    assert latest["fashion-mnist"]["top1"] == expected["fashion-mnist"].top1
    assert latest["emoji"]["recall"]["text_to_image"]["5"] == expected["emoji"].recall["text_to_image"][5]

    r = metrics.registry
    top1 = r.get_sample_value("growclip_eval_zeroshot_top1_ratio", {"suite": "fashion-mnist"})
    assert top1 == expected["fashion-mnist"].top1
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            labels = {"suite": "emoji", "direction": direction, "k": str(k)}
            value = r.get_sample_value("growclip_eval_retrieval_recall_ratio", labels)
            assert value == expected["emoji"].recall[direction][k]

    # off the caller's thread, with one intra-op thread there and none taken from anyone else
    logged = [rec for rec in caplog.records if rec.getMessage() == "evaluation"]
    assert {rec.threadName for rec in logged} == {"evaluator"} and len(logged) == 2
    assert service.threads == 1 and torch.get_num_threads() == threads_before
    late: list[int] = []
    thread = threading.Thread(target=lambda: late.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert late == [threads_before]


def test_every_n_steps_and_after_every_growth(model: GrowCLIP, store: SnapshotStore) -> None:
    service = running(EvaluationSettings(every_steps=50, suites={"fashion-mnist": FMNIST}), store, Metrics())

    def publish(generation: int, step: int) -> None:
        store.publish(snapshot(model, generation, step))
        service.notify()

    def evaluated(version: str, rounds: int) -> bool:
        """The round that evaluated ``version`` is complete, and it was round ``rounds`` or later."""
        done = service.rounds >= rounds  # read first: a round's results are in before it counts
        return done and service.latest()["fashion-mnist"]["model_version"] == version

    try:
        publish(0, 10)
        wait_for(lambda: evaluated("0.10", 1), "the first snapshot's evaluation")
        publish(0, 30)  # 20 steps on: not due
        publish(1, 35)  # a growth: due at once
        wait_for(lambda: evaluated("1.35", 2), "the grown model's evaluation")
        assert service.rounds == 2
        publish(1, 60)  # 25 steps after the last evaluated: not due
        publish(1, 90)  # 55 steps after: due
        wait_for(lambda: evaluated("1.90", 3), "the evaluation 50 steps on")
        assert service.rounds == 3  # 0.30 and 1.60 were never evaluated
        by_generation = service.status()["evaluation"]["by_generation"]
    finally:
        service.stop()
    # each generation's first evaluation, the one right after its growth, is kept
    assert {g: r["fashion-mnist"]["model_version"] for g, r in by_generation.items()} == {
        "0": "0.10",
        "1": "1.35",
    }


def test_a_suite_without_data_is_reported_and_the_others_evaluated(
    model: GrowCLIP, store: SnapshotStore, tmp_path: Path
) -> None:
    missing = SuiteConfig(task="zeroshot", folder=str(tmp_path / "not-there"))
    settings = EvaluationSettings(suites={"mine": missing, "fashion-mnist": FMNIST})
    service = running(settings, store, Metrics())
    try:
        store.publish(snapshot(model, 0, 1))
        service.notify()
        wait_for(lambda: service.rounds >= 1, "an evaluation")
        status = service.status()["evaluation"]
        assert service.alive
    finally:
        service.stop()
    assert "not-there" in status["errors"]["mine"] and status["errors"]["mine"].startswith("load:")
    assert set(status["suites"]) == {"fashion-mnist"}
    assert status["suites"]["fashion-mnist"]["model_version"] == "0.1"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """The daemon's own service tree built from a config; only HTTP and the evaluator run."""
    cfg = load_config(
        None,
        [
            "serve.port=0",
            f"pidfile={tmp_path / 'daemon.pid'}",
            f"checkpoint.root={tmp_path / 'ckpt'}",
            "evaluation.suites.fashion-mnist.limit=50",
            "evaluation.suites.tuxpaint.limit=20",
            "evaluation.suites.emoji.enabled=false",
        ],
    )
    d = Daemon(cfg)
    assert d.evaluator is not None
    d.http.start()
    d.evaluator.start()
    try:
        yield d
    finally:
        d.evaluator.stop()
        d.http.stop()


def test_a_training_publish_reaches_the_evaluator_and_v1_model(daemon: Daemon) -> None:
    model = random_model(daemon.cfg.model, seed=2)
    growth = [{"generation": 1, "trigger": "forced"}]
    daemon.training.publish(model, generation=1, step=7, samples_trained=700, growth_history=growth)
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.http.server.port}", timeout=30) as client:

        def evaluated() -> dict[str, Any] | None:
            answer = client.get("/v1/model").json()
            done = answer["evaluation"]["rounds"] >= 1  # the whole round, growth history included
            return answer if done else None

        answer = wait_for(evaluated, "/v1/model to show the evaluation")
        metrics = client.get("/metrics").text
    suites = answer["evaluation"]["suites"]
    assert suites.keys() == {"fashion-mnist", "tuxpaint"}
    version = f"1.7.{daemon.training.run_id}"  # generation.step.run
    assert {s["model_version"] for s in suites.values()} == {version} == {answer["version"]}
    assert suites["fashion-mnist"]["task"] == "zeroshot" and 0 <= suites["fashion-mnist"]["top1"] <= 1
    assert set(suites["tuxpaint"]["recall"]) == {"image_to_text", "text_to_image"}
    assert answer["evaluation"]["errors"] == {} and answer["training"] == {"state": "starting"}
    # the growth that made generation 1 shows the evaluation right after it
    assert (
        answer["growth_history"][0]["evaluation"]["fashion-mnist"]["top1"] == suites["fashion-mnist"]["top1"]
    )
    assert 'growclip_eval_zeroshot_top1_ratio{suite="fashion-mnist"}' in metrics
    assert (
        'growclip_eval_retrieval_recall_ratio{direction="text_to_image",k="10",suite="tuxpaint"}' in metrics
    )


def test_evaluation_can_be_turned_off(tmp_path: Path) -> None:
    cfg = load_config(None, ["evaluation.enabled=false", f"checkpoint.root={tmp_path}"])
    d = Daemon(cfg)
    assert d.evaluator is None
    assert not any(
        isinstance(getattr(f, "__self__", None), EvaluatorService) for f in d.training.publish_listeners
    )
    assert d.status()["evaluation"] == {"state": "disabled"}
