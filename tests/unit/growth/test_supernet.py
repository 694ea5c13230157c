import pytest
import torch

from growclip_stream.batch import Batch
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp
from growclip_stream.growth.space import Candidate, candidate_set, make_candidate
from growclip_stream.growth.supernet import Supernet, union_ops
from growclip_stream.model import ArchConfig, ByteTokenizer, ClipLoss, GrowCLIP
from growclip_stream.train.config import TrainConfig
from tests.helpers import operator_arch as arch
from tests.helpers import random_model

TOL = 1e-5


# every kind on every tower, including widening the shared encoder and two factors on the image tower
SPACE = (
    "widen:image*2",
    "widen:image*3",
    "widen:text*2",
    "widen:shared*2",
    "widen_mlp:image+8",
    "widen_mlp:text+8",
    "widen_mlp:shared+8",
    "deepen:image+1",
    "deepen:text+2",
    "deepen:shared+1",
)


def batch(a: ArchConfig, seed: int = 0, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, a.channels, a.image_size, a.image_size, generator=g)
    captions = ["a red shoe", "", "ankle boot ✓", "x" * 50, "bag", "shirt", "trouser", "é€𝄞"] * (n // 8 + 1)
    return Batch(images, ByteTokenizer(a.context_length).encode(captions[:n]), tuple(map(str, range(n))))


def candidates(a: ArchConfig, max_ops: int = 2) -> list[Candidate]:
    return candidate_set(a, GrowthConfig(space=SPACE, max_ops_per_step=max_ops, max_flops_factor=100.0))


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max())


def build(shared_depth: int = 1, max_ops: int = 2) -> tuple[GrowCLIP, list[Candidate], Supernet]:
    a = arch(shared_depth)
    old = random_model(a)
    cands = candidates(a, max_ops)
    return (
        old,
        cands,
        Supernet(old, cands, torch.Generator().manual_seed(0), train_cfg=TrainConfig(), sample_k=2, seed=0),
    )


def test_union_covers_every_candidate() -> None:
    _, _cands, sn = build()
    assert [str(op) for op in sn.ops] == [
        "widen:image*6",  # lcm of 2 and 3
        "widen:text*2",
        "widen:shared*2",
        "widen_mlp:image+8",
        "widen_mlp:text+8",
        "widen_mlp:shared+8",
        "deepen:image+1",
        "deepen:text+2",
        "deepen:shared+1",
    ]
    assert union_ops([make_candidate(arch(), [GrowthOp.parse("deepen:text+2")])]) == (
        GrowthOp.parse("deepen:text+2"),
    )
    assert sn.model.arch.image.width == 6 * 16 and sn.reference.arch == arch()
    assert sn.full.arch == sn.model.arch and sn.full.ops == sn.ops


@pytest.mark.parametrize("shared_depth", [0, 1])
def test_every_candidate_preserves_the_function_at_construction(shared_depth: int) -> None:
    old, cands, sn = build(shared_depth)
    b = batch(old.arch)
    with torch.no_grad():
        ref = old(b.images, b.tokens)
        for cand in [sn.reference, *cands]:
            model = sn.extract(cand)
            assert model.arch == cand.arch
            assert sum(p.numel() for p in model.parameters()) == cand.params
            out = model(b.images, b.tokens)
            shared = sn.forward_candidate(cand, b.images, b.tokens)
            assert max_diff(out.image_embeds, ref.image_embeds) < TOL, cand.name
            assert max_diff(out.text_embeds, ref.text_embeds) < TOL, cand.name
            assert max_diff(out.image_embeds, shared.image_embeds) < TOL, cand.name
            assert max_diff(out.text_embeds, shared.text_embeds) < TOL, cand.name


def test_extraction_is_differentiable_and_shares_weights() -> None:
    old, _cands, sn = build()
    b = batch(old.arch)
    cand = make_candidate(old.arch, [GrowthOp.parse("deepen:image+1")])  # folds every widened tower
    loss = ClipLoss()(sn.forward_candidate(cand, b.images, b.tokens))
    loss.backward()
    grads = {n: p.grad for n, p in sn.model.named_parameters()}
    assert grads["image.blocks.1.attn.out.weight"] is not None  # its new block
    assert grads["image.blocks.0.mlp.fc1.weight"] is not None  # folded width: every copy gets a gradient
    g = grads["image.blocks.0.mlp.fc1.weight"]
    assert g is not None and g[:32].abs().min() > 0 and g[32:].abs().max() == 0  # only its first 32 units
    assert grads["text.blocks.1.ln_1.weight"] is None  # above its text depth


