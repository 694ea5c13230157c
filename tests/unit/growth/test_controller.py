import itertools
import json

import pytest
import torch

from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.controller import GrowthChoice, GrowthController, GrowthPlan, ScheduledPolicy
from growclip_stream.growth.pim import blend
from growclip_stream.growth.space import candidate_set
from growclip_stream.growth.supernet import Supernet
from growclip_stream.growth.triggers import DataVolumeTrigger, TriggerState
from growclip_stream.model import GrowCLIP
from growclip_stream.train.config import TrainConfig
from tests.helpers import operator_arch, random_batches, random_model, randomized, tiny_arch


def test_data_volume_trigger_scales_with_model_size() -> None:
    trig = DataVolumeTrigger(samples_per_param=2.0, min_interval_samples=100)
    assert not trig.fires(TriggerState(samples_since_growth=99, num_params=10))
    assert trig.fires(TriggerState(samples_since_growth=100, num_params=10))
    assert not trig.fires(TriggerState(samples_since_growth=1999, num_params=1000))
    assert trig.fires(TriggerState(samples_since_growth=2000, num_params=1000))


def test_controller_grows_on_schedule_and_records_history() -> None:
    cfg = GrowthConfig(
        policy="plan",
        samples_per_param=0.0,
        min_interval_samples=1000,
        plan=("deepen:image+1", "deepen:text+1"),
    )
    ctrl = GrowthController(cfg, TrainConfig())
    model = GrowCLIP(tiny_arch())
    assert ctrl.due(samples=999, step=1, num_params=model.arch.num_params()) is None
    trigger = ctrl.due(samples=1000, step=1, num_params=model.arch.num_params())
    assert trigger == "data_volume"
    grown = ctrl.grow(model, trigger=trigger, step=10, samples=1000)
    assert grown is not None
    model2, event = grown
    assert model2.arch.image.depth == 2 and model.arch.image.depth == 1
    assert event.generation == 1 and event.ops == ("deepen:image+1",)
    assert event.params_after > event.params_before
    assert (
        ctrl.due(samples=1999, step=2, num_params=model2.arch.num_params()) is None
    )  # counted from the last growth
    _, event2 = ctrl.grow(model2, trigger="forced", step=11, samples=1100) or (None, None)
    assert event2 is not None and event2.ops == ("deepen:text+1",) and ctrl.generation == 2
    assert [e["generation"] for e in ctrl.state_dict()["history"]] == [1, 2]


def test_policy_skips_operators_over_bounds() -> None:
    arch = tiny_arch()
    cap = arch.num_params() + 1  # nothing that adds parameters fits
    policy = ScheduledPolicy(GrowthConfig(max_params=cap, plan=("widen:image*2", "deepen:text+1")))
    assert policy.choose(GrowCLIP(arch)) is None
    flops_bound = ScheduledPolicy(
        GrowthConfig(max_flops_factor=1.05, plan=("widen:image*2", "widen_mlp:text+8"))
    )
    choice = flops_bound.choose(GrowCLIP(arch))
    assert choice is not None and [str(o) for o in choice.ops] == ["widen_mlp:text+8"]
    assert "FLOPs" in choice.candidates[0]["verdict"]


def test_policy_skips_operators_that_add_nothing() -> None:
    policy = ScheduledPolicy(GrowthConfig(plan=("widen_mlp:shared+8", "deepen:shared+1")))
    choice = policy.choose(GrowCLIP(tiny_arch()))  # the shared encoder has no blocks yet
    assert choice is not None and [str(o) for o in choice.ops] == ["deepen:shared+1"]
    assert "adds no parameters" in choice.candidates[0]["verdict"]


def test_max_growths_caps_history() -> None:
    ctrl = GrowthController(
        GrowthConfig(policy="plan", samples_per_param=0, min_interval_samples=1, max_growths=1), TrainConfig()
    )
    model = GrowCLIP(tiny_arch())
    assert ctrl.grow(model, trigger="t", step=1, samples=1) is not None
    assert ctrl.due(samples=10_000, step=1, num_params=model.arch.num_params()) is None


def test_growth_config_rejects_bad_plan() -> None:
    with pytest.raises(ValueError, match="nonsense"):
        GrowthConfig(plan=("nonsense",))


