"""The growth controller: when to grow (triggers), how (a search or a plan), and the history.

One growth is three phases, each timed and recorded:
1. **search** (`search`): with policy "search", build the weight-sharing supernet over the growth
   space, train it briefly on recent + replayed data (sandwich rule), and score every candidate on
   the held-out batches (`growth.selection`); with policy "plan", take the next operator of a fixed
   plan that fits the bounds. Search never touches the training model, so it may run in another
   thread while the trainer goes on.
2. **inherit** (`inherit`): parameter inheriting with momentum (`growth.pim`) from the model as it
   is *now* (which, when training continued during the search, is newer than the supernet's base).
3. **record** (`record`): the event with every candidate's score and why the winner won.
The trainer swaps the model in between (rebuilding its optimizer, carrying state, re-warming).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

import torch

from growclip_stream.batch import Batch
from growclip_stream.growth.budget import TRAIN_FLOPS_FACTOR, WorkLedger
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.operators import GrowthOp, apply_ops, grow_arch
from growclip_stream.growth.pim import WeightEMA, blend, carry_optimizer_state, ema_inherit
from growclip_stream.growth.plateau import LossSmoother, PlateauState, PlateauTrigger
from growclip_stream.growth.selection import score_candidates, select
from growclip_stream.growth.space import (
    Candidate,
    candidate_set,
    canonical_ops,
    make_candidate,
    rejected_candidates,
)
from growclip_stream.growth.supernet import Supernet, union_ops
from growclip_stream.growth.triggers import DataVolumeTrigger, TriggerState
from growclip_stream.model import ArchConfig, GrowCLIP
from growclip_stream.optim import OptimizerSettings

PHASES = ("idle", "selecting", "training_supernet", "inheriting", "done")  # reported through on_phase


@dataclass(frozen=True)
class GrowthChoice:
    """A policy's answer: the operators to apply and why they were chosen."""

    ops: tuple[GrowthOp, ...]
    reason: str
    candidates: tuple[dict[str, Any], ...] = ()  # every candidate considered, with its score or why skipped


@dataclass
class GrowthPlan:
    """The outcome of the search phase: what to grow into, and the supernet to inherit from."""

    trigger: str
    choice: GrowthChoice
    base_arch: ArchConfig
    supernet: Supernet | None = None
    candidate: Candidate | None = None
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    supernet_stats: dict[str, Any] = field(default_factory=dict)
    declined: bool = False  # no candidate beat the base: record it, grow nothing


@dataclass(frozen=True)
class GrowthEvent:
    """One growth, as recorded in the history (served by /v1/model, kept in checkpoints)."""

    generation: int  # generation of the grown model
    step: int
    samples: int
    trigger: str
    ops: tuple[str, ...]
    reason: str
    candidates: tuple[dict[str, Any], ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    arch_after: dict[str, Any]
    duration_s: float
    finished_at: float
    policy: str = "plan"
    pim: dict[str, Any] = field(default_factory=dict)  # mode, momentum, optimizer-state carry counts
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    supernet: dict[str, Any] = field(default_factory=dict)  # supernet size, training and budget figures
    # "grown"; "declined" (no candidate beat the base: nothing changed, the generation stays);
    # "rolled_back" (the guard found the growth of generation - 1 worse than the base trained beside
    # it and restored that base: a new generation with the base's architecture)
    outcome: str = "grown"
    guard: dict[str, Any] = field(default_factory=dict)  # the guard's losses and verdict, once known
    work: dict[str, Any] = field(default_factory=dict)  # training vs growth work so far (growth.budget)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ops"] = list(self.ops)
        d["candidates"] = [dict(c) for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrowthEvent:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        return cls(**{**d, "ops": tuple(d["ops"]), "candidates": tuple(dict(c) for c in d["candidates"])})


class ScheduledPolicy:
    """Cycles through a fixed plan of operators, skipping any that would break the size bounds."""

    def __init__(self, cfg: GrowthConfig) -> None:
        self.plan = tuple(GrowthOp.parse(s) for s in cfg.plan)
        self.max_params = cfg.max_params
        self.max_flops_factor = cfg.max_flops_factor
        self.cursor = 0

    def _check(self, arch: ArchConfig, op: GrowthOp) -> tuple[ArchConfig | None, str]:
        grown = grow_arch(arch, op)
        if grown.num_params() == arch.num_params():
            return None, "adds no parameters (e.g. widening the MLP of a tower without blocks)"
        if grown.num_params() > self.max_params:
            return None, f"over max_params ({grown.num_params()} > {self.max_params})"
        factor = grown.flops_per_sample() / arch.flops_per_sample()
        if factor > self.max_flops_factor:
            return None, f"FLOPs x{factor:.2f} over max_flops_factor {self.max_flops_factor}"
        return grown, "fits"

    def choose(self, model: GrowCLIP) -> GrowthChoice | None:
        arch = model.arch
        considered: list[dict[str, Any]] = []
        for i in range(len(self.plan)):
            idx = (self.cursor + i) % len(self.plan)
            op = self.plan[idx]
            grown, verdict = self._check(arch, op)
            considered.append({"ops": [str(op)], "verdict": verdict})
            if grown is not None:
                self.cursor = (idx + 1) % len(self.plan)
                return GrowthChoice(
                    ops=(op,),
                    reason=f"next operator of the plan within bounds (plan position {idx})",
                    candidates=tuple(considered),
                )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0)) % len(self.plan)


