import pytest
import torch

from growclip_stream.data.pipeline import Sample
from growclip_stream.data.replay import ReplayBuffer
from growclip_stream.growth.config import GrowthConfig

IMAGE = torch.zeros(1, 2, 2)


def sample(i: int) -> Sample:
    return Sample(str(i), IMAGE, f"caption {i}")


def test_bounded() -> None:
    buf = ReplayBuffer(capacity=50, seed=0)
    for i in range(1000):
        buf.add(sample(i))
        assert len(buf) == min(i + 1, 50)
    assert buf.seen == 1000 and len(buf.samples) == 50
    assert len({s.id for s in buf.samples}) == 50
    empty = ReplayBuffer(capacity=0)
    empty.add(sample(0))
    assert len(empty) == 0 and empty.sample(3) == []
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=-1)


def test_roughly_uniform_over_the_stream() -> None:
    quarters = [0, 0, 0, 0]
    n, cap, seeds = 2000, 100, 40
    for seed in range(seeds):
        buf = ReplayBuffer(capacity=cap, seed=seed)
        for i in range(n):
            buf.add(sample(i))
        for s in buf.samples:
            quarters[int(s.id) * 4 // n] += 1
    expected = seeds * cap / 4  # 1000 per quarter of the stream
    assert all(abs(q - expected) < 0.1 * expected for q in quarters), quarters


def test_sample() -> None:
    buf = ReplayBuffer(capacity=10, seed=1)
    for i in range(10):
        buf.add(sample(i))
    got = buf.sample(4)
    assert len(got) == 4 and len({s.id for s in got}) == 4
    assert len(buf.sample(50)) == 10
    assert {s.id for s in buf.sample(10, exclude_ids={"0", "1"})} == {str(i) for i in range(2, 10)}


def test_mix_replaces_a_fraction_without_duplicates() -> None:
    buf = ReplayBuffer(capacity=100, seed=0)
    for i in range(100):
        buf.add(sample(i))
    fresh = [sample(i) for i in range(90, 98)]  # ids 90..97 are also in the reservoir
    mixed = buf.mix(fresh, 0.25)
    assert len(mixed) == 8 and mixed[:6] == fresh[:6]
    replayed = mixed[6:]
    assert all(s not in fresh for s in replayed)
    assert len({s.id for s in mixed}) == 8  # no id twice in a contrastive batch
    assert buf.mix(fresh, 0.0) == fresh
    assert ReplayBuffer(10).mix(fresh, 0.5) == fresh  # nothing to replay yet
    small = ReplayBuffer(10)
    small.add(sample(1000))
    part = small.mix(fresh, 0.5)  # wants 4, has 1: the rest stays fresh
    assert len(part) == 8 and part[:4] == fresh[:4] and part[4].id == "1000" and part[5:] == fresh[5:]
    with pytest.raises(ValueError, match="fraction"):
        buf.mix(fresh, 1.5)


def test_config_fields() -> None:
    cfg = GrowthConfig()
    assert cfg.replay_fraction == 0.25 and cfg.replay_capacity > 0
    for field, value in (("replay_fraction", 1.0), ("replay_fraction", -0.1), ("replay_capacity", -1)):
        with pytest.raises(ValueError, match=field):
            GrowthConfig(**{field: value})  # type: ignore[arg-type]
