import pytest
import torch

from growclip_stream.batch import Batch
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp, apply_ops
from growclip_stream.growth.pim import WeightEMA, blend, carry_optimizer_state, ema_inherit, inherit
from growclip_stream.growth.space import Candidate, candidate_set, make_candidate
from growclip_stream.growth.supernet import Supernet, model_from_state
from growclip_stream.model import ArchConfig, ByteTokenizer, ClipLoss, GrowCLIP, TowerConfig
from growclip_stream.optim import build_optimizer
from growclip_stream.train.config import TrainConfig

TOL = 1e-5
OPS = ("widen:image*2", "widen_mlp:text+8", "deepen:text+1")


def arch() -> ArchConfig:
    return ArchConfig(
        image=TowerConfig(16, 1, 32, head_dim=8),
        text=TowerConfig(16, 1, 24, head_dim=8),
        shared=TowerConfig(16, 1, 32, head_dim=8),
        embed_dim=8,
        image_size=8,
        patch_size=4,
        context_length=8,
    )


def batch(a: ArchConfig, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, a.channels, a.image_size, a.image_size, generator=g)
    captions = ["a red shoe", "", "ankle boot", "x" * 50, "bag", "shirt", "trouser", "coat"]
    return Batch(images, ByteTokenizer(a.context_length).encode(captions), tuple(captions))


