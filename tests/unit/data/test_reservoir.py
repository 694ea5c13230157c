import pytest
import torch

from growclip_stream.data.pipeline import Sample
from growclip_stream.data.reservoir import Reservoir
from growclip_stream.train.loop import LoopConfig

IMAGE = torch.zeros(1, 2, 2)


def sample(i: int) -> Sample:
    return Sample(str(i), IMAGE, f"caption {i}")


def test_bounded() -> None:
    buf = Reservoir(capacity=50, seed=0)
    for i in range(1000):
        buf.add(sample(i))
        assert len(buf) == min(i + 1, 50)
    assert buf.seen == 1000 and len(buf.samples) == 50
    assert len({s.id for s in buf.samples}) == 50
    empty = Reservoir(capacity=0)
    empty.add(sample(0))
    assert len(empty) == 0 and empty.sample(3) == []
    with pytest.raises(ValueError, match="capacity"):
        Reservoir(capacity=-1)


def test_roughly_uniform_over_the_stream() -> None:
    quarters = [0, 0, 0, 0]
    n, cap, seeds = 2000, 100, 40
    for seed in range(seeds):
        buf = Reservoir(capacity=cap, seed=seed)
        for i in range(n):
            buf.add(sample(i))
        for s in buf.samples:
            quarters[int(s.id) * 4 // n] += 1
    expected = seeds * cap / 4  # 1000 per quarter of the stream
    assert all(abs(q - expected) < 0.1 * expected for q in quarters), quarters


def test_sample() -> None:
    buf = Reservoir(capacity=10, seed=1)
    for i in range(10):
        buf.add(sample(i))
    got = buf.sample(4)
    assert len(got) == 4 and len({s.id for s in got}) == 4
    assert len(buf.sample(50)) == 10
    assert {s.id for s in buf.sample(10, exclude_ids={"0", "1"})} == {str(i) for i in range(2, 10)}


def test_replay_config_fields_are_validated() -> None:
    cfg = LoopConfig()
    assert cfg.replay_fraction == 0.25 and cfg.replay_capacity > 0
    for field, value in (("replay_fraction", 1.0), ("replay_fraction", -0.1), ("replay_capacity", -1)):
        with pytest.raises(ValueError, match=field):
            LoopConfig(**{field: value})  # type: ignore[arg-type]
