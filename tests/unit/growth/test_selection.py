import json
import math

import pytest
import torch

from growclip_stream.batch import Batch
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp
from growclip_stream.growth.selection import (
    CandidateScore,
    bootstrap_se,
    evaluate,
    rank,
    score_candidates,
    select,
)
from growclip_stream.growth.space import candidate_set
from growclip_stream.growth.supernet import Supernet
from growclip_stream.model import ArchConfig, ByteTokenizer, ClipLoss, ClipOutput, GrowCLIP, TowerConfig
from growclip_stream.model.clip import same_caption
from growclip_stream.train.config import TrainConfig


def arch() -> ArchConfig:
    t = TowerConfig(16, 1, 32, head_dim=8)
    return ArchConfig(
        image=t,
        text=t,
        shared=TowerConfig(16, 0, 32, head_dim=8),
        embed_dim=8,
        image_size=8,
        patch_size=4,
        context_length=8,
    )


def batches(a: ArchConfig, n: int = 2, size: int = 8) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    tok = ByteTokenizer(a.context_length)
    out = []
    for b in range(n):
        images = torch.randn(size, a.channels, a.image_size, a.image_size, generator=g)
        ids = tuple(f"{b}-{i}" for i in range(size))
        out.append(Batch(images, tok.encode([f"caption {i}" for i in ids]), ids))
    return out


def fake(
    name: str, gain: float, added_gflops: float, rule: str = "gain", se: float = 0.001, n: int = 400
) -> CandidateScore:
    """A score whose per-sample losses have mean gain `gain` over a base of 4.0 and spread ~se·sqrt(n)."""
    g = torch.Generator().manual_seed(abs(hash(name)) % 2**31)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    noise = (noise - noise.mean()) / noise.std() * se * n**0.5
    per_sample = 4.0 - gain + noise
    added = int(added_gflops * 1e9)
    return CandidateScore(
        name=name,
        ops=(GrowthOp.parse(name),),
        params=1000,
        flops=2 * added,
        added_params=100,
        added_flops=added,
        val_loss=4.0 - gain,
        zero_shot_top1=0.5,
        base_loss=4.0,
        gain=gain,
        gain_se=se,
        margin=max(3 * se, 1e-3),
        score=gain if rule == "gain" else -(4.0 - gain),
        rule=rule,
        samples=n,
        per_sample=per_sample,
    )