def test_extracted_models_are_detached_copies() -> None:
    _old, cands, sn = build()
    model = sn.extract(cands[0])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(sn.initial_state[k], p) for k, p in sn.model.named_parameters())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_training_moves_weights_and_keeps_extraction_consistent() -> None:
    old, cands, sn = build(max_ops=1)
    b = batch(old.arch, n=16)
    before = {n: p.detach().clone() for n, p in sn.model.named_parameters()}
    report = sn.train([batch(old.arch, seed=s, n=16) for s in range(3)], steps=3, lr=1e-2)
    assert report["steps"] == 3 and report["samples"] == 48 and report["seconds"] > 0
    assert report["mean_loss"] is not None
    moved = [n for n, p in sn.model.named_parameters() if not torch.equal(p, before[n])]
    assert "logit_scale" in moved and "image.blocks.0.attn.qkv.weight" in moved
    assert len(moved) > len(before) // 2
    with torch.no_grad():
        ref = old(b.images, b.tokens)
        changed = 0.0
        for cand in [sn.reference, *cands]:
            out = sn.extract(cand)(b.images, b.tokens)
            shared = sn.forward_candidate(cand, b.images, b.tokens)
            assert max_diff(out.image_embeds, shared.image_embeds) < TOL, cand.name
            assert max_diff(out.text_embeds, shared.text_embeds) < TOL, cand.name
            changed = max(changed, max_diff(out.image_embeds, ref.image_embeds))
        assert changed > 1e-3  # the sub-networks learned something


def test_sandwich_and_train_stops_when_batches_run_out() -> None:
    old, _cands, sn = build(max_ops=1)
    members = sn.sandwich()
    assert members[0] == sn.reference and members[1] == sn.full and len(members) == 4
    assert len({m.name for m in members}) == 4
    report = sn.train(iter([batch(old.arch)]), steps=5)
    assert report["steps"] == 1 and sn.steps == 1


def test_rejects_foreign_candidates() -> None:
    old, _cands, sn = build(max_ops=1)
    foreign = make_candidate(old.arch, [GrowthOp.parse("deepen:image+2")])
    with pytest.raises(ValueError, match="not a sub-network"):
        sn.extract_state(foreign)
    other_base = make_candidate(arch(shared_depth=0), [GrowthOp.parse("deepen:image+1")])
    with pytest.raises(ValueError, match="does not grow the base"):
        Supernet(old, [other_base], train_cfg=TrainConfig())
    with pytest.raises(ValueError, match="at least one candidate"):
        Supernet(old, [], train_cfg=TrainConfig())


def test_optimizer_follows_the_train_config() -> None:
    old, cands, _ = build(max_ops=1)
    sn = Supernet(old, cands, train_cfg=TrainConfig(weight_decay=0.05, beta2=0.95))
    decay, no_decay = sn.optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.95)


def test_every_supernet_weight_trains_at_every_step() -> None:
    """The top of the sandwich is the whole supernet, so operators no candidate holds together still
    get gradients at every step (with single-operator candidates and no random members, the largest
    candidate alone would leave every other operator's new weights out)."""
    old, cands, _ = build(max_ops=1)
    sn = Supernet(old, cands, torch.Generator().manual_seed(0), train_cfg=TrainConfig(), sample_k=0)
    for step in range(3):
        sn.train_step(batch(old.arch), lr=1e-3)
        untrained = [n for n, p in sn.model.named_parameters() if p.grad is None]
        assert not untrained, (step, untrained)


def test_grow_like_replays_the_supernets_growth() -> None:
    old, _cands, sn = build(max_ops=1)
    replayed = sn.grow_like(old)
    assert replayed.keys() == sn.initial_state.keys()
    assert all(torch.equal(replayed[k], sn.initial_state[k]) for k in replayed)
    with pytest.raises(ValueError, match="base architecture"):
        sn.grow_like(random_model(arch(shared_depth=0)))