def test_grown_model_is_seeded_reproducibly() -> None:
    cfg = GrowthConfig(policy="plan", plan=("widen:image*2",), seed=3)
    torch.manual_seed(0)
    base = GrowCLIP(tiny_arch())
    a = GrowthController(cfg, TrainConfig()).grow(base, trigger="t", step=0, samples=0)
    b = GrowthController(cfg, TrainConfig()).grow(base, trigger="t", step=0, samples=0)
    assert a is not None and b is not None
    for pa, pb in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_search_policy_scores_every_candidate_and_explains_the_choice() -> None:
    torch.manual_seed(0)
    cfg = GrowthConfig(
        space=("deepen:image+1", "deepen:text+1", "widen_mlp:text+16"), max_ops_per_step=1, supernet_steps=20,
        momentum=0.5, decline_z=0.0, min_gain=0.0,
    )  # fmt: skip
    phases: list[str] = []
    ctrl = GrowthController(cfg, TrainConfig(batch_size=8), on_phase=phases.append)
    model = GrowCLIP(tiny_arch())
    assert (
        ctrl.grow(model, trigger="t", step=1, samples=1, train_batches=iter(random_batches(model.arch, 3)))
        is None
    )
    assert ctrl.last_refusal == "no held-out data yet" and not ctrl.history
    hold = random_batches(model.arch, 2, seed=9)
    grown = ctrl.grow(
        model, trigger="forced", step=5, samples=40, train_batches=itertools.cycle(hold),
        holdout_batches=hold,
    )  # fmt: skip
    assert grown is not None, ctrl.history[-1].reason
    new, event = grown
    assert event.policy == "search" and event.trigger == "forced" and event.reason.startswith("won:")
    assert event.outcome == "grown" and ctrl.generation == 1
    scored = [c for c in event.candidates if "val_loss" in c]
    assert sorted(c["name"] for c in scored) == ["deepen:image+1", "deepen:text+1", "widen_mlp:text+16"]
    assert event.ops[0] in {c["name"] for c in scored}
    assert new.arch.to_dict() == event.arch_after and new.arch != model.arch
    assert event.supernet["steps"] == 20 and set(event.phases) == {"supernet_s", "selection_s", "inherit_s"}
    assert event.supernet["budget"]["forced"] and event.work["growth_flops"] > 0
    assert phases == ["training_supernet", "selecting", "inheriting", "done"]


def test_growth_is_declined_when_no_candidate_can_help() -> None:
    """Without supernet training every candidate computes exactly the base's function: none can beat
    it, so nothing grows, and the decision is recorded with every score."""
    cfg = GrowthConfig(
        space=("deepen:image+1", "deepen:text+1", "widen:text*2"), max_ops_per_step=1, supernet_steps=0
    )
    ctrl = GrowthController(cfg, TrainConfig(batch_size=8))
    model = random_model(tiny_arch())
    hold = random_batches(model.arch, 2, seed=9)
    out = ctrl.grow(
        model, trigger="forced", step=7, samples=70, train_batches=iter(hold), holdout_batches=hold
    )
    assert out is None and ctrl.generation == 0
    (event,) = ctrl.history
    assert event.outcome == "declined" and event.reason.startswith("declined:") and event.ops == ()
    assert event.arch_after == model.arch.to_dict() and event.step == 7
    scored = [c for c in event.candidates if "val_loss" in c]
    assert len(scored) == 3 and not any(c["beats_base"] for c in scored)
    assert all(abs(c["gain"]) < 1e-5 and c["margin"] >= cfg.min_gain for c in scored)
    restored = GrowthController(cfg, TrainConfig())
    restored.load_state_dict(json.loads(json.dumps(ctrl.state_dict())))
    assert restored.history == ctrl.history and restored.generation == 0


