import random

import pytest

from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp
from growclip_stream.growth.space import Candidate, candidate_set, make_candidate, rejected_candidates
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig

SPACE = (
    "deepen:image+1",
    "deepen:text+1",
    "deepen:shared+1",
    "widen:image*2",
    "widen:text*2",
    "widen_mlp:image+8",
    "widen_mlp:text+8",
    "widen_mlp:shared+8",
)


def arch(shared_depth: int = 0) -> ArchConfig:
    t = TowerConfig(16, 1, 32, head_dim=8)
    return ArchConfig(
        image=t,
        text=t,
        shared=TowerConfig(16, shared_depth, 32, head_dim=8),
        embed_dim=8,
        image_size=8,
        patch_size=4,
        context_length=8,
    )


def cfg(**kw: object) -> GrowthConfig:
    base: dict[str, object] = {"space": SPACE, "max_ops_per_step": 2, "max_flops_factor": 100.0}
    base.update(kw)
    return GrowthConfig(**base)  # type: ignore[arg-type]


def names(cands: list[Candidate]) -> list[str]:
    return [c.name for c in cands]


def test_candidates_are_consistent_and_add_parameters() -> None:
    a = arch()
    cands = candidate_set(a, cfg())
    assert cands
    for c in cands:
        assert make_candidate(a, c.ops) == c  # ops grow `a` into c.arch
        assert c.added_params(a) > 0 and c.added_flops(a) > 0
        assert c.params == c.arch.num_params() == sum(p.numel() for p in GrowCLIP(c.arch).parameters())
        assert c.added_params(a) == c.params - a.num_params()
    assert len({c.arch for c in cands}) == len(cands)


def test_flops_factor_bound() -> None:
    a = arch()
    loose = candidate_set(a, cfg())
    bound = 1.9
    tight = candidate_set(a, cfg(max_flops_factor=bound))
    assert all(c.flops <= bound * a.flops_per_sample() for c in tight)
    dropped = [c for c in loose if c.flops_factor(a) > bound]
    assert dropped and not set(names(dropped)) & set(names(tight))
    assert names(tight) == [c.name for c in loose if c.flops_factor(a) <= bound]
    verdicts = {r["candidate"]: r["verdict"] for r in rejected_candidates(a, cfg(max_flops_factor=bound))}
    assert all("max_flops_factor" in verdicts[c.name] for c in dropped)


def test_max_params_bound() -> None:
    a = arch()
    cap = a.num_params() + 3000
    cands = candidate_set(a, cfg(max_params=cap))
    assert cands and all(c.params <= cap for c in cands)
    assert any(c.params > cap for c in candidate_set(a, cfg()))
    assert candidate_set(a, cfg(max_params=a.num_params())) == []


def test_no_op_rule() -> None:
    empty_shared = candidate_set(arch(shared_depth=0), cfg())
    assert "widen_mlp:shared+8" not in names(empty_shared)  # no blocks: adds nothing
    assert "widen_mlp:image+8,widen_mlp:shared+8" not in names(empty_shared)  # one op contributes nothing
    assert "widen_mlp:shared+8,deepen:shared+1" in names(empty_shared)  # the new block gets the bigger MLP
    assert "widen_mlp:shared+8" in names(candidate_set(arch(shared_depth=1), cfg()))


def test_max_ops_per_step_and_distinct_tower_kinds() -> None:
    a = arch(shared_depth=1)
    singles = candidate_set(a, cfg(max_ops_per_step=1))
    assert sorted(names(singles)) == sorted(SPACE)
    pairs = candidate_set(a, cfg(max_ops_per_step=2))
    triples = candidate_set(a, cfg(max_ops_per_step=3))
    assert max(len(c.ops) for c in pairs) == 2 and max(len(c.ops) for c in triples) == 3
    assert len(singles) < len(pairs) < len(triples)
    for c in triples:
        assert len({(op.tower, op.kind) for op in c.ops}) == len(c.ops)
    two_deepens = cfg(space=("deepen:image+1", "deepen:image+2"), max_ops_per_step=2)
    assert names(candidate_set(a, two_deepens)) == ["deepen:image+1", "deepen:image+2"]


def test_deterministic_and_canonical() -> None:
    a = arch()
    first = candidate_set(a, cfg(max_ops_per_step=3))
    shuffled = list(SPACE)
    random.Random(0).shuffle(shuffled)
    assert candidate_set(a, cfg(max_ops_per_step=3)) == first
    assert candidate_set(a, cfg(max_ops_per_step=3, space=tuple(shuffled))) == first
    assert [len(c.ops) for c in first] == sorted(len(c.ops) for c in first)
    ops = [
        GrowthOp.parse("deepen:image+1"),
        GrowthOp.parse("widen_mlp:text+8"),
        GrowthOp.parse("widen:text*2"),
    ]
    c1, c2 = make_candidate(a, ops), make_candidate(a, reversed(ops))
    assert c1 == c2 and c1.name == "widen:text*2,widen_mlp:text+8,deepen:image+1"
    assert Candidate((), a).name == "base"


@pytest.mark.parametrize(
    ("field", "value"),
    [("space", ()), ("space", ("widen:image+2",)), ("max_ops_per_step", 0), ("selection_rule", "best")],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        GrowthConfig(**{field: value})  # type: ignore[arg-type]
