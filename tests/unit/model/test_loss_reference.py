"""The contrastive loss and the caption matching, against their plain (copy-heavy) definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from growclip_stream.model.clip import ClipLoss, ClipOutput, same_caption


def _reference_same_caption(tokens: torch.Tensor) -> torch.Tensor:
    return (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)  # (B, B, T) compared


def _reference_loss(out: ClipOutput) -> torch.Tensor:
    logits = out.logit_scale * out.image_embeds @ out.text_embeds.T
    n = logits.shape[0]
    pos = torch.eye(n, dtype=torch.bool) if out.positives is None else out.positives
    pos = pos.to(logits.dtype)
    per_image, per_text = pos.sum(1), pos.sum(0)
    i2t = F.cross_entropy(logits, pos / per_image[:, None])
    t2i = F.cross_entropy(logits.T, pos.T / per_text[:, None])
    return (i2t + t2i) / 2 - (per_image.log().mean() + per_text.log().mean()) / 2


def _captions(n: int, distinct: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(0, 259, (distinct, length), generator=g)
    pool[1] = pool[0]
    pool[1, -1] = (pool[0, -1] + 1) % 259  # differs in the last token only
    return pool[torch.randint(0, distinct, (n,), generator=g)]


def test_same_caption_matches_elementwise_comparison() -> None:
    for seed, (n, distinct, length) in enumerate([(64, 5, 77), (33, 33, 32), (200, 12, 300)]):
        tokens = _captions(n, distinct, length, seed)
        assert torch.equal(same_caption(tokens), _reference_same_caption(tokens))


def test_loss_matches_soft_target_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    for n, positives in ((48, True), (48, False), (7, True)):
        img = F.normalize(torch.randn(n, 16, generator=g), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(n, 16, generator=g), dim=-1).requires_grad_()
        pos = same_caption(_captions(n, 6, 8, n)) if positives else None
        out = ClipOutput(img, txt, torch.tensor(14.3), pos)
        got, want = ClipLoss()(out), _reference_loss(out)
        assert torch.allclose(got, want, atol=1e-5)
        g_got = torch.autograd.grad(got, (img, txt))
        g_want = torch.autograd.grad(want, (img, txt))
        for a, b in zip(g_got, g_want, strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def test_loss_is_fp32_inside_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(32, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(32, 16, generator=g), dim=-1)
    out = ClipOutput(img, txt, torch.tensor(30.0), same_caption(_captions(32, 5, 8, 3)))
    want = ClipLoss()(out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ClipLoss()(out)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)