def test_search_waits_for_a_budget_that_pays_for_a_useful_search_and_stays_within_it() -> None:
    """A due search waits (search_wait says why) until search_budget_fraction of the work so far
    pays for min_supernet_steps supernet steps and every held-out sample; then it runs within it."""
    cfg = GrowthConfig(
        space=("deepen:image+1", "deepen:text+1"), max_ops_per_step=1, supernet_steps=1000,
        min_supernet_steps=5, search_budget_fraction=0.1, decline_z=0.0, min_gain=0.0,
        selection_samples=32,
    )  # fmt: skip
    ctrl = GrowthController(cfg, TrainConfig(batch_size=8))
    model = random_model(tiny_arch())
    hold = random_batches(model.arch, 4, seed=9)  # 4 batches of 8 = selection_samples
    assert ctrl.search_wait(model.arch, 8).startswith("search budget")
    assert (
        ctrl.search(model, trigger="volume", train_batches=itertools.cycle(hold), holdout_batches=hold)
        is None
    )
    assert ctrl.last_refusal.startswith("search budget")
    steps = 0
    while ctrl.search_wait(model.arch, 8):  # training steps of 8 samples, counted
        ctrl.observe_step(model, 1.0, samples=8, seconds=1.0)  # wall time: not the binding limit
        steps += 1
    assert steps > 1, "a single training step cannot pay for a useful search"
    plan = ctrl.search(model, trigger="volume", train_batches=itertools.cycle(hold), holdout_batches=hold)
    assert plan is not None
    budget = plan.supernet_stats["budget"]
    assert cfg.min_supernet_steps <= plan.supernet_stats["steps"] <= budget["planned_steps"] < 1000
    assert budget["scored_samples"] == 32
    assert ctrl.work.fractions()["flops"] <= 0.1 + 1e-9
    assert budget["search_flops"] == ctrl.work.growth_flops == ctrl.work.search_flops
    assert ctrl.search_wait(model.arch, 8), "the budget was spent: the next search waits again"


def test_a_search_is_sized_in_wall_time_at_the_searches_own_pace() -> None:
    """FLOPs are not seconds: when past searches ran slower per FLOP than training, a search the
    FLOPs allowance pays for still waits until the wall-time allowance pays for it too."""
    cfg = GrowthConfig(
        space=("deepen:image+1", "deepen:text+1"), max_ops_per_step=1, supernet_steps=1000,
        min_supernet_steps=5, search_budget_fraction=0.1, selection_samples=32,
    )  # fmt: skip
    ctrl = GrowthController(cfg, TrainConfig(batch_size=8))
    model = random_model(tiny_arch())
    while ctrl.search_wait(model.arch, 8):
        ctrl.observe_step(model, 1.0, samples=8, seconds=1.0)  # wall time: not the binding limit
    pace = ctrl.work.seconds_per_flop()
    assert pace is not None
    ctrl.work.add_growth(seconds=100 * pace * 1e3, flops=1e3, search=True)  # 100x training's pace
    why = ctrl.search_wait(model.arch, 8)
    allow_flops, allow_s = ctrl.work.allowance(0.1)
    assert why.startswith("search budget") and allow_flops > 0 and allow_s > 0
    while ctrl.search_wait(model.arch, 8):
        ctrl.observe_step(model, 1.0, samples=8, seconds=1.0)  # until the wall-time allowance pays
    hold = random_batches(model.arch, 4, seed=9)
    plan = ctrl.search(model, trigger="volume", train_batches=itertools.cycle(hold), holdout_batches=hold)
    assert plan is not None and plan.supernet_stats["steps"] >= cfg.min_supernet_steps


def test_plateau_trigger_fires_through_the_controller() -> None:
    cfg = GrowthConfig(
        samples_per_param=0, min_interval_samples=10**9, plateau_patience=20, plateau_smoothing=0.0,
        plateau_check_every=10, plateau_confirmations=3,
    )  # fmt: skip
    ctrl = GrowthController(cfg, TrainConfig())
    model = GrowCLIP(tiny_arch())
    for step in range(1, 40):
        ctrl.observe_step(model, 5.0 - 0.1 * step)  # falling fast: no plateau
        assert ctrl.due(samples=step, step=step, num_params=1) is None
    fired = []
    for step in range(40, 101):
        ctrl.observe_step(model, 1.0)  # flat from step 40
        if ctrl.due(samples=step, step=step, num_params=1) == "plateau":
            fired.append(step)
    # the window is all flat from step 59; checks at 60, 70 and 80 confirm it: it fires at 80, not 60
    assert fired[0] == 80