def test_evaluate_loss_and_retrieval_proxy() -> None:
    a = arch()
    bs = batches(a)
    eye = torch.eye(8)

    def perfect(images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        return ClipOutput(eye, eye, torch.tensor(10.0))

    def shifted(images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        return ClipOutput(eye, eye.roll(1, dims=0), torch.tensor(10.0))

    m = evaluate(perfect, bs, torch.device("cpu"))
    assert m.top1 == 1.0 and m.samples == 16
    assert math.isclose(m.loss, float(ClipLoss()(perfect(bs[0].images, bs[0].tokens))), rel_tol=1e-6)
    assert evaluate(shifted, bs, torch.device("cpu")).top1 == 0.0
    with pytest.raises(ValueError, match="no held-out samples"):
        evaluate(perfect, [], torch.device("cpu"))


def test_scores_every_candidate_and_records_json() -> None:
    a = arch()
    torch.manual_seed(0)
    old = GrowCLIP(a)
    cands = candidate_set(a, GrowthConfig(space=("deepen:image+1", "widen_mlp:text+8", "widen:text*2")))
    sn = Supernet(old, cands, torch.Generator().manual_seed(0), train_cfg=TrainConfig())
    hold = batches(a)
    base = evaluate(old, hold, torch.device("cpu"))
    scores = score_candidates(sn, cands, hold)
    assert [s.name for s in scores] == [c.name for c in cands]
    for s, c in zip(scores, cands, strict=True):
        assert s.candidate == c and s.ops == c.ops and s.params == c.params
        assert s.added_flops == c.added_flops(a) > 0 and s.samples == 16
        # before supernet training every candidate is the old model: same loss and proxy, no gain
        assert abs(s.val_loss - base.loss) < 1e-4 and s.zero_shot_top1 == base.top1
        assert abs(s.base_loss - base.loss) < 1e-4 and not s.beats_base
    assert select(scores).declined
    sn.train(hold * 2, steps=4, lr=3e-3)
    trained = score_candidates(sn, cands, hold, rule="min_loss", decline_z=0.0, min_gain=0.0)
    assert all(t.score == -t.val_loss for t in trained)
    assert any(abs(t.val_loss - base.loss) > 1e-3 for t in trained)
    record = json.loads(json.dumps([s.to_dict() for s in trained], allow_nan=False))
    assert set(record[0]) >= {
        "name", "ops", "params", "flops", "added_flops", "val_loss", "zero_shot_top1", "gain", "gain_se",
        "margin", "beats_base", "score",
    }  # fmt: skip
    with pytest.raises(ValueError, match="selection rule"):
        score_candidates(sn, cands, hold, rule="best")


def test_per_sample_losses_average_to_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    tokens = ByteTokenizer(8).encode(["a", "b", "a", "c", "b", "d"])
    for positives in (None, same_caption(tokens)):
        out = ClipOutput(emb[0], emb[1], torch.tensor(7.0), positives=positives)
        per = ClipLoss().per_sample(out)
        assert per.shape == (6,) and torch.allclose(per.mean(), ClipLoss()(out))


def test_bootstrap_se_matches_the_standard_error() -> None:
    diffs = torch.randn(2000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    se = bootstrap_se(diffs, 2000, seed=1)
    assert abs(se - float(diffs.std()) / 2000**0.5) < 0.1 * se


def test_gain_is_not_biased_toward_cheap_operators() -> None:
    """Both candidates clearly beat the base; the one with twice the gain wins although it adds ten
    times the FLOPs (gain per FLOP would pick the cheap one: 0.5 vs 0.1 per GFLOP)."""
    big = fake("widen:text*2", gain=0.10, added_gflops=1.0)
    cheap = fake("deepen:image+1", gain=0.05, added_gflops=0.1)
    worse = fake("widen_mlp:text+8", gain=-0.01, added_gflops=0.01)
    assert [s.name for s in rank([cheap, worse, big])] == [
        "widen:text*2",
        "deepen:image+1",
        "widen_mlp:text+8",
    ]
    won = select([cheap, worse, big]).winner
    assert won is not None and won.name == "widen:text*2"
    assert won.reason.startswith("won: largest held-out gain over the base vs next deepen:image+1")


def test_cost_breaks_only_ties_the_data_cannot_resolve() -> None:
    big = fake("widen:text*2", gain=0.100, added_gflops=1.0, se=0.01)
    cheap = fake("deepen:image+1", gain=0.095, added_gflops=0.1, se=0.01)  # within noise of big
    won = select([big, cheap]).winner
    assert won is not None and won.name == "deepen:image+1" and "within noise" in won.reason
    mn = select(
        [
            fake("widen:text*2", 0.1, 1.0, "min_loss", 0.01),
            fake("deepen:image+1", 0.095, 0.1, "min_loss", 0.01),
        ]
    )
    assert mn.winner is not None and mn.winner.name == "widen:text*2"  # min_loss: no parsimony


def test_declines_when_no_gain_exceeds_its_noise() -> None:
    noisy = fake("widen:text*2", gain=0.02, added_gflops=1.0, se=0.01)  # 2 s.e.: not enough
    worse = fake("deepen:image+1", gain=-0.05, added_gflops=0.1)
    chosen = select([noisy, worse])
    assert chosen.declined and chosen.winner is None
    assert (
        chosen.reason.startswith("declined: no candidate beats the base") and "widen:text*2" in chosen.reason
    )
    with pytest.raises(ValueError):
        select([])


def test_non_finite_scores_are_json_safe() -> None:
    nan = fake("deepen:image+1", gain=float("nan"), added_gflops=1.0)
    d = nan.to_dict()
    assert d["gain"] is None and d["score"] is None and d["beats_base"] is False
    json.dumps(d, allow_nan=False)
    won = select([nan, fake("widen:text*2", gain=0.05, added_gflops=1.0)]).winner
    assert won is not None and won.name == "widen:text*2"


def test_search_picks_a_planted_better_candidate() -> None:
    """One candidate's new block is trained (alone, the shared weights frozen) to fit the held-out
    data; every other candidate computes exactly the base's function. The scores find it."""
    a = arch()
    torch.manual_seed(0)
    old = GrowCLIP(a)
    space = ("deepen:image+1", "deepen:text+1", "widen_mlp:text+8", "widen:image*2")
    cands = candidate_set(a, GrowthConfig(space=space, max_ops_per_step=1, max_flops_factor=100.0))
    sn = Supernet(old, cands, torch.Generator().manual_seed(0), train_cfg=TrainConfig())
    planted = next(c for c in cands if c.name == "deepen:text+1")
    new_block = [p for n, p in sn.model.named_parameters() if n.startswith("text.blocks.1.")]
    opt = torch.optim.Adam(new_block, lr=1e-2)
    hold = batches(a, n=4)
    for _ in range(60):
        for b in hold:
            opt.zero_grad()
            ClipLoss()(sn.forward_candidate(planted, b.images, b.tokens)).backward()
            opt.step()
    chosen = select(score_candidates(sn, cands, hold))
    assert chosen.winner is not None and chosen.winner.name == "deepen:text+1", chosen.reason
    assert chosen.winner.gain > chosen.winner.margin > 0


def test_retrieving_an_identical_caption_is_a_hit() -> None:
    # two images share a caption; their texts embed alike, so each image's nearest text may be the
    # other's: that is right, not a miss
    a = arch()
    tokens = ByteTokenizer(a.context_length).encode(["a bag", "a bag", "a coat", "a shoe"])
    images = torch.zeros(4, a.channels, a.image_size, a.image_size)
    cls = torch.eye(3)[[0, 0, 1, 2]]  # (4, 3): one embedding per caption

    def tied(images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        # image 1 retrieves text 0 (argmax takes the first of a tie): the same caption as its own
        return ClipOutput(cls, cls, torch.tensor(10.0), positives=same_caption(tokens))

    m = evaluate(tied, [Batch(images, tokens, ("0", "1", "2", "3"))], torch.device("cpu"))
    assert m.top1 == 1.0
