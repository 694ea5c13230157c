"""collate: float batches for the CPU, raw uint8 (optionally pinned) batches for an accelerator."""

from __future__ import annotations

import pytest
import torch

from growclip_stream.data.images import normalize
from growclip_stream.data.pipeline import Sample, collate
from growclip_stream.model.tokenizer import ByteTokenizer


def _samples(n: int) -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    return [
        Sample(str(i), torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8), f"c{i}")
        for i in range(n)
    ]


def test_uint8_batches_hold_the_raw_pixels() -> None:
    samples, tok = _samples(5), ByteTokenizer(16)
    raw = collate(samples, tok, uint8=True)
    assert raw.images.dtype == torch.uint8 and raw.images.shape == (5, 3, 8, 8)
    default = collate(samples, tok)
    assert default.images.dtype == torch.float32
    assert torch.equal(normalize(raw.images), default.images)
    assert torch.equal(raw.tokens, default.tokens) and raw.ids == default.ids


def test_pinning_needs_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        collate(_samples(2), ByteTokenizer(16), pin_memory=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA device")
def test_pinned_batches_are_page_locked() -> None:
    batch = collate(_samples(4), ByteTokenizer(16), uint8=True, pin_memory=True)
    assert batch.images.is_pinned()
