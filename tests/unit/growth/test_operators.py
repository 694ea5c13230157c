import random

import pytest
import torch

from growclip_stream.growth.operators import GrowthOp, apply_op, apply_ops, grow_arch
from growclip_stream.model import ArchConfig, ByteTokenizer, ClipLoss, GrowCLIP, TowerConfig
from tests.helpers import operator_arch as base_arch
from tests.helpers import random_model

TOWERS = ("image", "text", "shared")
TOL = 1e-5


def inputs(arch: ArchConfig, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, arch.channels, arch.image_size, arch.image_size, generator=g)
    captions = ["a red shoe", "", "ankle boot ✓", "x" * 50, "bag", "shirt", "trouser", "é€𝄞"]
    return images, ByteTokenizer(arch.context_length).encode(captions)


def assert_same_function(old: GrowCLIP, new: GrowCLIP) -> None:
    images, tokens = inputs(old.arch)
    with torch.no_grad():
        assert (new.encode_image(images) - old.encode_image(images)).abs().max() < TOL
        assert (new.encode_text(tokens) - old.encode_text(tokens)).abs().max() < TOL


def snapshot(model: GrowCLIP) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


ALL_OPS = [
    f"{kind}:{tower}{amount}"
    for tower in TOWERS
    for kind, amount in (
        ("deepen", "+1"),
        ("deepen", "+2"),
        ("widen", "*2"),
        ("widen", "*3"),
        ("widen_mlp", "+8"),
    )
]


@pytest.mark.parametrize("shared_depth", [0, 1])
@pytest.mark.parametrize("op_text", ALL_OPS)
def test_every_op_preserves_the_function(op_text: str, shared_depth: int) -> None:
    arch = base_arch(shared_depth)
    old = random_model(arch)
    before = snapshot(old)
    op = GrowthOp.parse(op_text)
    new = apply_op(old, op, torch.Generator().manual_seed(7))

    assert new.arch == grow_arch(arch, op)
    assert new.arch.embed_dim == arch.embed_dim
    assert new.arch.num_params() == sum(p.numel() for p in new.parameters())
    assert_same_function(old, new)
    assert all(torch.equal(before[k], v) for k, v in old.state_dict().items())  # input untouched
    no_blocks = op.kind == "widen_mlp" and arch.tower(op.tower).depth == 0  # only the config changes
    if no_blocks:
        assert new.arch.num_params() == arch.num_params()
    else:
        assert new.arch.num_params() > arch.num_params()
        assert new.arch.flops_per_sample() > arch.flops_per_sample()
    if op.kind == "widen":
        cfg = new.arch.tower(op.tower)
        assert cfg.heads == arch.tower(op.tower).heads * op.amount and cfg.head_dim == 8


def random_chain(rng: random.Random, n: int) -> list[GrowthOp]:
    ops = []
    for _ in range(n):
        kind = rng.choice(["deepen", "widen", "widen_mlp"])
        amount = {"deepen": rng.randint(1, 2), "widen": 2, "widen_mlp": rng.choice([4, 8, 16])}[kind]
        ops.append(GrowthOp(kind, rng.choice(TOWERS), amount))  # type: ignore[arg-type]
    return ops


@pytest.mark.parametrize("seed", range(4))
def test_random_chain_preserves_the_function(seed: int) -> None:
    arch = base_arch(seed % 2)
    old = random_model(arch, seed)
    ops = random_chain(random.Random(seed), 6)
    new = apply_ops(old, ops, torch.Generator().manual_seed(seed))
    expected = arch
    for op in ops:
        expected = grow_arch(expected, op)
    assert new.arch == expected
    assert new.arch.num_params() == sum(p.numel() for p in new.parameters())
    assert_same_function(old, new)
    # apply_ops is apply_op in sequence, drawing from the same generator
    g, step = torch.Generator().manual_seed(seed), old
    for op in ops:
        step = apply_op(step, op, g)
    assert all(
        torch.equal(a, b) for a, b in zip(step.state_dict().values(), new.state_dict().values(), strict=True)
    )


def test_apply_ops_without_ops_returns_an_independent_copy() -> None:
    old = random_model(base_arch())
    copy = apply_ops(old, [])
    assert copy is not old and copy.arch == old.arch
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(old.parameters()))


def test_growth_keeps_dtype() -> None:
    old = random_model(base_arch()).double()
    new = apply_op(old, GrowthOp.parse("widen:shared*2"))
    assert all(p.dtype == torch.float64 for p in new.parameters())


# ----------------------------------------------------------------------------- grown models train


def copies(t: torch.Tensor, dim: int, r: int) -> list[torch.Tensor]:
    return list(t.chunk(r, dim=dim))


def replicated_tensors(model: GrowCLIP, tower: str) -> list[tuple[str, int]]:
    """(name, dim) of tensors whose r copies are exactly equal right after widen (fan-out rows)."""
    names = {
        "image": [("image.patch_embed.weight", 0), ("image.class_token", 0), ("image.pos_embed", 1)],
        "text": [("text.token_embed.weight", 1), ("text.pos_embed", 1)],
        "shared": [("image.to_shared.weight", 0), ("text.to_shared.weight", 0), ("ln_post.weight", 0)],
    }[tower]
    for i in range(model.arch.tower(tower).depth):  # type: ignore[arg-type]
        names += [(f"{tower}.blocks.{i}.mlp.fc2.weight", 0), (f"{tower}.blocks.{i}.ln_1.weight", 0)]
    return names