class PhaseListener(Protocol):
    def __call__(self, phase: str) -> None: ...


class GrowthController:
    """Owns the growth decisions, the state they depend on (loss trend, weight EMA, work ledger) and
    the history of every decision (growths, declines, roll-backs)."""

    def __init__(
        self, cfg: GrowthConfig, train_cfg: OptimizerSettings, on_phase: PhaseListener | None = None
    ):
        self.cfg = cfg
        self.train_cfg = train_cfg
        self.volume = DataVolumeTrigger(cfg.samples_per_param, cfg.min_interval_samples)
        self.plateau = (
            PlateauTrigger(cfg.plateau_patience, cfg.plateau_threshold) if cfg.plateau_enabled else None
        )
        self.smoother = LossSmoother(cfg.plateau_smoothing, window=cfg.plateau_patience)
        self.plateau_hits = 0  # consecutive plateau checks that saw a plateau
        self.plan_policy = ScheduledPolicy(cfg)
        self.ema: WeightEMA | None = None
        self.history: list[GrowthEvent] = []
        self.work = WorkLedger()
        self.samples_at_last_growth = 0
        self.step_at_last_growth = 0
        self.last_refusal = ""  # why the last search returned no plan (for the caller's log)
        self._costs: tuple[ArchConfig, list[Candidate], float, float] | None = None  # see _search_costs
        self._on_phase = on_phase or (lambda phase: None)

    @property
    def generation(self) -> int:
        """Architecture generation of the training model: growths and roll-backs so far."""
        return sum(1 for e in self.history if e.outcome != "declined")

    def growth_generator(self) -> torch.Generator:
        """The random draws (split proportions, new units) of the next growth.

        Derived from (seed, generation) alone, not from one generator advanced by every growth, so
        a controller restored from a checkpoint grows exactly as the one that saved it would have.
        """
        digest = hashlib.sha256(f"growth:{self.cfg.seed}:{self.generation}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def capped(self) -> bool:
        grown = sum(1 for e in self.history if e.outcome == "grown")
        return self.cfg.max_growths > 0 and grown >= self.cfg.max_growths

    # -- every step --------------------------------------------------------------------------
    def observe_step(self, model: GrowCLIP, loss: float, *, samples: int = 0, seconds: float = 0.0) -> None:
        """Feed the loss trend (plateau trigger), the weight EMA (PIM mode "ema") and the work ledger
        (`samples` trained in `seconds`)."""
        self.smoother.update(loss)
        self.work.add_train(seconds, TRAIN_FLOPS_FACTOR * model.arch.flops_per_sample() * samples)
        if self.cfg.pim_mode == "ema":
            if self.ema is None or self.ema.arch != model.arch:
                self.ema = WeightEMA(model, self.cfg.ema_decay)
            else:
                self.ema.update(model)

    def due(self, *, samples: int, step: int, num_params: int) -> str | None:
        """Name of the trigger that fires now, or None.

        The plateau trigger is checked every `plateau_check_every` steps and fires only after
        `plateau_confirmations` consecutive checks all saw a plateau: one noisy slope does not grow.
        """
        if not self.cfg.enabled or self.capped():
            return None
        if self.volume.fires(TriggerState(samples - self.samples_at_last_growth, num_params)):
            return self.volume.name
        since = step - self.step_at_last_growth
        if self.plateau is not None and since > 0 and since % self.cfg.plateau_check_every == 0:
            if self.plateau.fires(PlateauState(tuple(self.smoother.values), since)):
                self.plateau_hits += 1
            else:
                self.plateau_hits = 0
            if self.plateau_hits >= self.cfg.plateau_confirmations:
                return self.plateau.name
        return None

    def defer(self, *, samples: int, step: int) -> None:
        """Restart the triggers after a growth decision (grown, declined, or refused: no retry at
        every step): the loss window and plateau checks start over on the model as it is now."""
        self.samples_at_last_growth = samples
        self.step_at_last_growth = step
        self.smoother = LossSmoother(self.cfg.plateau_smoothing, window=self.cfg.plateau_patience)
        self.plateau_hits = 0

    # -- phase 1: search ---------------------------------------------------------------------
    def search(
        self,
        model: GrowCLIP,
        *,
        trigger: str,
        train_batches: Iterator[Batch],
        holdout_batches: Sequence[Batch],
        optimizer: torch.optim.Optimizer | None = None,
        between: Callable[[], None] | None = None,
    ) -> GrowthPlan | None:
        """Choose what to grow into, or decline; `model` is only read. None when nothing can be
        searched (nothing fits the bounds, no held-out data, no search budget left: `last_refusal`).

        `between` runs between candidates while they are scored (the supernet steps have theirs
        in `train_batches`): it may raise to cancel the search.

        The search is sized to its budget (`search_budget_fraction` of all work so far, by FLOPs and
        by wall time): the held-out batches (up to `selection_samples`) are all scored, and the
        supernet trains as many steps as the rest allows, up to `supernet_steps`; a budget short of
        `min_supernet_steps` refuses (the caller should have waited: `search_wait`). A forced
        growth (an operator's explicit request) is not bounded. The work it did is added to the
        ledger.
        """
        self.last_refusal = ""
        if self.cfg.policy == "plan":
            self._on_phase("selecting")
            choice = self.plan_policy.choose(model)
            if choice is None:
                self.last_refusal = "no operator of the plan fits the bounds"
                return None
            return GrowthPlan(trigger=trigger, choice=choice, base_arch=model.arch)
        holdout_batches = _bounded(holdout_batches, self.cfg.selection_samples)
        candidates = list(self._search_costs(model.arch)[0])
        if not holdout_batches or not candidates:
            self.last_refusal = (
                "no held-out data yet" if not holdout_batches else "no candidate fits the bounds"
            )
            return None
        first = next(train_batches, None)
        if first is None:
            self.last_refusal = "no training data for the supernet"
            return None
        train_batches = itertools.chain([first], train_batches)
        sizing = self._size_search(model.arch, holdout_batches, len(first), trigger == "forced")
        if sizing is None:
            return None
        holdout_batches, steps, deadline, budget = sizing
        phases: dict[str, float] = {}
        self._on_phase("training_supernet")
        start = time.perf_counter()
        supernet = Supernet(
            model, candidates, self.growth_generator(), train_cfg=self.train_cfg,
            sample_k=self.cfg.supernet_sample_k, seed=self.cfg.seed + self.generation,
        )  # fmt: skip
        if optimizer is not None:
            carry_optimizer_state(model, optimizer, supernet.model, supernet.optimizer, supernet.ops)
        stats = supernet.train(train_batches, steps, deadline=deadline)
        phases["supernet_s"] = time.perf_counter() - start
        self._on_phase("selecting")
        start = time.perf_counter()
        scores = score_candidates(
            supernet, candidates, holdout_batches, rule=self.cfg.selection_rule,
            decline_z=self.cfg.decline_z, min_gain=self.cfg.min_gain, resamples=self.cfg.bootstrap_resamples,
            seed=self.cfg.seed + self.generation, between=between,
        )  # fmt: skip
        chosen = select(
            scores, decline_z=self.cfg.decline_z, resamples=self.cfg.bootstrap_resamples,
            seed=self.cfg.seed + self.generation,
        )  # fmt: skip
        phases["selection_s"] = time.perf_counter() - start
        scored = sum(len(b) for b in holdout_batches)
        scoring_flops = scored * self._search_costs(model.arch)[1]  # base + every candidate, per sample
        self.work.add_growth(
            phases["supernet_s"] + phases["selection_s"], supernet.flops + scoring_flops, search=True
        )
        considered = [s.to_dict() for s in scores] + rejected_candidates(model.arch, self.cfg)
        stats = {
            **stats, "params": supernet.arch.num_params(), "ops": [str(o) for o in supernet.ops],
            "budget": {**budget, "scoring_flops": scoring_flops,
                       "search_flops": supernet.flops + scoring_flops},
        }  # fmt: skip
        winner = chosen.winner
        return GrowthPlan(
            trigger=trigger,
            choice=GrowthChoice(
                ops=winner.ops if winner else (), reason=chosen.reason, candidates=tuple(considered)
            ),
            base_arch=model.arch,
            supernet=supernet,
            candidate=winner.candidate if winner else None,
            phases=phases,
            supernet_stats=stats,
            declined=winner is None,
        )

    def _search_costs(self, arch: ArchConfig) -> tuple[list[Candidate], float, float]:
        """(candidates, FLOPs to score one held-out sample on the base and every candidate, FLOPs
        of one supernet sample at most: the base, the whole supernet and `supernet_sample_k`
        candidates, forward and backward), cached per architecture: asked at every step while a
        search waits."""
        if self._costs is None or self._costs[0] != arch:
            candidates = candidate_set(arch, self.cfg)
            per_sample = float(arch.flops_per_sample() + sum(c.flops for c in candidates))
            members = 0.0
            if candidates:
                full = make_candidate(arch, union_ops(candidates)).flops
                largest = max(c.flops for c in candidates)  # the random draws, counted at their dearest
                k = min(self.cfg.supernet_sample_k, len(candidates))
                members = float(TRAIN_FLOPS_FACTOR * (arch.flops_per_sample() + full + k * largest))
            self._costs = (arch, candidates, per_sample, members)
        return self._costs[1], self._costs[2], self._costs[3]

    def _min_supernet_steps(self) -> int:
        """The fewest supernet steps a search is worth running (never more than it would run)."""
        return min(self.cfg.min_supernet_steps, self.cfg.supernet_steps)

    def _affordable_steps(
        self, arch: ArchConfig, scored: int, batch_size: int, allow_flops: float, allow_s: float
    ) -> int:
        """Supernet steps an allowance pays for once `scored` held-out samples are scored: by FLOPs,
        and by wall time at the searches' measured pace; at most `supernet_steps`, -1 when not even
        the scoring fits. The one reckoning behind both `search_wait` and `_size_search`."""
        _, per_sample, sample_flops = self._search_costs(arch)
        pace = self.work.search_seconds_per_flop()
        # what the wall-time allowance pays for, in FLOPs at the searches' pace
        wall_flops = allow_s / pace if pace is not None and math.isfinite(allow_s) else math.inf
        affordable = min(allow_flops, wall_flops) - scored * per_sample
        if not math.isfinite(affordable):
            return self.cfg.supernet_steps
        if affordable < 0:
            return -1
        return min(self.cfg.supernet_steps, int(affordable // (batch_size * sample_flops)))

    def search_wait(self, arch: ArchConfig, batch_size: int) -> str:
        """Why a search due now must wait for its budget ("" when it may run now).

        The smallest search worth running scores `selection_samples` held-out samples and trains
        the supernet `min_supernet_steps` steps; until the budget (by FLOPs, and by wall time at the
        searches' measured pace) pays for that, the trigger stays armed and training goes on.
        """
        if self.cfg.policy != "search":
            return ""
        candidates, per_sample, sample_flops = self._search_costs(arch)
        if not candidates:
            return ""  # the search itself refuses, with its reason
        min_steps = self._min_supernet_steps()
        allow_flops, allow_s = self.work.allowance(self.cfg.search_budget_fraction)
        scored = self.cfg.selection_samples
        if self._affordable_steps(arch, scored, batch_size, allow_flops, allow_s) >= min_steps:
            return ""
        need = scored * per_sample + min_steps * batch_size * sample_flops
        pace = self.work.search_seconds_per_flop()
        need_s = f"~{need * pace:.1f} s" if pace is not None else "unknown seconds: no work measured yet"
        return (
            f"search budget: a search of {min_steps} supernet steps and {scored} scored samples "
            f"needs {need:.3g} FLOPs ({need_s}); {allow_flops:.3g} FLOPs and {allow_s:.1f} s are left "
            f"within search_budget_fraction {self.cfg.search_budget_fraction}"
        )

    def _size_search(
        self, arch: ArchConfig, holdout: list[Batch], batch_size: int, forced: bool
    ) -> tuple[list[Batch], int, float | None, dict[str, Any]] | None:
        """(held-out batches to score, supernet steps, wall-time deadline, figures) within the budget.

        Every held-out batch (up to `selection_samples`) is scored; the supernet gets as many steps
        as the rest of the allowance pays for, by FLOPs and by wall time at the searches' pace, up
        to `supernet_steps`; fewer than `min_supernet_steps` refuses the search.
        """
        allow_flops, allow_s = (
            (math.inf, math.inf) if forced else self.work.allowance(self.cfg.search_budget_fraction)
        )
        scored = sum(len(b) for b in holdout)
        steps = self._affordable_steps(arch, scored, batch_size, allow_flops, allow_s)
        figures = {
            "forced": forced, "allowance_flops": _finite_or_none(allow_flops),
            "allowance_s": _finite_or_none(allow_s), "planned_steps": max(steps, 0), "scored_samples": scored,
        }  # fmt: skip
        min_steps = self._min_supernet_steps()
        if steps < min_steps:
            self.last_refusal = (
                f"search budget: {allow_flops:.3g} FLOPs and {allow_s:.3g} s left of search_budget_fraction "
                f"{self.cfg.search_budget_fraction}, too little for {min_steps} supernet "
                f"steps and {scored} scored samples"
            )
            return None
        deadline = None
        if math.isfinite(allow_s):
            pace = self.work.search_seconds_per_flop()
            reserve = scored * self._search_costs(arch)[1] * pace if pace is not None else 0.0
            deadline = time.perf_counter() + max(0.0, allow_s - reserve)
        return holdout, steps, deadline, figures

    # -- phase 2: inherit --------------------------------------------------------------------
    def inherit(self, plan: GrowthPlan, model: GrowCLIP) -> GrowCLIP:
        """PIM from `model` as it is now (its architecture must still be the plan's base)."""
        if plan.declined:
            raise ValueError("the search declined to grow; record_declined instead")
        if model.arch != plan.base_arch:
            raise ValueError("the model changed shape since the search; search again")
        self._on_phase("inheriting")
        start = time.perf_counter()
        ops = canonical_ops(plan.choice.ops)
        m = self.cfg.momentum
        if plan.supernet is None or plan.candidate is None:
            grown = apply_ops(model, ops, self.growth_generator())  # plain function-preserving inheritance
        elif self.cfg.pim_mode == "ema" and self.ema is not None and self.ema.arch == model.arch:
            grown = ema_inherit(model, self.ema, ops, m, self.growth_generator())
        else:
            # blend: m * (the current weights grown in the supernet's layout) + (1 - m) * the scored candidate
            grown = blend(plan.supernet, plan.candidate, m, model)
        plan.phases["inherit_s"] = time.perf_counter() - start
        return grown

    # -- phase 3: record ---------------------------------------------------------------------
    def _event(
        self, plan: GrowthPlan, arch_after: ArchConfig, *, step: int, samples: int, duration_s: float,
        outcome: str, optimizer_carry: dict[str, int] | None = None,
    ) -> GrowthEvent:  # fmt: skip
        return GrowthEvent(
            generation=self.generation + (0 if outcome == "declined" else 1),
            step=step,
            samples=samples,
            trigger=plan.trigger,
            ops=tuple(str(op) for op in canonical_ops(plan.choice.ops)),
            reason=plan.choice.reason,
            candidates=plan.choice.candidates,
            params_before=plan.base_arch.num_params(),
            params_after=arch_after.num_params(),
            flops_before=plan.base_arch.flops_per_sample(),
            flops_after=arch_after.flops_per_sample(),
            arch_after=arch_after.to_dict(),
            duration_s=duration_s,
            finished_at=time.time(),
            policy=self.cfg.policy,
            pim={
                "mode": self.cfg.pim_mode,
                "momentum": self.cfg.momentum,
                "optimizer": optimizer_carry or {},
            },
            phases=dict(plan.phases),
            supernet=dict(plan.supernet_stats),
            outcome=outcome,
            work=self.work.to_dict(),
        )

    def record(
        self, plan: GrowthPlan, grown: GrowCLIP, *, step: int, samples: int, duration_s: float,
        optimizer_carry: dict[str, int] | None = None,
    ) -> GrowthEvent:  # fmt: skip
        event = self._event(
            plan, grown.arch, step=step, samples=samples, duration_s=duration_s, outcome="grown",
            optimizer_carry=optimizer_carry,
        )  # fmt: skip
        self.history.append(event)
        self.defer(samples=samples, step=step)
        self.ema = None  # restarts from the grown weights at the next step
        self._on_phase("done")
        return event

    def record_declined(self, plan: GrowthPlan, *, step: int, samples: int, duration_s: float) -> GrowthEvent:
        """A search that found no candidate beating the base: kept in the history with every score."""
        event = self._event(
            plan, plan.base_arch, step=step, samples=samples, duration_s=duration_s, outcome="declined"
        )
        self.history.append(event)
        self.defer(samples=samples, step=step)
        self._on_phase("done")
        return event

    def record_guard(self, guard: dict[str, Any], *, rolled_back_to: GrowCLIP | None, step: int, samples: int
    ) -> GrowthEvent | None:  # fmt: skip
        """The guard's verdict on the last growth (added to its event); with `rolled_back_to` (the
        base model, trained beside it), also a roll-back event: a new generation of the base's shape."""
        last = max(i for i, e in enumerate(self.history) if e.outcome == "grown")
        grown = self.history[last]
        self.history[last] = replace(grown, guard=dict(guard))
        if rolled_back_to is None:
            return None
        event = GrowthEvent(
            generation=self.generation + 1,
            step=step,
            samples=samples,
            trigger="guard",
            ops=(),
            reason=(
                f"rolled back generation {grown.generation} ({','.join(grown.ops)}): held-out loss "
                f"{guard['grown_loss']:.4f} after {guard['steps']} steps vs {guard['base_loss']:.4f} for the "
                f"base trained beside it on the same batches"
            ),
            candidates=(),
            params_before=grown.params_after,
            params_after=rolled_back_to.arch.num_params(),
            flops_before=grown.flops_after,
            flops_after=rolled_back_to.arch.flops_per_sample(),
            arch_after=rolled_back_to.arch.to_dict(),
            duration_s=0.0,
            finished_at=time.time(),
            policy=self.cfg.policy,
            outcome="rolled_back",
            guard=dict(guard),
            work=self.work.to_dict(),
        )
        self.history.append(event)
        self.defer(samples=samples, step=step)
        self.ema = None
        return event

    def grow(
        self,
        model: GrowCLIP,
        *,
        trigger: str,
        step: int,
        samples: int,
        train_batches: Iterator[Batch] | None = None,
        holdout_batches: Sequence[Batch] = (),
        optimizer: torch.optim.Optimizer | None = None,
    ) -> tuple[GrowCLIP, GrowthEvent] | None:
        """All three phases in one call (the optimizer swap is the caller's); None when nothing was
        grown (nothing fits, or declined: then the decline is in the history)."""
        start = time.perf_counter()
        plan = self.search(
            model, trigger=trigger, train_batches=train_batches or iter(()), holdout_batches=holdout_batches,
            optimizer=optimizer,
        )  # fmt: skip
        if plan is None:
            self.defer(samples=samples, step=step)
            return None
        if plan.declined:
            self.record_declined(plan, step=step, samples=samples, duration_s=time.perf_counter() - start)
            return None
        grown = self.inherit(plan, model)
        return grown, self.record(
            plan, grown, step=step, samples=samples, duration_s=time.perf_counter() - start
        )

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [e.to_dict() for e in self.history],
            "samples_at_last_growth": self.samples_at_last_growth,
            "step_at_last_growth": self.step_at_last_growth,
            "policy": self.plan_policy.state_dict(),
            "smoother": self.smoother.state_dict(),
            "plateau_hits": self.plateau_hits,
            "work": self.work.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore history and trigger state from a checkpoint (the model itself comes from its weights)."""
        self.history = [GrowthEvent.from_dict(e) for e in state.get("history", [])]
        self.samples_at_last_growth = int(state.get("samples_at_last_growth", 0))
        self.step_at_last_growth = int(state.get("step_at_last_growth", 0))
        self.plan_policy.load_state_dict(state.get("policy", {}))
        self.smoother.load_state_dict(state.get("smoother", {}))
        self.plateau_hits = int(state.get("plateau_hits", 0))
        self.work.load_state_dict(state.get("work", {}))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _bounded(batches: Sequence[Batch], max_samples: int) -> list[Batch]:
    """Leading whole batches holding at most `max_samples` samples (at least one batch, if any)."""
    out: list[Batch] = []
    for batch in batches:
        if out and sum(len(b) for b in out) + len(batch) > max_samples:
            break
        out.append(batch)
    return out
