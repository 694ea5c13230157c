"""Growth benchmark: PIM at three momentum values vs plain inheritance vs the same architecture from scratch.

On the real stream (Fashion-MNIST train records with their captions, decoded exactly as the daemon
decodes them), a base model trains for `--base-steps`. One growth search then runs as in the daemon
(supernet over the growth space, trained on recent samples; candidates scored on the held-out
records), and its chosen architecture is built several ways:

- ``pim_blend_m{m}``: PIM "blend" with momentum m (m x inherited + (1 - m) x supernet-trained weights),
- ``pim_ema_m0.5``: PIM "ema" (grow from 0.5 x last + 0.5 x EMA of the pre-growth weights),
- ``inherit``: plain function-preserving inheritance (momentum 1, no supernet),
- ``scratch``: the same grown architecture from random initialisation,
- ``no_growth``: the base model keeps training unchanged (for reference).

Every variant then trains the same `--after-steps` on the same batches, inherited variants with
their optimizer state carried (random init starts a fresh optimizer with a full warmup). Reported:
validation loss (contrastive, on captioned records of the reserved test split) along the way and
at the end, zero-shot top-1 on 2,000 test images, and the growth's phase timings.

Repeated over seeds, and compared *paired by seed*: for each comparison (each PIM variant against
plain inheritance, scratch and no growth) the per-seed differences are listed, and a conclusion
("lower in every seed") is stated only where they all agree in sign; otherwise the comparison says
"no conclusion". Medians are reported alongside, not as conclusions.

The search runs as a forced growth (not bounded by the search budget, so it trains the supernet the
full `--supernet-steps`). When it declines (no candidate beats the base by more than its noise), the
benchmark still grows the best-scored candidate, to compare the ways of starting it, and records
that the search declined. Usage: ``.venv/bin/python bench/growth_pim.py [--seeds 3] [--quick]``; a
``--quick`` smoke run writes to the temp directory unless ``--out`` is given, never to results/.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from growclip_daemon.config import load_config
from growclip_stream.batch import Batch
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.pipeline import Decoder, Sample, collate, full_batches
from growclip_stream.data.records import RecordLimits, encode_binary, is_held_out
from growclip_stream.evaluation import load_eval_set, zero_shot_top1
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.growth.controller import GrowthChoice, GrowthController
from growclip_stream.growth.operators import apply_ops
from growclip_stream.growth.pim import carry_optimizer_state
from growclip_stream.model import ArchConfig, GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.train.trainer import OnlineTrainer

ROOT = Path(__file__).resolve().parents[1]


class _Msg:
    """A record in the binary wire format, as the daemon receives it."""

    def __init__(self, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.value, self.headers = value, tuple(headers)


def decoded(split: str, seed: int, arch: ArchConfig) -> Iterator[Sample]:
    decoder = Decoder(ImageTransform(arch.image_size, arch.channels), RecordLimits())
    for record in iter_records("fashion-mnist", split=split, seed=seed, repeat=True):  # type: ignore[arg-type]
        yield decoder(_Msg(*encode_binary(record, "image/png")))


def machine() -> dict[str, str | int]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": cpu,
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_seed(
    seed: int, args: argparse.Namespace, arch: ArchConfig, eval_set, val_batches: list[Batch]
) -> dict:
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    train_cfg = cfg.train
    tok = ByteTokenizer(arch.context_length)
    torch.manual_seed(seed)
    stream = decoded("train", seed, arch)
    holdout: list[Sample] = []
    need = args.base_steps + args.after_steps

    def batches(n: int) -> list[Batch]:
        out: list[Batch] = []
        fresh: list[Sample] = []
        for s in stream:
            if is_held_out(s.id, cfg.loop.holdout_fraction * 5):  # more held-out records, for the scores
                holdout.append(s)
                continue
            fresh.append(s)
            if len(fresh) == train_cfg.batch_size:
                out.append(collate(fresh, tok))
                fresh = []
                if len(out) == n:
                    break
        return out

    base_batches = batches(args.base_steps)
    after_batches = batches(args.after_steps)
    assert len(after_batches) == args.after_steps, f"stream ran out ({need} batches wanted)"

    base = OnlineTrainer(GrowCLIP(arch), train_cfg)
    ema_cfg = GrowthConfig(pim_mode="ema", momentum=0.5, ema_decay=0.99, seed=seed)
    ema_ctrl = GrowthController(ema_cfg, train_cfg)
    for b in base_batches:
        st = base.train_step(b)
        ema_ctrl.observe_step(base.model, st.loss, samples=len(b), seconds=st.seconds)

    # One growth search, as the daemon runs it (supernet on recent samples, scores on held-out ones).
    search_cfg = GrowthConfig(supernet_steps=args.supernet_steps, momentum=0.5, seed=seed)
    ctrl = GrowthController(search_cfg, train_cfg)
    recent = base_batches[-args.supernet_steps :]
    hold = list(full_batches(holdout, cfg.loop.eval_batch_size, tok))[:8]
    t0 = time.perf_counter()
    plan = ctrl.search(base.model, trigger="forced", train_batches=iter(recent * 2), holdout_batches=hold,
                       optimizer=base.optimizer)  # fmt: skip
    search_s = time.perf_counter() - t0
    assert plan is not None and plan.supernet is not None
    declined = plan.declined
    if declined:  # grow the best-scored candidate anyway: this benchmark compares ways of starting it
        scored = [c for c in plan.choice.candidates if c.get("gain") is not None]
        top = max(scored, key=lambda c: c["gain"])
        cand = next(c for c in plan.supernet.candidates if c.name == top["name"])
        plan = dataclasses.replace(
            plan, candidate=cand, declined=False,
            choice=GrowthChoice(cand.ops, f"search declined; grown: {top['name']}", plan.choice.candidates),
        )  # fmt: skip
    assert plan.candidate is not None
    ops = plan.choice.ops

    variants: dict[str, GrowCLIP] = {}
    for m in args.momenta:
        c = GrowthController(
            GrowthConfig(supernet_steps=args.supernet_steps, momentum=m, seed=seed), train_cfg
        )
        variants[f"pim_blend_m{m}"] = c.inherit(plan, base.model)
    variants["pim_ema_m0.5"] = ema_ctrl.inherit(plan, base.model)
    variants["inherit"] = apply_ops(base.model, ops, torch.Generator().manual_seed(seed))
    variants["scratch"] = GrowCLIP(plan.candidate.arch)
    variants["no_growth"] = copy.deepcopy(base.model)

    results: dict[str, dict] = {}
    for name, model in variants.items():
        trainer = OnlineTrainer(model, train_cfg)
        if name not in ("scratch", "no_growth"):
            trainer.resume(step=base.step, samples=base.samples)
            trainer.swap_model(model)  # re-warm, as after a real growth
            carry_optimizer_state(base.model, base.optimizer, model, trainer.optimizer, ops)
        elif name == "no_growth":
            trainer.optimizer.load_state_dict(base.optimizer.state_dict())
            trainer.resume(step=base.step, samples=base.samples)
        curve = []
        start = time.perf_counter()
        for i, b in enumerate(after_batches, 1):
            trainer.train_step(b)
            if i % args.eval_every == 0 or i == len(after_batches):
                curve.append((i, trainer.eval_loss(val_batches)))
        results[name] = {
            "params": model.arch.num_params(),
            "val_loss_curve": curve,
            "val_loss": curve[-1][1],
            "zero_shot_top1": zero_shot_top1(trainer.model, eval_set),
            "train_seconds": time.perf_counter() - start,
        }
    return {
        "seed": seed,
        "chosen": plan.choice.ops and ",".join(str(o) for o in ops),
        "search_declined": declined,
        "reason": plan.choice.reason,
        "base_val_loss": base.eval_loss(val_batches),
        "base_zero_shot_top1": zero_shot_top1(base.model, eval_set),
        "search_seconds": search_s,
        "phases": plan.phases,
        "supernet": plan.supernet_stats,
        "variants": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--after-steps", type=int, default=200)
    parser.add_argument("--supernet-steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--momenta", type=float, nargs=3, default=[0.0, 0.5, 0.9])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="default: results/growth_pim.json; with --quick, a file in the temp directory",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.base_steps, args.after_steps, args.supernet_steps, args.eval_every = 2, 20, 10, 5, 5
    if args.out is None:  # a smoke run never overwrites committed results
        args.out = (
            Path(tempfile.gettempdir()) / "growth_pim_quick.json"
            if args.quick
            else ROOT / "bench" / "results" / "growth_pim.json"
        )
    arch = load_config(ROOT / "configs" / "demo.yaml").model
    eval_set = load_eval_set("fashion-mnist", arch)
    tok = ByteTokenizer(arch.context_length)
    val_samples = [s for _, s in zip(range(2048), decoded("test", 0, arch), strict=False)]
    val_batches = list(full_batches(val_samples, 64, tok))
    runs = []
    for seed in range(args.seeds):
        t = time.perf_counter()
        runs.append(run_seed(seed, args, arch, eval_set, val_batches))
        print(f"seed {seed}: {time.perf_counter() - t:.0f}s, chose {runs[-1]['chosen']}", flush=True)
    names = list(runs[0]["variants"])
    summary = {
        name: {
            "val_loss_median": statistics.median(r["variants"][name]["val_loss"] for r in runs),
            "zero_shot_top1_median": statistics.median(r["variants"][name]["zero_shot_top1"] for r in runs),
            "params_median": statistics.median(r["variants"][name]["params"] for r in runs),
        }
        for name in names
    }
    comparisons = paired(runs, names)
    out = {
        "benchmark": "growth_pim",
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"config": "configs/demo.yaml"},
        "summary": summary,
        "paired_by_seed": comparisons,
        "search_seconds_median": statistics.median(r["search_seconds"] for r in runs),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    for name in names:
        s = summary[name]
        print(f"{name:16s} val_loss {s['val_loss_median']:.4f}  zero-shot {s['zero_shot_top1_median']:.3f}")
    for key, c in comparisons.items():
        loss, top1 = c["val_loss"]["conclusion"], c["zero_shot_top1"]["conclusion"]
        print(f"{key:34s} val_loss: {loss}; zero-shot: {top1}")
    print(f"wrote {args.out}")


def _verdict(diffs: list[float], lower: str, higher: str) -> str:
    """A conclusion only where every seed's difference has the same sign."""
    if len(diffs) >= 2 and all(d < 0 for d in diffs):
        return f"{lower} in every seed ({len(diffs)})"
    if len(diffs) >= 2 and all(d > 0 for d in diffs):
        return f"{higher} in every seed ({len(diffs)})"
    return "no conclusion: the seeds disagree" if len(diffs) >= 2 else "no conclusion: one seed"


def paired(runs: list[dict], names: list[str]) -> dict[str, dict]:
    """Each PIM variant against inherit, scratch and no_growth: per-seed differences (variant minus
    reference, same seed, same batches) and a conclusion only where their signs agree."""
    out: dict[str, dict] = {}
    for name in (n for n in names if n.startswith("pim_")):
        for ref in ("inherit", "scratch", "no_growth"):
            loss = [r["variants"][name]["val_loss"] - r["variants"][ref]["val_loss"] for r in runs]
            top1 = [
                r["variants"][name]["zero_shot_top1"] - r["variants"][ref]["zero_shot_top1"] for r in runs
            ]
            out[f"{name} - {ref}"] = {
                "val_loss": {"per_seed": loss, "conclusion": _verdict(loss, "lower", "higher")},
                "zero_shot_top1": {"per_seed": top1, "conclusion": _verdict(top1, "lower", "higher")},
            }
    return out


if __name__ == "__main__":
    main()
