import math
import random

import pytest

from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.plateau import LossSmoother, PlateauState, PlateauTrigger, slope


def smoothed(losses: list[float], decay: float = 0.9, window: int = 100) -> LossSmoother:
    s = LossSmoother(decay, window)
    for loss in losses:
        s.update(loss)
    return s


def noisy(curve: list[float], sigma: float = 0.02, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [y + rng.gauss(0, sigma) for y in curve]


def test_slope_is_least_squares() -> None:
    assert slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert slope([5.0] * 10) == pytest.approx(0.0)
    assert slope([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        slope([1.0])


def test_fires_once_the_curve_flattens() -> None:
    trig = PlateauTrigger(patience=100, threshold=1e-4)
    curve = noisy([3.0 + 2.0 * math.exp(-t / 60) for t in range(1000)])
    early = smoothed(curve[:200])
    assert not trig.fires(PlateauState(tuple(early.values), steps_since_growth=200))  # still falling
    late = smoothed(curve)
    s = trig.slope(PlateauState(tuple(late.values), 1000))
    assert s is not None and s > -1e-4
    assert trig.fires(PlateauState(tuple(late.values), steps_since_growth=1000))


def test_does_not_fire_while_falling_steeply() -> None:
    trig = PlateauTrigger(patience=100, threshold=1e-4)
    curve = noisy([5.0 - 0.002 * t for t in range(600)], sigma=0.05)
    s = smoothed(curve)
    assert not trig.fires(PlateauState(tuple(s.values), steps_since_growth=600))


def test_rising_loss_counts_as_a_plateau() -> None:
    s = smoothed([3.0 + 0.001 * t for t in range(200)])
    assert PlateauTrigger(patience=50, threshold=1e-4).fires(PlateauState(tuple(s.values), 200))


def test_not_before_patience() -> None:
    trig = PlateauTrigger(patience=100, threshold=1e-4)
    flat = smoothed([2.0] * 300)
    assert not trig.fires(PlateauState(tuple(flat.values), steps_since_growth=99))
    assert trig.fires(PlateauState(tuple(flat.values), steps_since_growth=100))
    short = smoothed([2.0] * 99)
    assert not trig.fires(PlateauState(tuple(short.values), steps_since_growth=10_000))  # too little history
    assert trig.slope(PlateauState(tuple(short.values), 0)) is None


def test_smoother() -> None:
    s = LossSmoother(decay=0.5, window=3)
    assert s.update(float("nan")) is None  # non-finite losses are skipped
    assert s.update(4.0) == 4.0
    assert s.update(2.0) == 3.0
    s.update(float("inf"))
    s.update(3.0)
    s.update(3.0)
    assert list(s.values) == [3.0, 3.0, 3.0]  # bounded window
    restored = LossSmoother(0.5, 3)
    restored.load_state_dict(s.state_dict())
    assert restored.current == s.current and list(restored.values) == list(s.values)


def test_config_fields() -> None:
    cfg = GrowthConfig(plateau_patience=50, plateau_threshold=1e-3, plateau_smoothing=0.8)
    trig = PlateauTrigger(cfg.plateau_patience, cfg.plateau_threshold)
    assert trig.name == "plateau" and trig.patience == 50
    for field, value in (("plateau_patience", 1), ("plateau_threshold", -1.0), ("plateau_smoothing", 1.0)):
        with pytest.raises(ValueError, match=field):
            GrowthConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="patience"):
        PlateauTrigger(patience=1, threshold=0.0)