def test_one_noisy_check_does_not_fire_and_a_growth_restarts_the_trend() -> None:
    cfg = GrowthConfig(
        samples_per_param=0, min_interval_samples=10**9, plateau_patience=20, plateau_smoothing=0.0,
        plateau_check_every=10, plateau_confirmations=2, policy="plan", plan=("deepen:image+1",),
    )  # fmt: skip
    ctrl = GrowthController(cfg, TrainConfig())
    model = GrowCLIP(tiny_arch())
    fired = []
    for step in range(1, 121):
        # falls steadily, except one flat stretch that a single check (at step 40) sees as a plateau
        loss = 10.0 - 0.05 * step if not 21 <= step <= 40 else 10.0 - 0.05 * 21
        ctrl.observe_step(model, loss)
        if ctrl.due(samples=step, step=step, num_params=1) is not None:
            fired.append(step)
    assert fired == []
    ctrl.plateau_hits = 1
    assert ctrl.smoother.values
    grown = ctrl.grow(model, trigger="plateau", step=140, samples=140)
    assert grown is not None
    # the loss window and the confirmations start over on the grown model
    assert not ctrl.smoother.values and ctrl.smoother.current is None and ctrl.plateau_hits == 0


def test_growth_after_a_restore_splits_weights_as_without_it() -> None:
    """The growth generator derives from (seed, generation): a restored controller grows identically."""
    cfg = GrowthConfig(policy="plan", plan=("widen:image*2", "widen:text*2"), seed=5)
    base = random_model(tiny_arch())
    first = GrowthController(cfg, TrainConfig())
    once = first.grow(base, trigger="t", step=1, samples=1)
    assert once is not None
    restored = GrowthController(cfg, TrainConfig())
    restored.load_state_dict(first.state_dict())
    a = first.grow(once[0], trigger="t", step=2, samples=2)
    b = restored.grow(once[0], trigger="t", step=2, samples=2)
    assert a is not None and b is not None and a[0].arch == b[0].arch
    sa, sb = a[0].state_dict(), b[0].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def blend_plan(model: GrowCLIP) -> GrowthPlan:
    space = ("widen:image*2", "widen_mlp:text+8", "deepen:shared+1")
    cands = candidate_set(model.arch, GrowthConfig(space=space, max_ops_per_step=3, max_flops_factor=100.0))
    sn = Supernet(model, cands, torch.Generator().manual_seed(1), train_cfg=TrainConfig(), sample_k=1)
    sn.train(random_batches(model.arch, 3), steps=3, lr=1e-2)
    cand = max(cands, key=lambda c: len(c.ops))  # all three operators
    return GrowthPlan("t", GrowthChoice(cand.ops, "test"), model.arch, supernet=sn, candidate=cand)


@pytest.mark.parametrize("moved", [False, True])
def test_blend_is_the_line_from_the_current_model_to_the_scored_candidate(moved: bool) -> None:
    """m = 1 is the current function, m = 0 exactly the scored candidate, and m in between their
    element-wise mix in the supernet's own layout (not a second, independently drawn growth)."""
    base = random_model(operator_arch(shared_depth=1))
    plan = blend_plan(base)
    assert plan.supernet is not None and plan.candidate is not None
    # with train_during_search the model has trained on since the supernet was built from it
    model = randomized(GrowCLIP(base.arch), seed=4) if moved else base
    ends = {}
    for m in (0.0, 0.5, 1.0):
        ends[m] = GrowthController(GrowthConfig(momentum=m), TrainConfig()).inherit(plan, model)
    scored = plan.supernet.extract(plan.candidate)
    assert all(torch.equal(v, scored.state_dict()[k]) for k, v in ends[0.0].state_dict().items())
    images, tokens = random_batches(base.arch, 1, seed=8)[0].images, random_batches(base.arch, 1)[0].tokens
    with torch.no_grad():
        assert torch.allclose(
            ends[1.0](images, tokens).image_embeds, model(images, tokens).image_embeds, atol=1e-5
        )
        assert torch.allclose(
            ends[1.0](images, tokens).text_embeds, model(images, tokens).text_embeds, atol=1e-5
        )
    mid, lo, hi = (ends[m].state_dict() for m in (0.5, 0.0, 1.0))
    if not moved:  # the inherited end is the supernet's own growth of the model, before training
        constructed = plan.supernet.extract(plan.candidate, plan.supernet.initial_state).state_dict()
        assert all(torch.equal(hi[k], constructed[k]) for k in hi)
    for k in mid:
        assert torch.allclose(mid[k], 0.5 * lo[k] + 0.5 * hi[k], atol=1e-6), k
    assert states_equal_pim(ends[0.5], blend(plan.supernet, plan.candidate, 0.5, model))


def states_equal_pim(a: GrowCLIP, b: GrowCLIP) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
