"""The HTTP API over loopback: a real uvicorn server in a thread, a small real GrowCLIP, httpx."""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from growclip_daemon.batching import BatchLimits
from growclip_daemon.http import (
    MODEL_VERSION_HEADER,
    AppState,
    ControlRejected,
    HttpServer,
    ServeLimits,
    build_app,
    control_only,
    error_type,
)
from growclip_daemon.metrics import Metrics
from growclip_stream.data.records import RecordLimits
from growclip_stream.model.clip import ArchConfig, GrowCLIP, TowerConfig
from growclip_stream.serving import ModelSnapshot, SnapshotStore

EMBED_DIM = 16
LIMITS = ServeLimits(
    max_request_bytes=64 * 1024,
    max_items=8,
    max_text_chars=100,
    records=RecordLimits(max_image_pixels=100 * 100, max_image_side=100),
)
TOKEN = "s3cret-admin-token"


def arch(text_depth: int = 1) -> ArchConfig:
    return ArchConfig(
        image=TowerConfig(width=32, depth=1, mlp_hidden=64),
        text=TowerConfig(width=32, depth=text_depth, mlp_hidden=64),
        shared=TowerConfig(width=32, depth=1, mlp_hidden=64),
        embed_dim=EMBED_DIM,
    )


def snapshot(generation: int, step: int, seed: int = 0) -> ModelSnapshot:
    torch.manual_seed(seed)
    model = GrowCLIP(arch(text_depth=1 + generation))
    return ModelSnapshot.capture(
        model, generation=generation, step=step, samples_trained=step * 32, growth_history=[]
    )


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class RecordingControls:
    """The test's own implementation of the Controls protocol: records what it was asked."""

    calls: list[str] = field(default_factory=list)
    reject_grow: bool = False
    broken_checkpoint: bool = False

    def request_grow(self) -> dict[str, Any]:
        self.calls.append("grow")
        if self.reject_grow:
            raise ControlRejected("a growth is already running")
        return {"accepted": True}

    def request_checkpoint(self) -> dict[str, Any]:
        self.calls.append("checkpoint")
        if self.broken_checkpoint:
            raise OSError("disk full")
        return {"accepted": True, "step": 7}

    def pause(self) -> dict[str, Any]:
        self.calls.append("pause")
        return {"paused": True}

    def resume(self) -> dict[str, Any]:
        self.calls.append("resume")
        return {"paused": False}


@dataclass
class Api:
    state: AppState
    server: HttpServer
    client: httpx.Client


@pytest.fixture(scope="module")
def snap0() -> ModelSnapshot:
    return snapshot(generation=0, step=100)


def start_api(limits: ServeLimits = LIMITS, **state_kwargs: Any) -> Api:
    state = AppState(store=SnapshotStore(), metrics=Metrics(), limits=limits, **state_kwargs)
    server = HttpServer(build_app(state), "127.0.0.1", 0)
    server.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30.0)
    return Api(state, server, client)


def close_api(api: Api) -> None:
    api.client.close()
    api.server.stop()


@pytest.fixture
def make_api() -> Iterator[Any]:
    """A fresh server per call (for tests that change the store or count requests)."""
    started: list[Api] = []

    def make(**state_kwargs: Any) -> Api:
        started.append(start_api(**state_kwargs))
        return started[-1]

    try:
        yield make
    finally:
        for api in started:
            close_api(api)


@pytest.fixture(scope="module")
def api(snap0: ModelSnapshot) -> Iterator[Api]:
    """One server for the tests that only read: snap0 published, a status source attached."""
    a = start_api(status_extra=lambda: {"training": {"state": "running"}, "version": "not-this"})
    a.state.store.publish(snap0)
    try:
        yield a
    finally:
        close_api(a)


@pytest.fixture
def fresh_api(make_api: Any, snap0: ModelSnapshot) -> Api:
    a: Api = make_api()
    a.state.store.publish(snap0)
    return a


def embed(client: httpx.Client, inputs: Any, **extra: Any) -> httpx.Response:
    return client.post("/v1/embeddings", json={"input": inputs, **extra})


def vectors(resp: httpx.Response) -> torch.Tensor:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    return torch.tensor([d["embedding"] for d in body["data"]], dtype=torch.float32)


