import json
import math

import pytest
import torch

from growclip_stream.batch import Batch
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp
from growclip_stream.growth.selection import CandidateScore, evaluate, rank, score_candidates, select
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


def fake(name: str, gain: float, added_gflops: float, rule: str = "gain_per_flop") -> CandidateScore:
    added = int(added_gflops * 1e9)
    score = gain / added_gflops if rule == "gain_per_flop" else -(4.0 - gain)
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
        score=score,
        rule=rule,
        samples=16,
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
    scores = score_candidates(sn, cands, hold, rule="gain_per_flop")
    assert [s.name for s in scores] == [c.name for c in cands]
    for s, c in zip(scores, cands, strict=True):
        assert s.candidate == c and s.ops == c.ops and s.params == c.params
        assert s.added_flops == c.added_flops(a) > 0 and s.samples == 16
        # before supernet training every candidate is the old model: same loss and proxy
        assert abs(s.val_loss - base.loss) < 1e-4 and s.zero_shot_top1 == base.top1
        assert abs(s.base_loss - base.loss) < 1e-4
        assert math.isclose(s.score, s.gain / (s.added_flops / 1e9))
    sn.train(hold * 2, steps=4, lr=3e-3)
    trained = score_candidates(sn, cands, hold, base_loss=base.loss, rule="min_loss")
    assert all(t.base_loss == base.loss and t.score == -t.val_loss for t in trained)
    assert any(abs(t.val_loss - base.loss) > 1e-3 for t in trained)
    winner = select(trained)
    record = json.loads(json.dumps([s.to_dict() for s in trained] + [winner.to_dict()], allow_nan=False))
    assert record[-1]["reason"].startswith("won: lowest held-out loss")
    assert set(record[0]) >= {
        "name",
        "ops",
        "params",
        "flops",
        "added_flops",
        "val_loss",
        "zero_shot_top1",
        "score",
    }
    with pytest.raises(ValueError, match="selection rule"):
        score_candidates(sn, cands, hold, rule="best")


def test_gain_per_flop_prefers_cheap_gains() -> None:
    big = fake("widen:text*2", gain=0.10, added_gflops=1.0)  # 0.1 / GFLOP
    cheap = fake("deepen:image+1", gain=0.05, added_gflops=0.1)  # 0.5 / GFLOP
    worse = fake("widen_mlp:text+8", gain=-0.01, added_gflops=0.01)
    assert [s.name for s in rank([big, worse, cheap])] == [
        "deepen:image+1",
        "widen:text*2",
        "widen_mlp:text+8",
    ]
    won = select([big, worse, cheap])
    assert won.name == "deepen:image+1"
    assert won.reason.startswith(
        "won: lowest loss per added GFLOP: 0.5/GFLOP vs next 0.1/GFLOP (widen:text*2)"
    )


def test_gain_per_flop_without_any_gain_takes_the_lowest_loss() -> None:
    # by raw score (-0.01 vs -0.1) the expensive one would win, though its loss is higher
    expensive = fake("widen:text*2", gain=-0.10, added_gflops=10.0)
    cheap = fake("deepen:image+1", gain=-0.01, added_gflops=0.1)
    assert expensive.score > cheap.score
    won = select([expensive, cheap])
    assert won.name == "deepen:image+1" and "no candidate beats the base" in won.reason


def test_min_loss_and_ties() -> None:
    a = fake("widen:text*2", gain=0.2, added_gflops=1.0, rule="min_loss")
    b = fake("deepen:image+1", gain=0.1, added_gflops=0.1, rule="min_loss")
    assert select([b, a]).name == "widen:text*2"
    tie_big = fake("widen:text*2", gain=0.1, added_gflops=1.0, rule="min_loss")
    assert select([tie_big, b]).name == "deepen:image+1"  # equal loss: fewer added FLOPs
    only = select([b])
    assert "the only candidate" in only.reason
    with pytest.raises(ValueError):
        select([])


def test_non_finite_scores_are_json_safe() -> None:
    nan = fake("deepen:image+1", gain=float("nan"), added_gflops=1.0)
    d = nan.to_dict()
    assert d["val_loss"] is None and d["score"] is None
    json.dumps(d, allow_nan=False)
    assert select([nan, fake("widen:text*2", gain=0.01, added_gflops=1.0)]).name == "widen:text*2"


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