def trained_model(steps: int = 3) -> tuple[GrowCLIP, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = GrowCLIP(arch())
    opt = build_optimizer(model, TrainConfig(lr=1e-2))
    for s in range(steps):
        b = batch(model.arch, s)
        loss = ClipLoss()(model(b.images, b.tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def same_function(a: GrowCLIP, b: GrowCLIP) -> bool:
    x = batch(a.arch, seed=9)
    with torch.no_grad():
        oa, ob = a(x.images, x.tokens), b(x.images, x.tokens)
    return bool(
        (oa.image_embeds - ob.image_embeds).abs().max() < TOL
        and (oa.text_embeds - ob.text_embeds).abs().max() < TOL
    )


def states_equal(a: GrowCLIP, b: GrowCLIP) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def trained_supernet(model: GrowCLIP) -> tuple[Supernet, list[Candidate]]:
    space = ("widen:image*2", "widen_mlp:text+8", "deepen:text+1", "deepen:shared+1")
    cands = candidate_set(model.arch, GrowthConfig(space=space, max_ops_per_step=3, max_flops_factor=100.0))
    sn = Supernet(model, cands, torch.Generator().manual_seed(0), train_cfg=TrainConfig(), sample_k=1)
    sn.train([batch(model.arch, s) for s in range(3)], steps=3, lr=1e-2)
    return sn, cands


def test_blend_momentum_one_preserves_zero_is_the_supernet() -> None:
    old, _ = trained_model()
    sn, cands = trained_supernet(old)
    for cand in cands:
        kept = blend(sn, cand, 1.0)
        assert kept.arch == cand.arch and same_function(old, kept), cand.name
        assert states_equal(blend(sn, cand, 0.0), sn.extract(cand))
    cand = cands[-1]
    assert not same_function(old, sn.extract(cand))  # the supernet moved, so the two ends differ
    quarter = blend(sn, cand, 0.25).state_dict()
    inherited, trained = blend(sn, cand, 1.0).state_dict(), blend(sn, cand, 0.0).state_dict()
    assert all(
        torch.allclose(quarter[k], 0.25 * inherited[k] + 0.75 * trained[k], atol=1e-6) for k in quarter
    )
    with pytest.raises(ValueError, match="momentum"):
        blend(sn, cand, 1.5)


def test_weight_ema() -> None:
    model, _ = trained_model(0)
    ema = WeightEMA(model, decay=0.5)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    ema.update(model)
    assert all(torch.allclose(ema.state[k], start[k] + 1.0) for k in start)  # 0.5·old + 0.5·(old + 2)
    restored = WeightEMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and all(torch.equal(restored.state[k], ema.state[k]) for k in start)
    grown = apply_ops(model, [GrowthOp.parse("deepen:text+1")])
    with pytest.raises(ValueError, match="reset"):
        ema.update(grown)
    ema.reset(grown)
    ema.update(grown)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(model, decay=1.0)


def test_ema_mode() -> None:
    model, _ = trained_model(2)
    ema = WeightEMA(model, decay=0.9)
    old_weights = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    ema.update(model)
    ops = [GrowthOp.parse(s) for s in reversed(OPS)]  # any order: grown in canonical order
    plain = apply_ops(
        model,
        sorted(ops, key=lambda o: ("widen", "widen_mlp", "deepen").index(o.kind)),
        torch.Generator().manual_seed(5),
    )
    m1 = ema_inherit(model, ema, ops, 1.0, torch.Generator().manual_seed(5))
    assert states_equal(m1, plain) and same_function(model, m1)  # m = 1: plain inheritance
    m0 = ema_inherit(model, ema, ops, 0.0, torch.Generator().manual_seed(5))
    from_ema = model_from_state(model.arch, ema.state)
    assert same_function(from_ema, m0) and not same_function(model, m0)
    assert all(torch.allclose(ema.state[k], old_weights[k] * 1.01) for k in old_weights)
    cfg = GrowthConfig(pim_mode="ema", momentum=1.0)
    cand = make_candidate(model.arch, ops)
    via = inherit(cfg, model=model, candidate=cand, ema=ema, generator=torch.Generator().manual_seed(5))
    assert states_equal(via, plain)
    with pytest.raises(ValueError, match="WeightEMA"):
        inherit(cfg, model=model, candidate=cand)
    with pytest.raises(ValueError, match="supernet"):
        inherit(GrowthConfig(pim_mode="blend"), model=model, candidate=cand, ema=ema)


def test_optimizer_state_survives_growth() -> None:
    old, old_opt = trained_model(3)
    ops = [GrowthOp.parse(s) for s in OPS]
    new = apply_ops(old, ops, torch.Generator().manual_seed(1))
    new_opt = build_optimizer(new, TrainConfig())
    counts = carry_optimizer_state(old, old_opt, new, new_opt, ops)
    old_p, new_p = dict(old.named_parameters()), dict(new.named_parameters())

    def st(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
        return opt.state[p]

    def old_st(name: str) -> dict:
        return st(old_opt, old_p[name])

    def new_st(name: str) -> dict:
        return st(new_opt, new_p[name])

    # untouched shapes keep exactly their state
    unchanged = [n for n in old_p if old_p[n].shape == new_p[n].shape]
    assert {"logit_scale", "shared.blocks.0.attn.qkv.weight", "text.token_embed.weight"} <= set(unchanged)
    for name in unchanged:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(new_st(name)[key], old_st(name)[key]), (name, key)
    # widened: fan-in shares replicate the old statistics; fan-out copies are scaled to the ~1/r
    # share of the gradient each will receive (exp_avg by 1/2, exp_avg_sq by 1/4)
    for name, dim, fan_out in (
        ("image.patch_embed.weight", 0, True),
        ("image.blocks.0.mlp.fc1.weight", 1, False),
        ("image.to_shared.weight", 1, False),
        ("image.blocks.0.ln_1.weight", 0, True),
    ):
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            want = old_st(name)[key] * (0.5**power if fan_out else 1.0)
            a, b = new_st(name)[key].chunk(2, dim=dim)
            assert torch.equal(a, want) and torch.equal(b, want), (name, key)
        assert torch.equal(new_st(name)["step"], old_st(name)["step"])
    qkv_new, qkv_old = (
        new_st("image.blocks.0.attn.qkv.weight")["exp_avg"],
        old_st("image.blocks.0.attn.qkv.weight")["exp_avg"],
    )
    blocks = qkv_new.view(3, 2, 16, 2, 16)  # [q | k | v] x head copy x ... x residual copy x ...
    for c in range(2):
        for d in range(2):  # rows are head copies (fan-out, halved), columns residual shares (kept)
            assert torch.equal(blocks[:, c, :, d, :], qkv_old.view(3, 16, 16) * 0.5)
    # new MLP units: zero statistics, old units kept
    fc1 = new_st("text.blocks.0.mlp.fc1.weight")["exp_avg_sq"]
    assert (
        torch.equal(fc1[:24], old_st("text.blocks.0.mlp.fc1.weight")["exp_avg_sq"])
        and fc1[24:].abs().max() == 0
    )
    fc2 = new_st("text.blocks.0.mlp.fc2.weight")["exp_avg"]
    assert (
        torch.equal(fc2[:, :24], old_st("text.blocks.0.mlp.fc2.weight")["exp_avg"])
        and fc2[:, 24:].abs().max() == 0
    )
    # new block: fresh
    new_block = [n for n in new_p if n.startswith("text.blocks.1.")]
    assert new_block and all(new_p[n] not in new_opt.state for n in new_block)
    assert counts == {
        "unchanged": len(unchanged),
        "grown": len(old_p) - len(unchanged),
        "fresh": len(new_block),
    }
    # the carried optimizer steps, and its state dict round-trips
    b = batch(new.arch)
    ClipLoss()(new(b.images, b.tokens)).backward()
    new_opt.step()
    assert float(new_st("logit_scale")["step"]) == float(old_st("logit_scale")["step"]) + 1
    assert float(new_opt.state[new_p["text.blocks.1.ln_1.weight"]]["step"]) == 1
    build_optimizer(new, TrainConfig()).load_state_dict(new_opt.state_dict())
    with pytest.raises(ValueError, match="do not grow"):
        carry_optimizer_state(old, old_opt, new, build_optimizer(new, TrainConfig()), ops[:1])


def test_carry_into_a_blended_model() -> None:
    old, old_opt = trained_model(2)
    sn, cands = trained_supernet(old)
    cand = cands[-1]
    new = inherit(GrowthConfig(pim_mode="blend", momentum=0.5), model=old, candidate=cand, supernet=sn)
    new_opt = build_optimizer(new, TrainConfig())
    counts = carry_optimizer_state(old, old_opt, new, new_opt, cand.ops)
    assert counts["unchanged"] + counts["grown"] == len(list(old.parameters()))
    b = batch(new.arch)
    ClipLoss()(new(b.images, b.tokens)).backward()
    new_opt.step()


def grads(model: GrowCLIP, b: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    ClipLoss()(model(b.images, b.tokens)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("op", ["widen:image*2", "widen:shared*2", "widen:text*2"])
def test_carried_second_moments_match_the_gradients_the_grown_model_sees(op: str) -> None:
    """exp_avg_sq carried into a widened model is on the scale of the squared gradients it then gets.

    The old optimizer's exp_avg_sq is exactly the squared gradient of one batch (beta2 = 0); the grown
    model computes the same function, so on the same batch its squared gradients are what the carried
    statistics should approximate. Copying them unscaled over-states fan-out rows about r² = 4 times.
    """
    torch.manual_seed(0)
    old = GrowCLIP(arch())
    opt = build_optimizer(old, TrainConfig(lr=1e-9, beta2=0.0, weight_decay=0.0))
    b = batch(old.arch, 3)
    old_grads = grads(old, b)
    opt.step()  # exp_avg_sq = g² now
    ops = [GrowthOp.parse(op)]
    new = apply_ops(old, ops, torch.Generator().manual_seed(1))
    new_opt = build_optimizer(new, TrainConfig())
    carry_optimizer_state(old, opt, new, new_opt, ops)
    new_grads = grads(new, b)
    ratios = {}
    for name, p in new.named_parameters():
        if p.shape == old.state_dict()[name].shape or old_grads[name].abs().sum() == 0:
            continue
        carried = float(new_opt.state[p]["exp_avg_sq"].sum())
        ratios[name] = carried / float(new_grads[name].pow(2).sum())
    assert ratios
    bad = {n: round(r, 2) for n, r in ratios.items() if not 0.4 < r < 2.5}
    assert not bad, bad