def train(model: GrowCLIP, steps: int = 10) -> list[float]:
    images, tokens = inputs(model.arch, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = ClipLoss()(model(images, tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "op_text",
    [f"{k}:{t}{a}" for t in TOWERS for k, a in (("widen", "*2"), ("widen_mlp", "+8"), ("deepen", "+1"))],
)
def test_grown_model_trains_and_new_units_diverge(op_text: str) -> None:
    op = GrowthOp.parse(op_text)
    old = random_model(base_arch(1))
    before = snapshot(old)
    new = apply_op(old, op, torch.Generator().manual_seed(3))
    cfg_old = old.arch.tower(op.tower)
    sd = new.state_dict()

    if op.kind == "widen":
        watched = replicated_tensors(new, op.tower)
        for name, dim in watched:  # exact copies right after growth...
            a, b = copies(sd[name], dim, op.amount)
            assert torch.equal(a, b), name
    elif op.kind == "widen_mlp":
        watched = [(f"{op.tower}.blocks.{i}.mlp.fc2.weight", 1) for i in range(cfg_old.depth)]
        assert all(sd[n][:, cfg_old.mlp_hidden :].abs().max() == 0 for n, _ in watched)
    else:
        p = f"{op.tower}.blocks.{cfg_old.depth}."
        watched = [(p + "attn.out.weight", 0), (p + "mlp.fc2.weight", 0)]
        assert all(sd[n].abs().max() == 0 for n, _ in watched)

    losses = train(new)
    assert losses[-1] < losses[0] - 0.05, losses
    sd = new.state_dict()
    for name, dim in watched:  # ... drift apart; new units come alive
        if op.kind == "widen":
            a, b = copies(sd[name], dim, op.amount)
            assert (a - b).abs().max() > 1e-3, name
        elif op.kind == "widen_mlp":
            assert sd[name][:, cfg_old.mlp_hidden :].abs().min() > 0, name
        else:
            assert sd[name].abs().max() > 1e-3, name
    assert all(torch.equal(before[k], v) for k, v in old.state_dict().items())  # no storage shared


# ----------------------------------------------------------------------------- GrowthOp


@pytest.mark.parametrize("text", ["deepen:image+1", "widen:text*2", "widen_mlp:shared+64", "widen:shared*3"])
def test_parse_round_trips(text: str) -> None:
    op = GrowthOp.parse(text)
    assert str(op) == text
    assert GrowthOp.parse(str(op)) == op


@pytest.mark.parametrize(
    "text",
    [
        "",
        "deepen",
        "deepen:image",
        "deepen:image+",
        "deepen:image*1",
        "widen:text+2",
        "widen:text*1",
        "deepen:image+0",
        "widen_mlp:text+0",
        "deepen:image+-1",
        "grow:image+1",
        "deepen:vision+1",
        "Deepen:image+1",
        "deepen:image+1;",
    ],
)
def test_parse_rejects_bad_strings(text: str) -> None:
    with pytest.raises(ValueError, match=r"growth operator|GrowthOp\."):
        GrowthOp.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="amount"):
        GrowthOp("widen", "image", 1)
    with pytest.raises(ValueError, match="tower"):
        GrowthOp("deepen", "audio", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        GrowthOp("shrink", "image", 1)  # type: ignore[arg-type]


def test_grow_arch_is_pure() -> None:
    arch = base_arch(0)
    assert grow_arch(arch, GrowthOp.parse("deepen:shared+2")).shared.depth == 2
    assert grow_arch(arch, GrowthOp.parse("widen:image*2")).image.width == 32
    assert grow_arch(arch, GrowthOp.parse("widen_mlp:text+8")).text.mlp_hidden == 32
    assert arch == base_arch(0)


def test_new_mlp_units_read_the_residual_at_the_models_init_scale() -> None:
    """A new MLP unit's input weights are drawn at the fan-in scale the model itself is initialised
    with (std width^-0.5), not a fixed 0.02 that is ~10x too small at width 64 and leaves the new
    units almost silent for their first steps."""
    arch = ArchConfig(
        image=TowerConfig(64, 2, 64, head_dim=16), text=TowerConfig(64, 2, 64, head_dim=16),
        shared=TowerConfig(64, 0, 64, head_dim=16), embed_dim=32,
    )  # fmt: skip
    model = random_model(arch)
    grown = apply_op(model, GrowthOp.parse("widen_mlp:image+256"), torch.Generator().manual_seed(0))
    for block in grown.image.blocks:
        new_in = block.mlp.fc1.weight[64:]  # (new units, width)
        assert new_in.shape == (256, 64)
        assert abs(new_in.std().item() - 64**-0.5) < 0.1 * 64**-0.5
        assert block.mlp.fc2.weight[:, 64:].abs().max() == 0  # they write nothing yet
    assert_same_function(model, grown)
