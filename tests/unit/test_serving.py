"""The published snapshot: a private, frozen copy of the model, and its atomic store."""

from __future__ import annotations

import io
import json
import math
import threading
from typing import Any

import pytest
import torch
from PIL import Image

from growclip_stream.data.records import RecordError, RecordLimits
from growclip_stream.model.clip import ArchConfig, GrowCLIP, TowerConfig
from growclip_stream.serving import ImageItemError, ModelSnapshot, SnapshotStore, claimed_pixels, json_safe

LIMITS = RecordLimits()


def small_arch(text_width: int = 32) -> ArchConfig:
    return ArchConfig(
        image=TowerConfig(width=32, depth=1, mlp_hidden=64),
        text=TowerConfig(width=text_width, depth=1, mlp_hidden=64),
        shared=TowerConfig(width=32, depth=1, mlp_hidden=64),
        embed_dim=16,
    )


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model() -> GrowCLIP:
    torch.manual_seed(0)
    return GrowCLIP(small_arch())


@pytest.fixture
def snap(model: GrowCLIP) -> ModelSnapshot:
    return ModelSnapshot.capture(model, generation=2, step=480, samples_trained=61_440, growth_history=[])


def test_capture_is_a_private_frozen_copy() -> None:
    torch.manual_seed(0)
    model = GrowCLIP(small_arch())
    model.train()
    loss = model.encode_text(torch.zeros((2, 4), dtype=torch.int64)).sum()
    loss.backward()  # the training model has gradients
    history = [{"generation": 1, "trigger": "plateau", "params": 100}]
    snap = ModelSnapshot.capture(model, generation=2, step=480, samples_trained=10, growth_history=history)

    assert snap.version == "2.480"
    assert (snap.generation, snap.step, snap.samples_trained) == (2, 480, 10)
    assert not snap.model.training
    assert all(not p.requires_grad and p.grad is None for p in snap.model.parameters())
    assert all(p.requires_grad for p in model.parameters()), "capture must not change the trainer's model"

    before = snap.embed_texts(["a shirt"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the trainer keeps training in place
    history[0]["trigger"] = "changed"
    history.append({"generation": 2})
    assert torch.equal(snap.embed_texts(["a shirt"]), before)
    assert snap.growth_history == ({"generation": 1, "trigger": "plateau", "params": 100},)
    with pytest.raises(AttributeError):
        snap.version = "9.9"  # type: ignore[misc]


def test_embed_texts_shape_norm_and_determinism(snap: ModelSnapshot) -> None:
    emb = snap.embed_texts(["a red dress", "ankle boot", "a red dress", "x" * 500])
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(emb[0], emb[2])
    assert not emb.requires_grad
    assert snap.text_token_counts(["ab", "", "x" * 500]) == [4, 2, snap.arch.context_length]


def test_texts_run_only_up_to_the_longest_and_embed_as_if_padded(snap: ModelSnapshot) -> None:
    """Serving skips the padding after the batch's longest text; the embeddings are those of the
    full-length padded batch (causal attention, read out at the first EOS)."""
    texts = ["a red dress", "an ankle boot", "x"]
    widths: list[int] = []
    hook = snap.model.text.token_embed.register_forward_hook(
        lambda m, args, out: widths.append(args[0].shape[1])
    )
    try:
        emb = snap.embed_texts(texts)
    finally:
        hook.remove()
    assert widths == [len("an ankle boot") + 2]
    padded = snap.tokenize(texts)
    assert padded.shape[1] == snap.arch.context_length
    with torch.inference_mode():
        full = snap.model.encode_text(padded)
    assert torch.allclose(emb, full, atol=1e-5)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_claimed_pixels_reads_the_header_of_each_format(fmt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (321, 47), (1, 2, 3)).save(buf, fmt)
    assert claimed_pixels(buf.getvalue()) == 321 * 47


def test_claimed_pixels_of_what_is_not_a_readable_header_is_zero() -> None:
    data = png((9, 9, 9), size=(300, 200))
    assert claimed_pixels(data[:20]) == 0  # a PNG cut inside its first chunk
    assert claimed_pixels(b"GIF89a" + bytes(40)) == 0
    assert claimed_pixels(b"") == 0
    assert claimed_pixels(data[:24]) == 300 * 200  # the size is all the header needs


def test_embed_images_matches_the_model_on_transformed_pixels(snap: ModelSnapshot) -> None:
    images = [png((200, 10, 10)), png((10, 10, 200), size=(28, 28))]
    emb = snap.embed_images(images, LIMITS)
    assert emb.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    pixels = snap.decode_images(images, LIMITS)
    assert pixels.shape == (2, 1, 28, 28)  # arch.channels, arch.image_size
    with torch.no_grad():
        assert torch.allclose(snap.model.encode_image(pixels), emb, atol=1e-6)
    assert snap.embed_images([], LIMITS).shape == (0, 16)


def test_bad_image_names_its_index_and_reason(snap: ModelSnapshot) -> None:
    good = png((0, 0, 0))
    with pytest.raises(ImageItemError) as info:
        snap.embed_images([good, good, b"not an image at all"], LIMITS)
    assert isinstance(info.value, RecordError)
    assert info.value.index == 2 and info.value.reason == "not_an_image"
    assert "image 2" in str(info.value)

    with pytest.raises(ImageItemError) as info:
        snap.embed_images([good[: len(good) // 2]], LIMITS)
    assert (info.value.index, info.value.reason) == (0, "truncated_image")

    tight = RecordLimits(max_image_pixels=100, max_image_side=10)
    with pytest.raises(ImageItemError) as info:
        snap.embed_images([good], tight)
    assert info.value.reason == "decompression_bomb"


def test_describe_is_json_and_counts_every_parameter_once(snap: ModelSnapshot) -> None:
    d = snap.describe()
    json.dumps(d, allow_nan=False)
    assert d["version"] == "2.480" and d["generation"] == 2 and d["step"] == 480
    assert d["samples_trained"] == 61_440
    assert ArchConfig.from_dict(d["architecture"]) == snap.arch
    params = d["parameters"]
    assert params["total"] == snap.num_params == snap.arch.num_params()
    assert params["image"] + params["text"] + params["shared"] == params["total"]
    assert min(params.values()) > 0
    assert d["flops_per_sample"] == snap.arch.flops_per_sample()
    assert 0 < d["logit_scale"] <= 100
    assert isinstance(d["published_at"], float)


def test_describe_survives_values_json_cannot_hold(model: GrowCLIP) -> None:
    history: list[dict[Any, Any]] = [
        {"loss": float("nan"), "gain": torch.tensor(0.5), "scores": (1.0, math.inf), 3: {"k": b"x"}}
    ]
    snap = ModelSnapshot.capture(model, generation=1, step=5, samples_trained=0, growth_history=history)
    out = json.loads(json.dumps(snap.describe(), allow_nan=False))
    assert out["growth_history"] == [{"loss": None, "gain": 0.5, "scores": [1.0, None], "3": {"k": "b'x'"}}]
    assert json_safe({"a": [1, "b", None, True]}) == {"a": [1, "b", None, True]}


def test_logit_scale_is_clamped(model: GrowCLIP) -> None:
    big = GrowCLIP(model.arch)
    with torch.no_grad():
        big.logit_scale.fill_(10.0)  # exp(10) > 100
    snap = ModelSnapshot.capture(big, generation=0, step=0, samples_trained=0, growth_history=[])
    assert snap.logit_scale == 100.0


def test_store_swaps_the_reference(model: GrowCLIP) -> None:
    store = SnapshotStore()
    assert store.current is None
    assert store.wait(timeout=0.01) is None
    a = ModelSnapshot.capture(model, generation=0, step=1, samples_trained=0, growth_history=[])
    grown = GrowCLIP(small_arch(text_width=48))
    b = ModelSnapshot.capture(grown, generation=1, step=2, samples_trained=0, growth_history=[])

    publisher = threading.Timer(0.05, store.publish, args=(a,))
    publisher.start()
    try:
        assert store.wait(timeout=5.0) is a
    finally:
        publisher.join()
    store.publish(b)
    assert store.current is b
    assert store.current.arch.text.width == 48
    assert store.current.embed_texts(["t"]).shape == (1, 16)  # embed_dim is fixed across growth
