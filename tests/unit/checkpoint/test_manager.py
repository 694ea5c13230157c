"""The checkpointer: cadence, background writes off the training thread, retries, failures that
never stop training."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from growclip_stream.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointPolicy,
    CheckpointStore,
    SaveResult,
    TrainingState,
    capture,
)
from growclip_stream.model import GrowCLIP
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.trainer import Batch, OnlineTrainer
from tests.helpers import tiny_arch


class FlakyFileSystem(MemoryFileSystem):
    """An in-memory store whose writes fail while ``failing`` is set, like an object store
    answering 503s (a transient outage)."""

    protocol = "flaky"
    failing = threading.Event()
    writes_refused = 0

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if FlakyFileSystem.failing.is_set():
            FlakyFileSystem.writes_refused += 1
            raise OSError("503 Slow Down")
        super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def trainer() -> OnlineTrainer:
    torch.manual_seed(0)
    return OnlineTrainer(GrowCLIP(tiny_arch()), TrainConfig(batch_size=8))


def batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 256, (8, 32), generator=g), tuple("abcdefgh")
    )


def capturer(t: OnlineTrainer) -> Any:
    def grab() -> TrainingState:
        return capture(t.model, t.optimizer, step=t.step, samples=t.samples, source={"step": t.step})

    return grab


def wait_until(predicate: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_periodic_saves_run_off_the_training_thread_and_hold_the_captured_weights(tmp_path: Path) -> None:
    t = trainer()
    delivered: list[tuple[SaveResult, int]] = []
    manager = CheckpointManager(
        CheckpointStore(str(tmp_path)),
        CheckpointPolicy(every_s=0, every_steps=2),
        on_durable=lambda r: delivered.append((r, threading.get_ident())),
    )
    started: dict[int, dict[str, torch.Tensor]] = {}
    for i in range(7):
        t.train_step(batch(i))
        weights = {k: v.clone() for k, v in t.model.state_dict().items()}
        if manager.maybe_save(t.step, capturer(t)):
            started[t.step] = weights
            manager.wait(60)  # keep the test deterministic: let the write finish before training on
    manager.close()
    assert sorted(started) == [2, 4, 6]
    assert [r.state.step for r, _ in delivered] == [2, 4, 6]
    assert {ident for _, ident in delivered} == {threading.get_ident()}  # delivered on the caller's thread
    assert all(r.reason == "periodic" and r.attempts == 1 and r.stall_s >= 0 for r, _ in delivered)
    store = CheckpointStore(str(tmp_path))
    for r, _ in delivered:  # each holds the weights of its step, though training went on meanwhile
        loaded = store.load(r.path)
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in started[loaded.step].items())
    assert store.load().step == 6


def test_the_snapshot_is_a_copy_so_training_during_the_write_does_not_leak_into_it(tmp_path: Path) -> None:
    t = trainer()
    t.train_step(batch(0))
    state = capturer(t)()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    for i in range(3):  # the writer would run now; the live model moves on
        t.train_step(batch(i + 1))
    assert not all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    saved = CheckpointStore(str(tmp_path)).write(state)
    loaded = CheckpointStore(str(tmp_path)).load(saved.path)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in before.items())


def test_nothing_new_no_periodic_save_and_time_cadence() -> None:
    now = [0.0]
    manager = CheckpointManager(
        CheckpointStore("memory://cadence"), CheckpointPolicy(every_s=300), clock=lambda: now[0]
    )
    manager.mark_saved(10, progress="p10")
    now[0] = 299.0
    assert not manager.due(11, "p11")
    now[0] = 301.0
    assert manager.due(11, "p11")
    assert not manager.due(10, "p10"), "an idle stream (same step, same positions) is not saved again"
    assert manager.due(10, "p12"), "records settled without a step (all dead-lettered) are"
    with pytest.raises(ValueError):
        CheckpointPolicy(every_s=-1)


def test_a_failing_periodic_save_is_retried_counted_and_never_stops_training(caplog) -> None:
    t = trainer()
    failures: list[BaseException] = []
    durable: list[SaveResult] = []
    manager = CheckpointManager(
        CheckpointStore("flaky://ckpt-fail"),
        CheckpointPolicy(every_s=0, every_steps=1, attempts=3, backoff_s=0.01, max_backoff_s=0.02),
        on_durable=durable.append,
        on_failure=failures.append,
    )
    FlakyFileSystem.failing.set()
    FlakyFileSystem.writes_refused = 0
    try:
        for i in range(400):  # training goes on while every save fails
            t.train_step(batch(i))
            manager.maybe_save(t.step, capturer(t))
            if manager.failures >= 2:
                break
        wait_until(lambda: manager.failures >= 2)
        assert t.step >= 3
        manager.wait(60)
    finally:
        FlakyFileSystem.failing.clear()
    assert manager.failures == len(failures) >= 2 and not durable
    assert FlakyFileSystem.writes_refused >= 3 * manager.failures  # every attempt was made
    assert all(isinstance(e, OSError) for e in failures)
    assert "checkpoint failed; training goes on and the next save tries again" in caplog.text
    assert "checkpoint write failed; retrying" in caplog.text

    # the store answers again: the next due save succeeds
    t.train_step(batch(99))
    assert manager.maybe_save(t.step, capturer(t))
    manager.close()
    assert [r.state.step for r in durable] == [t.step]
    assert CheckpointStore("flaky://ckpt-fail").load().step == t.step


def test_a_save_on_request_that_keeps_failing_raises_and_is_counted() -> None:
    t = trainer()
    manager = CheckpointManager(
        CheckpointStore("flaky://ckpt-admin"), CheckpointPolicy(attempts=2, backoff_s=0.01)
    )
    FlakyFileSystem.failing.set()
    try:
        with pytest.raises(CheckpointError, match="admin checkpoint failed"):
            manager.save(capturer(t), "admin")
    finally:
        FlakyFileSystem.failing.clear()
    assert manager.failures == 1
    assert manager.save(capturer(t), "admin").reason == "admin"


def test_a_save_on_request_waits_for_the_background_save_and_both_get_their_own_folder(
    tmp_path: Path,
) -> None:
    t = trainer()
    t.train_step(batch(0))
    seen: list[str] = []
    manager = CheckpointManager(
        CheckpointStore(str(tmp_path)),
        CheckpointPolicy(every_s=0, every_steps=1),
        on_durable=lambda r: seen.append(r.reason),
    )
    assert manager.maybe_save(t.step, capturer(t))
    result = manager.save(capturer(t), "admin")  # same step, right after the periodic one
    manager.close()
    assert seen == ["periodic", "admin"]
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == ["00000001-g0-s000000000001", "00000002-g0-s000000000001"]
    assert result.path.endswith(names[-1])


def test_a_capture_that_raises_is_counted_not_raised(tmp_path: Path) -> None:
    def broken() -> TrainingState:
        raise RuntimeError("state could not be copied")

    failures: list[BaseException] = []
    manager = CheckpointManager(
        CheckpointStore(str(tmp_path)), CheckpointPolicy(every_s=0, every_steps=1), on_failure=failures.append
    )
    assert manager.maybe_save(1, broken) is False
    assert manager.failures == 1 and isinstance(failures[0], RuntimeError)
    with pytest.raises(CheckpointError, match="admin checkpoint failed"):
        manager.save(broken, "admin")
    assert manager.failures == 2