def assert_error(resp: httpx.Response, status: int, code: str, *, contains: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code, err
    assert err["type"] == error_type(status)
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and contains in err["message"], err
    return dict(err)


# --- health, readiness, versions ---------------------------------------------------------------


def test_ready_only_after_publish_and_version_follows_the_store(make_api: Any, snap0: ModelSnapshot) -> None:
    api = make_api()
    c = api.client
    assert c.get("/healthz").json() == {"status": "ok"}
    assert_error(c.get("/readyz"), 503, "model_not_ready")
    assert_error(embed(c, "a shirt"), 503, "model_not_ready", contains="no model")
    assert_error(
        c.post("/v1/rank", json={"image": b64(png((0, 0, 0))), "texts": ["x"]}), 503, "model_not_ready"
    )
    assert_error(c.get("/v1/model"), 503, "model_not_ready")

    api.state.store.publish(snap0)
    ready = c.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == "growclip@0.100"
    resp = embed(c, "a shirt")
    assert resp.json()["model"] == "growclip@0.100" and resp.headers[MODEL_VERSION_HEADER] == "0.100"

    api.state.store.publish(snapshot(generation=1, step=250, seed=1))
    resp = embed(c, "a shirt")
    assert resp.json()["model"] == "growclip@1.250" and resp.headers[MODEL_VERSION_HEADER] == "1.250"
    assert c.get("/healthz").status_code == 200


# --- embeddings --------------------------------------------------------------------------------


def test_text_embeddings(api: Api, snap0: ModelSnapshot) -> None:
    c = api.client
    one = vectors(embed(c, "a red dress"))
    assert one.shape == (1, EMBED_DIM)
    many_resp = embed(c, ["ankle boot", "a red dress", "ankle boot"], model="anything")
    many = vectors(many_resp)
    assert many.shape == (3, EMBED_DIM)
    assert torch.allclose(many.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(many[0], many[2])
    assert torch.allclose(many[1], one[0], atol=1e-6)
    assert not torch.allclose(many[0], many[1])
    assert torch.allclose(many, snap0.embed_texts(["ankle boot", "a red dress", "ankle boot"]), atol=1e-6)
    usage = many_resp.json()["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == 12 + 13 + 12  # BOS + UTF-8 bytes + EOS each
    assert many_resp.json()["object"] == "list"


def test_image_and_mixed_embeddings_keep_input_order(api: Api, snap0: ModelSnapshot) -> None:
    c = api.client
    red, blue = png((220, 20, 20)), png((20, 20, 220), size=(28, 28))
    image_only = vectors(embed(c, [{"image": b64(red)}]))
    assert image_only.shape == (1, EMBED_DIM)
    assert torch.allclose(image_only, snap0.embed_images([red], LIMITS.records), atol=1e-6)

    mixed_inputs = [
        "a red dress",
        {"image": b64(red)},
        "ankle boot",
        {"image": "data:image/png;base64," + b64(blue)},
    ]
    mixed = vectors(embed(c, mixed_inputs))
    assert mixed.shape == (4, EMBED_DIM)
    assert torch.allclose(mixed.norm(dim=1), torch.ones(4), atol=1e-5)
    expected_texts = snap0.embed_texts(["a red dress", "ankle boot"])
    expected_images = snap0.embed_images([red, blue], LIMITS.records)
    assert torch.allclose(mixed[0], expected_texts[0], atol=1e-6)
    assert torch.allclose(mixed[1], expected_images[0], atol=1e-6)
    assert torch.allclose(mixed[2], expected_texts[1], atol=1e-6)
    assert torch.allclose(mixed[3], expected_images[1], atol=1e-6)


def test_base64_encoding_decodes_to_the_same_floats(api: Api) -> None:
    c = api.client
    inputs = ["a red dress", {"image": b64(png((0, 128, 0)))}]
    floats = vectors(embed(c, inputs, encoding_format="float"))
    resp = embed(c, inputs, encoding_format="base64")
    assert resp.status_code == 200
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in resp.json()["data"]]
    assert all(v.shape == (EMBED_DIM,) for v in decoded)
    assert np.array_equal(np.stack(decoded), floats.numpy())


def test_hot_swap_while_requests_run(fresh_api: Api, snap0: ModelSnapshot) -> None:
    api = fresh_api
    swaps = [snapshot(generation=g, step=100 + 50 * g, seed=g) for g in (1, 2, 3)]
    order = ["growclip@" + s.version for s in [snap0, *swaps]]
    image = png((1, 2, 3))
    expected = {  # what each version answers: a response must come from one model, whole
        "growclip@" + s.version: torch.cat(
            [s.embed_texts(["a red dress"]), s.embed_images([image], LIMITS.records)]
        )
        for s in [snap0, *swaps]
    }
    seen: dict[int, list[str]] = {0: [], 1: []}
    failures: list[str] = []
    stop = threading.Event()

    def hammer(worker: int) -> None:
        with httpx.Client(base_url=str(api.client.base_url), timeout=30.0) as client:
            while not stop.is_set():
                resp = embed(client, ["a red dress", {"image": b64(image)}])
                if resp.status_code != 200:
                    failures.append(resp.text)
                    continue
                model = resp.json()["model"]
                if model not in expected:
                    failures.append(f"unknown model {model}")
                    continue
                if resp.headers[MODEL_VERSION_HEADER] != model.removeprefix("growclip@"):
                    failures.append(f"header {resp.headers[MODEL_VERSION_HEADER]} != {model}")
                if not torch.allclose(vectors(resp), expected[model], atol=1e-5):
                    failures.append(f"embeddings do not match {model}")
                seen[worker].append(model)

    workers = [threading.Thread(target=hammer, args=(i,)) for i in seen]
    for w in workers:
        w.start()
    try:
        for s in swaps:
            # Two more answers per worker: the second one started after the publish.
            api.state.store.publish(s)
            want = {i: len(versions) + 2 for i, versions in seen.items()}
            while (
                any(len(seen[i]) < want[i] for i in seen)
                and not failures
                and all(w.is_alive() for w in workers)
            ):
                stop.wait(0.01)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not failures, failures[:3]
    for versions in seen.values():  # one client never sees an older model after a newer one
        ranks = [order.index(v) for v in versions]
        assert ranks == sorted(ranks)
    assert {versions[-1] for versions in seen.values()} == {order[-1]}
    assert len({v for versions in seen.values() for v in versions}) >= 3


# --- rank and model ----------------------------------------------------------------------------


def test_rank_scores_are_scaled_cosines(api: Api, snap0: ModelSnapshot) -> None:
    image = png((200, 200, 200))
    texts = ["a white shirt", "a black boot", "a bag"]
    resp = api.client.post("/v1/rank", json={"image": b64(image), "texts": texts})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "growclip@0.100" and resp.headers[MODEL_VERSION_HEADER] == "0.100"
    expected = (
        snap0.logit_scale * (snap0.embed_images([image], LIMITS.records) @ snap0.embed_texts(texts).T)[0]
    )
    assert np.allclose(body["scores"], expected.numpy(), atol=1e-4)
    probs = np.array(body["probabilities"])
    assert probs.shape == (3,) and math.isclose(probs.sum(), 1.0, rel_tol=1e-9)
    assert int(np.argmax(probs)) == int(np.argmax(body["scores"]))


def test_model_status(api: Api, snap0: ModelSnapshot) -> None:
    resp = api.client.get("/v1/model")
    assert resp.status_code == 200
    body = resp.json()
    assert body["model"] == "growclip@0.100" and resp.headers[MODEL_VERSION_HEADER] == "0.100"
    assert body["version"] == "0.100"  # the snapshot's own field wins over status_extra's
    assert body["training"] == {"state": "running"}
    assert body["architecture"] == snap0.arch.to_dict()
    assert body["parameters"]["total"] == snap0.num_params
    assert body["samples_trained"] == 3200 and body["growth_history"] == []


def test_broken_status_source_does_not_break_model_status(make_api: Any, snap0: ModelSnapshot) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("trainer gone")

    api = make_api(status_extra=broken)
    api.state.store.publish(snap0)
    resp = api.client.get("/v1/model")
    assert resp.status_code == 200 and "trainer gone" in resp.json()["status_error"]


# --- errors ------------------------------------------------------------------------------------

GOOD_PNG = png((10, 20, 30))
BAD_CASES: list[tuple[str, Any, int, str, str]] = [
    # (name, JSON body, status, code, part of the message)
    ("not an object", ["a"], 400, "wrong_type", "expected an object"),
    ("missing input", {"model": "m"}, 400, "missing_field", "input"),
    ("empty string", {"input": ""}, 400, "empty_input", "empty string"),
    ("empty list", {"input": []}, 400, "empty_input", "empty list"),
    ("empty item", {"input": ["a", ""]}, 400, "empty_input", "input[1]"),
    ("too many items", {"input": ["a"] * 9}, 400, "too_many_items", "9 items, limit 8"),
    ("text too long", {"input": ["a", "x" * 101]}, 400, "text_too_long", "input[1] is 101 characters"),
    ("input a number", {"input": 5}, 400, "wrong_type", "input is a JSON number"),
    ("tiktoken ids", {"input": [[15339, 1917]]}, 400, "bad_token_id", "byte tokenizer"),
    ("token id below 0", {"input": [-1, 3]}, 400, "bad_token_id", "input[0] = -1"),
    ("empty token array", {"input": ["a", []]}, 400, "empty_input", "input[1]"),
    ("token array with a string", {"input": [[104, "i"]]}, 400, "wrong_type", "input[0][1]"),
    ("dimensions not an int", {"input": "a", "dimensions": "16"}, 400, "bad_dimensions", "positive"),
    ("pinned generation not held", {"input": "a", "model": "growclip@7"}, 404, "model_not_found", "held"),
    ("null item", {"input": ["a", None]}, 400, "wrong_type", "input[1] is a JSON null"),
    ("image not a string", {"input": [{"image": 5}]}, 400, "wrong_type", "input[0]"),
    ("object without image", {"input": [{"text": "a"}]}, 400, "wrong_type", "input[0]"),
    ("bad base64", {"input": ["a", {"image": "%%%not base64"}]}, 400, "bad_base64", "input[1]"),
    (
        "bad data URI",
        {"input": [{"image": "data:image/png," + b64(GOOD_PNG)}]},
        400,
        "bad_base64",
        "data URI",
    ),
    ("not an image", {"input": ["a", {"image": b64(b"hello world")}]}, 400, "not_an_image", "input[1]"),
    ("truncated", {"input": [{"image": b64(GOOD_PNG[:60])}]}, 400, "truncated_image", "input[0]"),
    (
        "too many pixels",
        {"input": [{"image": b64(png((0, 0, 0), (150, 90)))}]},
        400,
        "decompression_bomb",
        "",
    ),
    ("bad format", {"input": "a", "encoding_format": "int8"}, 400, "bad_encoding_format", "int8"),
    ("bad dimensions", {"input": "a", "dimensions": 3}, 400, "bad_dimensions", str(EMBED_DIM)),
    ("model not a string", {"input": "a", "model": 1}, 400, "wrong_type", "model"),
    ("unknown field", {"inputs": ["a"]}, 400, "unknown_field", "inputs"),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "code", "contains"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_embeddings_rejects(api: Api, name: str, body: Any, status: int, code: str, contains: str) -> None:
    resp = api.client.post("/v1/embeddings", json=body)
    assert_error(resp, status, code, contains=contains)
    assert resp.headers[MODEL_VERSION_HEADER] == "0.100"  # the model that judged the request
    assert vectors(embed(api.client, "still serving")).shape == (1, EMBED_DIM)


RANK_CASES: list[tuple[str, Any, str, str]] = [
    ("missing texts", {"image": b64(GOOD_PNG)}, "missing_field", "texts"),
    ("empty texts", {"image": b64(GOOD_PNG), "texts": []}, "empty_input", "texts"),
    ("texts not a list", {"image": b64(GOOD_PNG), "texts": "a"}, "wrong_type", "texts"),
    ("text not a string", {"image": b64(GOOD_PNG), "texts": ["a", 3]}, "wrong_type", "texts[1]"),
    ("too many texts", {"image": b64(GOOD_PNG), "texts": ["a"] * 9}, "too_many_items", "limit 8"),
    ("bad image", {"image": b64(b"\x89PNG\r\n\x1a\nnope"), "texts": ["a"]}, "truncated_image", "image"),
    ("bad base64", {"image": "***", "texts": ["a"]}, "bad_base64", "image"),
]


@pytest.mark.parametrize(("name", "body", "code", "contains"), RANK_CASES, ids=[c[0] for c in RANK_CASES])
def test_rank_rejects(api: Api, name: str, body: Any, code: str, contains: str) -> None:
    assert_error(api.client.post("/v1/rank", json=body), 400, code, contains=contains)


def test_invalid_json_and_unknown_routes(api: Api) -> None:
    c = api.client
    assert_error(
        c.post("/v1/embeddings", content=b"{not json"), 400, "invalid_json", contains="not valid JSON"
    )
    assert_error(c.post("/v1/embeddings", content=b"\xff\xfe\x00garbage"), 400, "invalid_json")
    assert_error(c.post("/v1/embeddings", content=b""), 400, "invalid_json", contains="empty")
    assert_error(c.post("/v1/embeddings", content=b"[" * 50_000), 400, "invalid_json")  # deep nesting
    assert_error(c.get("/v1/nothing-here"), 404, "not_found")
    assert_error(c.get("/v1/embeddings"), 405, "method_not_allowed")
    assert vectors(embed(c, "still serving")).shape == (1, EMBED_DIM)


def test_request_size_is_bounded_declared_and_actual(api: Api) -> None:
    c = api.client
    big = b'{"input": "' + b"x" * (LIMITS.max_request_bytes + 10) + b'"}'
    assert_error(c.post("/v1/embeddings", content=big), 413, "request_too_large", contains="limit 65536")

    def chunked() -> Iterator[bytes]:  # no Content-Length: only counting the bytes read can stop it
        yield b'{"input": "'
        for _ in range(20):
            yield b"x" * 8192

    resp = c.post("/v1/embeddings", content=chunked())
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "request_too_large", contains="exceeds the limit")

    assert vectors(embed(c, "still serving")).shape == (1, EMBED_DIM)


def test_large_bodies_within_the_limit_are_served(make_api: Any, snap0: ModelSnapshot) -> None:
    limits = ServeLimits(max_request_bytes=1024 * 1024, max_items=8, max_text_chars=100_000)
    api = make_api(limits=limits)
    api.state.store.publish(snap0)
    texts = [c * 90_000 for c in "abcd"]  # 360 kB of JSON: parsed off the event loop
    got = vectors(embed(api.client, texts))
    assert torch.allclose(got, snap0.embed_texts(texts), atol=1e-6)


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_template(fresh_api: Api) -> None:
    api = fresh_api
    c = api.client
    embed(c, ["a", "b", "c"])
    embed(c, "")
    c.get("/no/such/path/12345")
    c.post("/v1/rank", json={"image": b64(GOOD_PNG), "texts": ["a"]})
    resp = c.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}

    requests = {
        (s.labels["route"], s.labels["method"], s.labels["code"]): s.value
        for s in families["growclip_http_requests"].samples
        if s.name == "growclip_http_requests_total"
    }
    assert requests[("/v1/embeddings", "POST", "200")] == 1
    assert requests[("/v1/embeddings", "POST", "400")] == 1
    assert requests[("/v1/rank", "POST", "200")] == 1
    assert requests[("unmatched", "GET", "404")] == 1
    assert not any("12345" in route for route, _, _ in requests)

    latency = {
        s.labels["route"]: s.value
        for s in families["growclip_http_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert latency["/v1/embeddings"] == 2 and latency["/v1/rank"] == 1
    batch = {(s.name, s.labels["modality"]): s.value for s in families["growclip_serve_batch_size"].samples}
    # One forward pass of 3 texts for the embeddings, one of 1 text and one of 1 image for the rank.
    assert batch[("growclip_serve_batch_size_count", "text")] == 2
    assert batch[("growclip_serve_batch_size_sum", "text")] == 4
    assert batch[("growclip_serve_batch_size_count", "image")] == 1
    # The request now being answered is the scrape itself.
    assert families["growclip_http_requests_in_flight"].samples[0].value == 1


# --- admin -------------------------------------------------------------------------------------


def test_admin_disabled_without_token(make_api: Any) -> None:
    controls = RecordingControls()
    for token in (None, ""):
        api = make_api(controls=controls, admin_token=token)
        for action in ("grow", "checkpoint", "pause", "resume"):
            resp = api.client.post(f"/admin/{action}", headers={"Authorization": "Bearer anything"})
            assert_error(resp, 403, "admin_disabled", contains="admin API disabled")
    assert controls.calls == []


def test_admin_needs_the_right_token(make_api: Any) -> None:
    controls = RecordingControls()
    api = make_api(controls=controls, admin_token=TOKEN)
    c = api.client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        resp = c.post("/admin/grow", headers=headers)
        assert_error(resp, 401, "invalid_token")
        assert resp.headers["www-authenticate"] == "Bearer"
    assert controls.calls == []

    auth = {"Authorization": f"Bearer {TOKEN}"}
    for action in ("grow", "checkpoint", "pause", "resume"):
        resp = c.post(f"/admin/{action}", headers=auth)
        assert resp.status_code == 200, resp.text
        assert resp.json()["action"] == action
    assert controls.calls == ["grow", "checkpoint", "pause", "resume"]
    assert c.post("/admin/checkpoint", headers=auth).json()["result"] == {"accepted": True, "step": 7}

    controls.reject_grow = True
    assert_error(c.post("/admin/grow", headers=auth), 409, "conflict", contains="already running")
    controls.broken_checkpoint = True  # an unexpected failure: a JSON 500 that leaks no internals
    err = assert_error(c.post("/admin/checkpoint", headers=auth), 500, "internal_error", contains="OSError")
    assert "disk full" not in err["message"]
    assert c.get("/healthz").status_code == 200
    scrape = c.get("/metrics").text
    assert 'growclip_http_requests_total{code="500",method="POST",route="/admin/checkpoint"} 1.0' in scrape


def test_admin_without_controls_attached(make_api: Any) -> None:
    api = make_api(admin_token=TOKEN)
    resp = api.client.post("/admin/pause", headers={"Authorization": f"Bearer {TOKEN}"})
    assert_error(resp, 503, "controls_unavailable")


# --- server lifecycle --------------------------------------------------------------------------


def test_stop_releases_the_port_and_is_idempotent() -> None:
    state = AppState(store=SnapshotStore(), metrics=Metrics(), limits=LIMITS)
    first = HttpServer(build_app(state), "127.0.0.1", 0)
    first.start()
    port = first.port
    assert port != 0 and first.running
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/healthz").status_code == 200  # a kept-alive connection stays open
        first.stop()
        first.stop()
        assert not first.running

    second = HttpServer(build_app(state), "127.0.0.1", port)
    second.start()
    try:
        assert second.port == port
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        second.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_the_control_listener_serves_control_routes_of_the_same_app_and_nothing_else(
    snap0: ModelSnapshot,
) -> None:
    """A second listener (its own loop thread) answers health, status, metrics and the model list
    from the same state; embedding routes stay on the main port, whose lifespan runs the batchers."""
    state = AppState(store=SnapshotStore(), metrics=Metrics(), limits=LIMITS, admin_token="t0ken")
    app = build_app(state)
    main = HttpServer(app, "127.0.0.1", 0)
    control = HttpServer(control_only(app), "127.0.0.1", 0, lifespan=False, name="http-control")
    main.start()
    control.start()
    try:
        state.store.publish(snap0)
        with httpx.Client(base_url=f"http://127.0.0.1:{control.port}", timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            assert c.get("/v1/model").json()["version"] == snap0.version
            assert c.get("/v1/models").json()["data"]
            assert c.get(f"/v1/models/{c.get('/v1/models').json()['data'][0]['id']}").status_code == 200
            assert "growclip_http_requests_total" in c.get("/metrics").text
            assert c.post("/admin/pause").status_code == 401  # the admin routes, with their auth
            for path in ("/v1/embeddings", "/v1/rank", "/openapi.json", "/v1/modelz"):
                resp = c.post(path, json={"input": "a shoe"}) if path.startswith("/v1/") else c.get(path)
                err = assert_error(resp, 404, "not_found", contains="serve.port")
                assert path in err["message"]
        with httpx.Client(base_url=f"http://127.0.0.1:{main.port}", timeout=30) as m:
            assert vectors(embed(m, ["a shoe"])).shape == (1, snap0.arch.embed_dim)  # batchers run
            control.stop()
            assert vectors(embed(m, ["a shoe"])).shape == (1, snap0.arch.embed_dim)  # still running
    finally:
        control.stop()
        main.stop()
    assert not main.alive and not control.alive


def test_port_in_use_fails_loudly() -> None:
    state = AppState(store=SnapshotStore(), metrics=Metrics(), limits=LIMITS)
    first = HttpServer(build_app(state), "127.0.0.1", 0)
    first.start()
    try:
        with pytest.raises(OSError):
            HttpServer(build_app(state), "127.0.0.1", first.port).start()
    finally:
        first.stop()


# --- OpenAI compatibility: models, pinning, token arrays, dimensions ----------------------------


def test_models_list_the_current_model_and_the_held_generations(make_api: Any, snap0: ModelSnapshot) -> None:
    api = make_api()
    api.state.store = SnapshotStore(keep_versions=2)
    c = api.client
    assert_error(c.get("/v1/models"), 503, "model_not_ready")
    gen1, gen2 = snapshot(generation=1, step=200, seed=1), snapshot(generation=2, step=300, seed=2)
    api.state.store.publish(snap0)
    api.state.store.publish(gen1)
    listed = c.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["growclip", "growclip@1", "growclip@0"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in listed["data"])
    assert c.get("/v1/models/growclip@0").json()["version"] == "0.100"

    text = ["a red dress"]
    pinned = embed(c, text, model="growclip@0")
    assert pinned.json()["model"] == "growclip@0.100"
    assert torch.allclose(vectors(pinned), snap0.embed_texts(text), atol=1e-6)
    assert embed(c, text, model="growclip@1.200").json()["model"] == "growclip@1.200"
    assert embed(c, text, model="text-embedding-3-small").json()["model"] == "growclip@1.200"

    api.state.store.publish(gen2)  # keep_versions=2: generation 0 is no longer held
    assert_error(embed(c, text, model="growclip@0"), 404, "model_not_found", contains="growclip@1")
    assert_error(c.get("/v1/models/growclip@0"), 404, "model_not_found")
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["growclip", "growclip@2", "growclip@1"]
    held = c.get("/v1/model").json()["serving"]
    assert held["versions_held"] == ["growclip@1.200", "growclip@2.300"] and held["keep_versions"] == 2


def test_token_arrays_are_byte_ids(api: Api, snap0: ModelSnapshot) -> None:
    c = api.client
    ids = list(b"a red dress")
    single = vectors(embed(c, ids))
    mixed = vectors(embed(c, [ids, "a red dress", list("é".encode())]))
    expected = snap0.embed_texts(["a red dress", "a red dress", "é"])
    assert torch.allclose(single[0], expected[0], atol=1e-6)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert embed(c, ids).json()["usage"]["prompt_tokens"] == len(ids) + 2


def test_dimensions_equal_to_the_model_are_accepted(api: Api) -> None:
    assert vectors(embed(api.client, "a", dimensions=EMBED_DIM)).shape == (1, EMBED_DIM)
    assert_error(embed(api.client, "a", dimensions=EMBED_DIM // 2), 400, "bad_dimensions", contains="nested")


def test_images_share_a_pixel_budget_per_request(make_api: Any, snap0: ModelSnapshot) -> None:
    limits = ServeLimits(max_items=8, records=LIMITS.records, max_request_pixels=2 * 40 * 30)
    api = make_api(limits=limits)
    api.state.store.publish(snap0)
    image = {"image": b64(png((1, 2, 3)))}  # 40x30
    assert vectors(embed(api.client, [image, "text", image])).shape == (3, EMBED_DIM)
    err = assert_error(embed(api.client, [image, image, image]), 400, "too_many_pixels", contains="3600")
    assert err["param"] == "input[2]"


def test_data_limits_apply_to_served_images() -> None:
    from growclip_daemon.config import load_config
    from growclip_daemon.engine import serve_limits

    cfg = load_config(None, ["data.max_image_pixels=1000", "serve.max_request_pixels=5000"])
    limits = serve_limits(cfg)
    assert limits.records.max_image_pixels == 1000 and limits.max_request_pixels == 5000


# --- overload ---------------------------------------------------------------------------------


def test_full_queue_answers_429_while_health_and_model_answer(make_api: Any, snap0: ModelSnapshot) -> None:
    # The batchers wait up to 5 s for 1000 items: the first two requests (4 items) fill the queue.
    limits = ServeLimits(
        max_items=8,
        records=LIMITS.records,
        batch=BatchLimits(max_batch_items=1000, max_wait_s=5.0, max_queue_items=4),
    )
    api = make_api(limits=limits)
    api.state.store.publish(snap0)
    url = f"http://127.0.0.1:{api.server.port}"
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        resp = httpx.post(f"{url}/v1/embeddings", json={"input": [f"t{i}", "u"]}, timeout=60)
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while (
        api.state.metrics.registry.get_sample_value(
            "growclip_serve_rejected_requests_total", {"modality": "text", "reason": "queue_full"}
        )
        != 6
    ):
        assert time.monotonic() < deadline, [r.status_code for r in results]
        time.sleep(0.01)
    # While two requests sit in the queue, the other routes answer at once.
    assert api.client.get("/healthz").status_code == 200
    assert api.client.get("/v1/model").status_code == 200
    assert api.client.get("/v1/models").status_code == 200
    for t in threads:
        t.join(60)
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200] + [429] * 6
    for r in results:
        if r.status_code == 429:
            assert_error(r, 429, "rate_limit_exceeded", contains="queue is full")
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers[MODEL_VERSION_HEADER] == "0.100"


def test_model_status_reports_drift_in_the_growth_history(make_api: Any) -> None:
    from growclip_daemon.drift import DriftMonitor, Probes

    store = SnapshotStore(keep_versions=2)
    api = make_api()
    api.state.store = store
    monitor = DriftMonitor(store, api.state.metrics, Probes.from_dataset("fashion-mnist", 32), LIMITS.records)
    api.state.drift_status = monitor.status
    monitor.start()
    try:
        torch.manual_seed(0)
        for generation, step in ((0, 10), (1, 20)):
            history = [{"generation": 1, "trigger": "forced"}] if generation else []
            snap = ModelSnapshot.capture(
                GrowCLIP(arch(text_depth=1 + generation)),
                generation=generation,
                step=step,
                samples_trained=0,
                growth_history=history,
            )
            store.publish(snap)
            monitor.notify(snap)
            assert monitor.wait_measured(snap.version, 60)
    finally:
        monitor.stop()
    status = api.client.get("/v1/model").json()
    drift = status["drift"]
    assert drift["latest"]["version"] == "1.20" and drift["probes"] == {"images": 32, "texts": 32}
    assert status["growth_history"][0]["drift"] == drift["by_generation"]["1"]
    assert status["growth_history"][0]["drift"]["version"] == "0.10"
    scrape = api.client.get("/metrics").text
    assert 'growclip_embedding_drift_mean_cosine{against="previous",modality="image"}' in scrape


# --- growclip-daemon status --------------------------------------------------------------------


def test_status_cli_asks_the_configured_address_and_prints_a_summary(
    make_api: Any, snap0: ModelSnapshot, tmp_path: Any
) -> None:
    import json

    from typer.testing import CliRunner

    from growclip_daemon.cli import app as cli_app

    history = [
        {"generation": 1, "step": 90, "ops": ["deepen:text+1"], "trigger": "forced", "params_before": 1000,
         "params_after": 2000, "duration_s": 1.5, "drift": {"image": {"mean_cosine": 0.97}}},
    ]  # fmt: skip
    snap = ModelSnapshot.capture(
        GrowCLIP(arch(text_depth=2)), generation=1, step=100, samples_trained=3200, growth_history=history
    )
    api = make_api(status_extra=lambda: {"training": {"state": "running", "samples_trained": 3200}})
    api.state.store.publish(snap)
    config = tmp_path / "daemon.yaml"
    config.write_text(f"serve:\n  host: 127.0.0.1\n  port: {api.server.port}\n")
    runner = CliRunner()
    cli = ["status", "--config", str(config)]

    human = runner.invoke(cli_app, cli)
    assert human.exit_code == 0, human.output
    lines = human.stdout.splitlines()
    assert lines[0].startswith("growclip@1.100  generation 1, step 100")
    assert any(line.startswith("training   running, 3,200 samples") for line in lines)
    assert any(
        "gen 1 at step 90: deepen:text+1 (forced)" in line and "image cos 0.97" in line for line in lines
    )
    assert any(line.startswith("serving    versions held growclip@1.100") for line in lines)

    raw = runner.invoke(cli_app, [*cli, "--json"])
    assert raw.exit_code == 0 and json.loads(raw.stdout)["model"] == "growclip@1.100"

    other = tmp_path / "other.yaml"
    other.write_text("serve:\n  port: 1\n")  # nothing listens there: a clear error, exit 1
    down = runner.invoke(cli_app, [*cli[:-1], str(other)])
    assert down.exit_code == 1 and "cannot reach http://127.0.0.1:1" in down.stderr

    # with a control listener configured, status asks it (it answers while the main port is flooded)
    with_control = tmp_path / "control.yaml"
    with_control.write_text(f"serve:\n  host: 127.0.0.1\n  port: 1\n  control_port: {api.server.port}\n")
    via_control = runner.invoke(cli_app, ["status", "--config", str(with_control), "--json"])
    assert via_control.exit_code == 0 and json.loads(via_control.stdout)["model"] == "growclip@1.100"
