"""Snapshots in another precision (bf16 for serving on a GPU) answer like the fp32 ones."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image

from growclip_stream.data.records import RecordLimits
from growclip_stream.model import GrowCLIP
from growclip_stream.serving import ModelSnapshot
from tests.helpers import randomized, tiny_arch


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), color).save(buf, format="PNG")
    return buf.getvalue()


def test_bf16_snapshot_matches_fp32() -> None:
    model = randomized(GrowCLIP(tiny_arch()), seed=4)
    fp32 = ModelSnapshot.capture(model, generation=0, step=1, samples_trained=1, growth_history=[])
    bf16 = ModelSnapshot.capture(
        model, generation=0, step=1, samples_trained=1, growth_history=[], dtype=torch.bfloat16
    )
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the trained model is untouched
    texts = ["a red dress", "ankle boot", "x"]
    images = [_png((200, 10, 10)), _png((10, 10, 200))]
    limits = RecordLimits()
    for got, want in (
        (bf16.embed_texts(texts), fp32.embed_texts(texts)),
        (bf16.embed_images(images, limits), fp32.embed_images(images, limits)),
    ):
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        assert float(F.cosine_similarity(got, want, dim=-1).min()) > 0.99


def test_evaluation_embeds_with_a_bf16_snapshot() -> None:
    from growclip_stream.evaluation import embed_images, embed_texts

    model = randomized(GrowCLIP(tiny_arch()), seed=5)
    kw: dict = {"generation": 0, "step": 1, "samples_trained": 1, "growth_history": []}
    fp32 = ModelSnapshot.capture(model, **kw)
    bf16 = ModelSnapshot.capture(model, dtype=torch.bfloat16, **kw)
    a = model.arch
    images = torch.rand(5, a.channels, a.image_size, a.image_size) * 2 - 1
    got, want = embed_images(bf16.model, images, batch_size=2), embed_images(fp32.model, images)
    assert got.dtype == torch.float32 and float(F.cosine_similarity(got, want, dim=-1).min()) > 0.99
    got, want = embed_texts(bf16.model, ["a", "bb", "ccc"]), embed_texts(fp32.model, ["a", "bb", "ccc"])
    assert got.dtype == torch.float32 and float(F.cosine_similarity(got, want, dim=-1).min()) > 0.99
