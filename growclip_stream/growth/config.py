"""Configuration of the growth controller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PLAN = (
    "deepen:image+1",
    "deepen:text+1",
    "widen_mlp:image+64",
    "widen_mlp:text+64",
    "deepen:shared+1",
    "widen:image*2",
    "widen:text*2",
)

# Operator templates of the growth space (growth.space): every candidate is one of these or a
# combination of several on different (tower, kind) pairs.
DEFAULT_SPACE = (
    "deepen:image+1",
    "deepen:text+1",
    "deepen:shared+1",
    "widen:image*2",
    "widen:text*2",
    "widen_mlp:image+64",
    "widen_mlp:text+64",
    "widen_mlp:shared+64",
)

SELECTION_RULES = ("gain", "min_loss")
PIM_MODES = ("blend", "ema")


@dataclass(frozen=True)
class GrowthConfig:
    enabled: bool = True
    # "search": supernet over the growth space, candidates scored on held-out data, PIM (the
    # default); "plan": the next operator of `plan` within the bounds, plain inheritance.
    policy: Literal["search", "plan"] = "search"
    # Keep training the served model while the supernet trains (in another thread), instead of
    # pausing it for the search; either way serving never pauses.
    train_during_search: bool = False
    # Data-volume trigger: grow once the samples trained since the last growth reach
    # samples_per_param x the model's parameter count (bigger models must see more data first).
    samples_per_param: float = 0.5
    min_interval_samples: int = 5_000  # never grow sooner than this after the previous growth
    max_params: int = 5_000_000  # size cap: no candidate above it is chosen
    max_flops_factor: float = 4.0  # one growth step may multiply FLOPs per sample by at most this
    max_growths: int = 0  # stop growing after this many events; 0 = no limit
    # Ordered operators the scheduled policy cycles through (see growth.operators.GrowthOp.parse);
    # an operator that would break a bound is skipped.
    plan: tuple[str, ...] = DEFAULT_PLAN
    seed: int = 0  # seeds the random splits of widening
    # --- supernet search (growth.space, growth.supernet, growth.selection)
    space: tuple[str, ...] = DEFAULT_SPACE  # operator templates candidates are built from
    max_ops_per_step: int = 2  # a candidate combines at most this many templates (different tower/kind)
    supernet_steps: int = 50  # supernet training steps per growth (0: score the inherited weights only)
    # A search waits (its trigger stays armed) until its budget pays for at least this many supernet
    # steps (at most supernet_steps) and scoring all selection_samples: a search too small to tell
    # candidates apart only spends budget and declines.
    min_supernet_steps: int = 10
    supernet_sample_k: int = 2  # random candidates per supernet step, besides the base and the largest
    # How the held-out scores pick the winner among the candidates that beat the base (growth.selection):
    # "gain" = largest paired gain, then the fewest added FLOPs among gains within noise of it;
    # "min_loss" = largest gain (lowest held-out loss) alone.
    selection_rule: Literal["gain", "min_loss"] = "gain"
    # Decline growth unless a candidate's paired held-out gain over the base exceeds this many
    # bootstrap standard errors (the noise of the held-out estimate).
    decline_z: float = 3.0
    min_gain: float = 1e-3  # ... and by at least this much (nats): growth costs compute for good
    bootstrap_resamples: int = 1000  # resamples of the held-out samples for that standard error
    # Search (supernet training + scoring) may take at most this fraction of all training work, by
    # FLOPs and by wall time: supernet steps and scored samples are sized to fit what is left.
    search_budget_fraction: float = 0.1
    # After a growth, train this many steps, then compare the grown model's held-out loss with the
    # base model's, trained beside it on the same batches; roll back to the base if the grown model is
    # worse by more than guard_margin. 0 disables the guard.
    guard_steps: int = 50
    guard_margin: float = 0.0
    # Held-out samples every candidate is scored on (whole held-out batches up to this many): scoring
    # costs candidates x batches forward passes, so this bounds the selection phase's time.
    selection_samples: int = 256
    # --- parameter inheriting with momentum (growth.pim)
    # "blend": grown = m * inherited (function-preserving) + (1 - m) * supernet-trained weights;
    # "ema": grow from m * last weights + (1 - m) * an EMA of the pre-growth weights.
    pim_mode: Literal["blend", "ema"] = "blend"
    momentum: float = 0.5  # m above, in [0, 1]; 1 = plain function-preserving inheritance
    ema_decay: float = 0.99  # per-step decay of the weight EMA used by pim_mode "ema", in [0, 1)
    # --- loss-plateau trigger (growth.plateau)
    plateau_enabled: bool = True  # the loss-plateau trigger (the data-volume trigger is always on)
    plateau_patience: int = 200  # steps in the slope window; also the minimum steps since the last growth
    plateau_threshold: float = 1e-4  # fires when the smoothed loss falls slower than this per step
    plateau_smoothing: float = 0.9  # EMA decay applied to the training loss before the slope fit, in [0, 1)
    plateau_check_every: int = 20  # steps between plateau checks (the slope is noisy step to step)
    plateau_confirmations: int = 3  # consecutive checks that must all see a plateau before it fires

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the daemon's config validation

    def __post_init__(self) -> None:
        from growclip_stream.growth.operators import GrowthOp

        if self.samples_per_param < 0:
            raise ValueError("samples_per_param must be >= 0")
        if self.min_interval_samples < 0:
            raise ValueError("min_interval_samples must be >= 0")
        if self.max_flops_factor <= 1:
            raise ValueError("max_flops_factor must be > 1")
        if not self.plan:
            raise ValueError("plan must name at least one operator")
        for op in self.plan:
            GrowthOp.parse(op)  # raises ValueError naming the bad operator
        if not self.space:
            raise ValueError("space must name at least one operator template")
        for op in self.space:
            try:
                GrowthOp.parse(op)
            except ValueError as err:
                raise ValueError(f"space: {err}") from None
        if not _is_int(self.max_ops_per_step) or self.max_ops_per_step < 1:
            raise ValueError(f"max_ops_per_step must be an int >= 1, got {self.max_ops_per_step!r}")
        if not _is_int(self.supernet_steps) or self.supernet_steps < 0:
            raise ValueError(f"supernet_steps must be an int >= 0, got {self.supernet_steps!r}")
        if not _is_int(self.min_supernet_steps) or self.min_supernet_steps < 0:
            raise ValueError(f"min_supernet_steps must be an int >= 0, got {self.min_supernet_steps!r}")
        if not _is_int(self.supernet_sample_k) or self.supernet_sample_k < 0:
            raise ValueError(f"supernet_sample_k must be an int >= 0, got {self.supernet_sample_k!r}")
        if not _is_int(self.selection_samples) or self.selection_samples < 1:
            raise ValueError(f"selection_samples must be an int >= 1, got {self.selection_samples!r}")
        if self.selection_rule == "gain_per_flop":
            raise ValueError(
                "selection_rule 'gain_per_flop' was removed (dividing by added FLOPs favoured the cheapest "
                "operators by construction); use 'gain' (parsimony only among gains within noise)"
            )
        if self.selection_rule not in SELECTION_RULES:
            raise ValueError(f"selection_rule must be one of {SELECTION_RULES}, got {self.selection_rule!r}")
        if not self.decline_z >= 0:
            raise ValueError(f"decline_z must be >= 0, got {self.decline_z!r}")
        if not self.min_gain >= 0:
            raise ValueError(f"min_gain must be >= 0, got {self.min_gain!r}")
        if not _is_int(self.bootstrap_resamples) or self.bootstrap_resamples < 2:
            raise ValueError(f"bootstrap_resamples must be an int >= 2, got {self.bootstrap_resamples!r}")
        if not 0.0 < self.search_budget_fraction < 1.0:
            raise ValueError(f"search_budget_fraction must be in (0, 1), got {self.search_budget_fraction!r}")
        if not _is_int(self.guard_steps) or self.guard_steps < 0:
            raise ValueError(f"guard_steps must be an int >= 0, got {self.guard_steps!r}")
        if not self.guard_margin >= 0:
            raise ValueError(f"guard_margin must be >= 0, got {self.guard_margin!r}")
        if not _is_int(self.plateau_check_every) or self.plateau_check_every < 1:
            raise ValueError(f"plateau_check_every must be an int >= 1, got {self.plateau_check_every!r}")
        if not _is_int(self.plateau_confirmations) or self.plateau_confirmations < 1:
            raise ValueError(f"plateau_confirmations must be an int >= 1, got {self.plateau_confirmations!r}")
        if self.pim_mode not in PIM_MODES:
            raise ValueError(f"pim_mode must be one of {PIM_MODES}, got {self.pim_mode!r}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not _is_int(self.plateau_patience) or self.plateau_patience < 2:
            raise ValueError(f"plateau_patience must be an int >= 2, got {self.plateau_patience!r}")
        if self.plateau_threshold < 0:
            raise ValueError(f"plateau_threshold must be >= 0, got {self.plateau_threshold!r}")
        if not 0.0 <= self.plateau_smoothing < 1.0:
            raise ValueError(f"plateau_smoothing must be in [0, 1), got {self.plateau_smoothing!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
