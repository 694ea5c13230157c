"""Dynamic batching: concurrent requests share forward passes; bounded queue; deadlines; isolation."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from growclip_daemon.batching import Batcher, BatchLimits, Overloaded
from growclip_daemon.metrics import Metrics
from growclip_stream.data.records import RecordLimits
from growclip_stream.serving import ImageItemError, ModelSnapshot
from tests.helpers import random_model, tiny_arch


def snapshot(seed: int = 0, generation: int = 0) -> ModelSnapshot:
    return ModelSnapshot.capture(
        random_model(tiny_arch(), seed=seed),
        generation=generation,
        step=1,
        samples_trained=0,
        growth_history=[],
    )


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), value).save(buf, "PNG")
    return buf.getvalue()


def text_batcher(metrics: Metrics, **limits: float | int | bool) -> Batcher[str]:
    return Batcher(
        "text",
        prepare=lambda snap, texts: snap.tokenize(texts),
        forward=lambda snap, tokens: snap.embed_tokens(tokens),
        limits=BatchLimits(**limits),  # type: ignore[arg-type]
        metrics=metrics,
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def started() -> Iterator[list[Batcher[str]]]:
    batchers: list[Batcher[str]] = []
    yield batchers
    for b in batchers:
        b.close()


def forwards(metrics: Metrics, modality: str = "text") -> tuple[float, float]:
    """(forward passes, items) so far."""
    r = metrics.registry
    count = r.get_sample_value("growclip_serve_batch_size_count", {"modality": modality}) or 0.0
    total = r.get_sample_value("growclip_serve_batch_size_sum", {"modality": modality}) or 0.0
    return count, total


def test_queued_requests_share_one_forward_pass_and_get_their_own_rows(
    metrics: Metrics, started: list[Batcher[str]]
) -> None:
    snap = snapshot()
    b = text_batcher(metrics, max_batch_items=64, max_wait_s=0.5)
    started.append(b)
    b.start()
    requests = [[f"text {i}", f"other {i}"] for i in range(8)]
    futures = [b.submit(snap, texts) for texts in requests]  # all within the 0.5 s window
    results = [f.result(timeout=30) for f in futures]
    for texts, got in zip(requests, results, strict=True):
        assert torch.allclose(got, snap.embed_texts(texts), atol=1e-5)
    assert forwards(metrics) == (1, 16)


def test_without_batching_every_request_runs_alone(metrics: Metrics, started: list[Batcher[str]]) -> None:
    snap = snapshot()
    b = text_batcher(metrics, batching=False, max_wait_s=0.5)
    started.append(b)
    b.start()
    futures = [b.submit(snap, [f"text {i}"]) for i in range(5)]
    for f in futures:
        f.result(timeout=30)
    assert forwards(metrics) == (5, 5)


def test_a_batch_never_exceeds_its_size_bound(metrics: Metrics, started: list[Batcher[str]]) -> None:
    snap = snapshot()
    b = text_batcher(metrics, max_batch_items=4, max_wait_s=0.3)
    started.append(b)
    b.start()
    futures = [b.submit(snap, ["a", "b", "c"]) for _ in range(3)]  # 3 + 3 > 4: one request per batch
    for f in futures:
        f.result(timeout=30)
    assert forwards(metrics) == (3, 9)


def test_full_queue_refuses_with_429_and_a_retry_time(metrics: Metrics, started: list[Batcher[str]]) -> None:
    snap = snapshot()
    # The worker waits up to 5 s for a batch of 1000 items, so what is submitted stays queued.
    b = text_batcher(metrics, max_batch_items=1000, max_wait_s=5.0, max_queue_items=4)
    started.append(b)
    b.start()
    first = [b.submit(snap, ["a", "b"]), b.submit(snap, ["c", "d"])]
    with pytest.raises(Overloaded) as refused:
        b.submit(snap, ["e"])
    assert refused.value.status == 429 and refused.value.reason == "queue_full"
    assert int(refused.value.retry_after) >= 1
    assert (
        metrics.registry.get_sample_value(
            "growclip_serve_rejected_requests_total", {"modality": "text", "reason": "queue_full"}
        )
        == 1
    )
    b.close()  # closing runs what was queued
    assert [f.result(timeout=30).shape for f in first] == [(2, 16), (2, 16)]


def test_a_request_past_its_deadline_is_dropped_with_503(
    metrics: Metrics, started: list[Batcher[str]]
) -> None:
    snap = snapshot()
    b = text_batcher(metrics, max_batch_items=1000, max_wait_s=0.5, timeout_s=0.05)
    started.append(b)
    b.start()
    late = b.submit(snap, ["waits 0.5 s for company, deadline 0.05 s"])
    with pytest.raises(Overloaded) as dropped:
        late.result(timeout=30)
    assert dropped.value.status == 503 and dropped.value.reason == "deadline"
    assert forwards(metrics) == (0, 0)  # never run late


def test_a_bad_image_fails_only_its_own_request(metrics: Metrics, started: list[Batcher[bytes]]) -> None:
    snap = snapshot()
    limits = RecordLimits()
    b: Batcher[bytes] = Batcher(
        "image",
        prepare=lambda s, images: s.decode_images(images, limits),
        forward=lambda s, pixels: s.embed_pixels(pixels),
        limits=BatchLimits(max_wait_s=0.3),
        metrics=metrics,
    )
    started.append(b)  # type: ignore[arg-type]
    b.start()
    good = b.submit(snap, [png(10), png(200)])
    bad = b.submit(snap, [png(30), b"not an image"])
    also_good = b.submit(snap, [png(90)])
    assert torch.allclose(good.result(timeout=30), snap.embed_images([png(10), png(200)], limits), atol=1e-5)
    assert torch.allclose(also_good.result(timeout=30), snap.embed_images([png(90)], limits), atol=1e-5)
    with pytest.raises(ImageItemError) as err:
        bad.result(timeout=30)
    assert err.value.index == 1 and err.value.reason == "not_an_image"
    assert forwards(metrics, "image") == (1, 3)


def test_requests_on_different_snapshots_never_share_a_forward_pass(
    metrics: Metrics, started: list[Batcher[str]]
) -> None:
    old, new = snapshot(seed=0), snapshot(seed=1, generation=1)
    b = text_batcher(metrics, max_wait_s=0.3)
    started.append(b)
    b.start()
    futures = [(s, b.submit(s, ["same text"])) for s in (old, new, old, new)]
    for snap, f in futures:
        assert torch.allclose(f.result(timeout=30), snap.embed_texts(["same text"]), atol=1e-5)
    assert not torch.allclose(old.embed_texts(["same text"]), new.embed_texts(["same text"]))


def test_submit_after_close_is_refused(metrics: Metrics) -> None:
    b = text_batcher(metrics)
    b.start()
    b.close()
    with pytest.raises(Overloaded) as refused:
        b.submit(snapshot(), ["x"])
    assert refused.value.status == 503


def test_queue_wait_is_measured(metrics: Metrics, started: list[Batcher[str]]) -> None:
    b = text_batcher(metrics, max_wait_s=0.05)
    started.append(b)
    b.start()
    t0 = time.monotonic()
    b.submit(snapshot(), ["x"]).result(timeout=30)
    waited = metrics.registry.get_sample_value("growclip_serve_queue_wait_seconds_sum", {"modality": "text"})
    assert waited is not None and 0.04 <= waited <= time.monotonic() - t0


def test_the_batcher_runs_on_its_own_intra_op_threads(metrics: Metrics, started: list[Batcher[str]]) -> None:
    seen: list[int] = []

    def forward(snap: ModelSnapshot, tokens: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return snap.embed_tokens(tokens)

    before = torch.get_num_threads()
    b: Batcher[str] = Batcher(
        "text",
        prepare=lambda s, t: s.tokenize(t),
        forward=forward,
        limits=BatchLimits(threads=1),
        metrics=metrics,
    )
    started.append(b)
    b.start()
    b.submit(snapshot(), ["x"]).result(timeout=30)
    assert seen == [1]
    assert torch.get_num_threads() == before  # the caller's (the trainer's) pool is untouched


def test_a_cancelled_request_is_skipped_and_the_rest_of_its_batch_answered(
    metrics: Metrics, started: list[Batcher[str]]
) -> None:
    snap = snapshot()
    b = text_batcher(metrics, max_wait_s=0.3)
    started.append(b)
    b.start()
    kept, gone, also_kept = (b.submit(snap, [t]) for t in ("a", "b", "c"))
    assert gone.cancel()  # its client went away while it was queued
    assert torch.allclose(kept.result(timeout=30), snap.embed_texts(["a"]), atol=1e-5)
    assert torch.allclose(also_kept.result(timeout=30), snap.embed_texts(["c"]), atol=1e-5)
    assert forwards(metrics) == (1, 2)
