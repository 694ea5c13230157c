"""The growth experiment: does a model that grows with its stream beat a fixed one at equal compute?

One stream of real data that gets harder in stages, so that a small model saturates and capacity
can pay off. The stage is set by the share of the arm's compute budget already spent, so every arm
sees every stage:

1. (first third) single Fashion-MNIST items with templated captions ("a photo of a sneaker");
2. (second third) half singles, half 2x2 compositions of two real items in two of four cells, with
   a caption that says where each is ("a bag above right of a sneaker");
3. (last third) a third each of singles, compositions and images with human-written captions
   (Tux Paint stamps, Twitter emoji names, openclipart titles), all converted to the model's
   28x28 grayscale geometry.

Arms, all under one training-FLOPs budget (forward + backward = 3x forward FLOPs per sample, plus
every FLOP growth spends besides training: the supernet, scoring candidates, and the guard's base
model trained beside each fresh growth):

- ``fixed_small``: the initial architecture, never grown;
- ``fixed_large``: from scratch at the largest architecture a grown arm of the same seed ends at
  (the ``grown_search`` arm's when it grows the most; if no arm grows it equals ``fixed_small``);
- ``grown_search``: the product's method (supernet search, selection, PIM), as configured;
- ``grown_inherit``: the same search, but plain function-preserving inheritance (momentum 1);
- ``grown_schedule``: growth on the same triggers but by a fixed plan of operators (no search);
- ``grown_noshared``: the search without the shared-encoder operators.

Every arm runs through the product's own online loop (held-out split, replay, triggers, the growth
controller) on an in-memory source. Arms of one seed see the same records in the same order (the
k-th record of each kind is the same in every arm), so comparisons are paired by seed; a claim is
made only where every seed agrees in sign.

Measured per arm: held-out contrastive loss on a fixed evaluation set (test splits of all three
stages) against FLOPs; at the end zero-shot top-1 on the reserved Fashion-MNIST test images
(prompt ensemble) and image<->text retrieval R@1 both ways on the Tux Paint and emoji test splits;
the FLOPs each arm needs to reach the fixed-large arm's final held-out loss.

Usage (from the repository root):
    python bench/growth_experiment.py --mode quick   # ~15 min on 2 CPU cores; bench/results/*_quick.*
    python bench/growth_experiment.py --mode full    # sized for one H200-class GPU; *_full.*
    python bench/growth_experiment.py --mode smoke --out DIR  # seconds, for the tests; never bench/results
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from growclip_stream.batch import Batch
from growclip_stream.data.datasets import class_caption, encode_png, iter_records, load_labelled
from growclip_stream.data.decode import DecodePipeline
from growclip_stream.data.images import ImageTransform, normalize_batch
from growclip_stream.data.pipeline import Decoder
from growclip_stream.data.records import RecordLimits
from growclip_stream.growth.config import DEFAULT_SPACE, GrowthConfig
from growclip_stream.growth.controller import GrowthController, GrowthEvent
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig
from growclip_stream.model.tokenizer import ByteTokenizer
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.loop import LoopConfig, OnlineLoop
from growclip_stream.train.trainer import OnlineTrainer, StepStats

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ARMS = ("fixed_small", "grown_search", "grown_inherit", "grown_schedule", "grown_noshared", "fixed_large")
HUMAN_SETS = ("tuxpaint", "emoji", "openclipart")
RETRIEVAL_SETS = ("tuxpaint", "emoji")
ZERO_SHOT_TEMPLATES = ("a photo of {a}", "a picture of {a}", "an image of {a}", "{a}")

log = logging.getLogger("growth_experiment")


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Scale:
    """How big one run of the experiment is."""

    seeds: tuple[int, ...]
    budget_small_samples: int  # the budget: FLOPs of this many fixed-small training samples
    arch: ArchConfig  # the initial (fixed-small) architecture
    train: TrainConfig
    loop: LoopConfig
    growth: GrowthConfig
    curve_points: int  # held-out loss evaluations per arm, evenly spaced in FLOPs
    eval_per_kind: int  # fixed evaluation samples per stream kind (held-out loss)
    zero_shot_images: int
    retrieval_items: int  # per retrieval set
    device: str = "cpu"
    torch_threads: int = 0  # 0 = torch's default


def _arch(width: int, context: int) -> ArchConfig:
    return ArchConfig(
        image=TowerConfig(width, 1, 2 * width, 16),
        text=TowerConfig(width, 1, 2 * width, 16),
        shared=TowerConfig(width, 0, 2 * width, 16),
        embed_dim=64,
        image_size=28,
        patch_size=7,
        channels=1,
        context_length=context,
    )


def scale_for(mode: str) -> Scale:
    """Sizes per mode: smoke (seconds, tests), quick (2 CPU cores, ~15 min), full (one H200)."""
    growth = GrowthConfig(
        policy="search",
        samples_per_param=0.3,
        min_interval_samples=8_000,
        supernet_steps=20,
        momentum=0.5,
        max_params=3_000_000,
        max_flops_factor=4.0,
    )
    if mode == "smoke":
        return Scale(
            seeds=(0,),
            budget_small_samples=3_000,
            arch=_arch(16, 48),
            train=TrainConfig(batch_size=32, lr=2e-3, warmup_steps=5, rewarm_steps=5),
            loop=LoopConfig(holdout_fraction=0.05, eval_batch_size=16, eval_every_steps=10**6),
            growth=replace(
                growth,
                min_interval_samples=800,
                samples_per_param=0.0,
                supernet_steps=3,
                selection_samples=32,
                search_budget_fraction=0.5,  # a smoke run is too short for a 10% search budget
                guard_steps=5,
            ),
            curve_points=3,
            eval_per_kind=32,
            zero_shot_images=100,
            retrieval_items=32,
            torch_threads=1,
        )
    if mode == "quick":
        return Scale(
            seeds=(0, 1, 2),
            budget_small_samples=36_000,
            arch=_arch(32, 64),
            train=TrainConfig(batch_size=128, lr=2e-3, warmup_steps=30, rewarm_steps=20),
            loop=LoopConfig(eval_every_steps=10**6),
            # a quarter of the work for the search (the daemon's default is a tenth): at this budget a
            # tenth buys about one supernet step per growth; the arm's budget pays for it either way
            growth=replace(growth, min_interval_samples=6_000, search_budget_fraction=0.25, guard_steps=30),
            curve_points=8,
            eval_per_kind=128,
            zero_shot_images=500,
            retrieval_items=150,
        )
    if mode == "full":
        return Scale(
            seeds=(0, 1, 2),
            budget_small_samples=3_000_000,
            arch=_arch(64, 64),
            train=TrainConfig(batch_size=512, lr=2e-3, warmup_steps=50, rewarm_steps=30, device="cuda"),
            loop=LoopConfig(eval_batch_size=128, eval_every_steps=10**6),
            growth=replace(growth, min_interval_samples=200_000, max_params=60_000_000, supernet_steps=50),
            curve_points=20,
            eval_per_kind=1024,
            zero_shot_images=10_000,
            retrieval_items=500,
            device="cuda",
        )
    raise ValueError(f"unknown mode {mode!r}")


def arm_growth(scale: Scale, arm: str) -> GrowthConfig | None:
    """The growth settings of an arm (None: a fixed arm)."""
    g = scale.growth
    if arm.startswith("fixed"):
        return None
    if arm == "grown_search":
        return g
    if arm == "grown_inherit":
        return replace(g, momentum=1.0)
    if arm == "grown_schedule":
        return replace(g, policy="plan", momentum=1.0)
    if arm == "grown_noshared":
        return replace(g, space=tuple(op for op in DEFAULT_SPACE if ":shared" not in op))
    raise ValueError(f"unknown arm {arm!r}")


# ----------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Message:
    """A binary-format stream record: the encoded image as the value, id and caption as headers."""

    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def _message(record_id: str, caption: str, png: bytes) -> Message:
    return Message(
        png, (("id", record_id.encode()), ("caption", caption.encode()), ("content-type", b"image/png"))
    )


@cache
def _fashion(split: str) -> tuple[tuple[bytes, ...], tuple[int, ...], tuple[str, ...]]:
    images, labels, classes = load_labelled("fashion-mnist", split)
    return tuple(images), tuple(labels), classes


def _article(name: str) -> str:
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


_RELATION = {  # (row of A - row of B, column of A - column of B) -> where A is relative to B
    (0, -1): "left of", (0, 1): "right of", (-1, 0): "above", (1, 0): "below",
    (-1, -1): "above left of", (-1, 1): "above right of", (1, -1): "below left of", (1, 1): "below right of",
}  # fmt: skip


def mosaic(split: str, rng: random.Random, record_id: str) -> Message:
    """Two real Fashion-MNIST items in two of the four 14x14 cells of a 28x28 image, and where."""
    images, labels, classes = _fashion(split)
    cells = rng.sample(range(4), 2)
    picks = [rng.randrange(len(images)) for _ in cells]
    canvas = np.zeros((28, 28), dtype=np.uint8)
    for cell, idx in zip(cells, picks, strict=True):
        pixels = cv2.imdecode(np.frombuffer(images[idx], np.uint8), cv2.IMREAD_GRAYSCALE)
        r, c = divmod(cell, 2)
        canvas[14 * r : 14 * r + 14, 14 * c : 14 * c + 14] = cv2.resize(
            pixels, (14, 14), interpolation=cv2.INTER_AREA
        )
    (ra, ca), (rb, cb) = divmod(cells[0], 2), divmod(cells[1], 2)
    a, b = (classes[labels[i]] for i in picks)
    caption = f"{_article(a)} {_RELATION[(ra - rb, ca - cb)]} {_article(b)}"
    return _message(record_id, caption, encode_png(canvas))


class StagedStream:
    """The experiment's records for one seed. Kinds are drawn per record index from a seeded RNG, so
    whatever the stage mix, the k-th record of each kind is the same in every arm of the seed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._singles = iter_records("fashion-mnist", "train", seed=seed, repeat=True)
        self._human = {name: iter_records(name, "train", seed=seed, repeat=True) for name in HUMAN_SETS}
        self._mosaic_rng = random.Random(f"mosaic:{seed}")
        self._mix = random.Random(f"mix:{seed}")
        self._human_pick = random.Random(f"human:{seed}")
        self.mosaics = 0
        self.served = 0

    @staticmethod
    def stage(progress: float) -> int:
        return 0 if progress < 1 / 3 else 1 if progress < 2 / 3 else 2

    def next(self, progress: float) -> Message:
        u = self._mix.random()
        stage = self.stage(progress)
        kind = (
            "single"
            if stage == 0 or u < 1 / (stage + 1)
            else "mosaic"
            if stage == 1 or u < 2 / 3
            else "human"
        )
        self.served += 1
        if kind == "single":
            rec = next(self._singles)
            return _message(rec.id, rec.caption, rec.image)
        if kind == "mosaic":
            self.mosaics += 1
            return mosaic("train", self._mosaic_rng, f"mosaic-{self.seed}-{self.mosaics}")
        rec = next(self._human[self._human_pick.choice(HUMAN_SETS)])
        return _message(rec.id, rec.caption, rec.image)


class StreamSource:
    """The loop's source over a StagedStream; the stage follows the arm's spent compute."""

    def __init__(self, stream: StagedStream, progress: Callable[[], float]) -> None:
        self.stream = stream
        self.progress = progress
        self.offset = 0

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Message]:
        n = max_records or 256
        self.offset += n
        p = self.progress()
        return [self.stream.next(p) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.offset}

    def state_after(self, state: dict[str, Any], messages: Sequence[Any]) -> dict[str, Any]:
        return {"offset": int(state["offset"]) + len(messages)}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        self.offset = int(state["offset"])
        return True

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    @property
    def paused(self) -> bool:
        return False

    def commit(self, state: dict[str, Any] | None = None) -> None:
        pass

    def lag(self) -> dict[int, int]:
        return {}

    def close(self) -> None:
        pass


class DeadLetters:
    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}

    def send(self, msg: Any, reason: str, detail: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def flush(self) -> bool:
        return True

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalData:
    """Fixed evaluation data, decoded once for the experiment's input geometry."""

    holdout: tuple[Batch, ...]  # held-out loss: the test splits of all three kinds
    zs_images: torch.Tensor  # (N, C, H, W) Fashion-MNIST test images
    zs_labels: torch.Tensor  # (N,)
    zs_classes: tuple[str, ...]
    retrieval: dict[str, tuple[torch.Tensor, tuple[str, ...]]]  # set -> (images, captions)


def build_eval(scale: Scale) -> EvalData:
    arch = scale.arch
    transform = ImageTransform(arch.image_size, arch.channels)
    limits = RecordLimits()
    tok = ByteTokenizer(arch.context_length)

    def pixels(blobs: Sequence[bytes]) -> torch.Tensor:
        return normalize_batch([transform.pixels(b, limits) for b in blobs])

    rng = random.Random("eval")
    images, labels, classes = _fashion("test")
    n = scale.eval_per_kind
    samples: list[tuple[bytes, str]] = [
        (images[i], class_caption(classes[labels[i]], rng)) for i in range(len(images) - n, len(images))
    ]
    samples += [
        (m.value, dict(m.headers)["caption"].decode())
        for m in (mosaic("test", rng, f"e{i}") for i in range(n))
    ]
    human = [r for name in HUMAN_SETS for r in iter_records(name, "test", seed=0)]
    rng.shuffle(human)
    samples += [(r.image, r.caption) for r in human[:n]]
    rng.shuffle(samples)
    b = scale.loop.eval_batch_size
    holdout = tuple(
        Batch(
            pixels([s[0] for s in chunk]),
            tok.encode([s[1] for s in chunk]),
            tuple(str(j) for j in range(len(chunk))),
        )
        for chunk in (samples[i : i + b] for i in range(0, len(samples) - b + 1, b))
    )
    zs = scale.zero_shot_images
    retrieval = {}
    for name in RETRIEVAL_SETS:
        recs = list(iter_records(name, "test", seed=0))[: scale.retrieval_items]
        retrieval[name] = (pixels([r.image for r in recs]), tuple(r.caption for r in recs))
    return EvalData(
        holdout=holdout,
        zs_images=pixels(images[:zs]),
        zs_labels=torch.tensor(labels[:zs]),
        zs_classes=classes,
        retrieval=retrieval,
    )


@torch.inference_mode()
def _embed_texts(model: GrowCLIP, texts: Sequence[str], device: torch.device) -> torch.Tensor:
    tok = ByteTokenizer(model.arch.context_length)
    return torch.cat(
        [model.encode_text(tok.encode(texts[i : i + 256]).to(device)) for i in range(0, len(texts), 256)]
    )


@torch.inference_mode()
def _embed_images(model: GrowCLIP, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([model.encode_image(images[i : i + 256].to(device)) for i in range(0, len(images), 256)])


@torch.inference_mode()
def zero_shot_top1(model: GrowCLIP, data: EvalData, device: torch.device) -> float:
    prompts = [t.format(a=_article(c)) for c in data.zs_classes for t in ZERO_SHOT_TEMPLATES]
    text = _embed_texts(model, prompts, device).view(len(data.zs_classes), len(ZERO_SHOT_TEMPLATES), -1)
    text = F.normalize(text.mean(dim=1), dim=-1)
    pred = (_embed_images(model, data.zs_images, device) @ text.T).argmax(dim=1).cpu()
    return float((pred == data.zs_labels).float().mean())


def recall_at_1(sims: np.ndarray, captions: Sequence[str]) -> tuple[float, float]:
    """Image->text and text->image R@1; an item whose caption equals the query's own counts as a hit."""
    same = np.array([[a == b for b in captions] for a in captions])
    i2t = same[np.arange(len(captions)), sims.argmax(axis=1)].mean()
    t2i = same[sims.argmax(axis=0), np.arange(len(captions))].mean()
    return float(i2t), float(t2i)


@torch.inference_mode()
def retrieval(model: GrowCLIP, data: EvalData, device: torch.device) -> dict[str, float]:
    i2t, t2i = [], []
    for images, captions in data.retrieval.values():
        sims = (_embed_images(model, images, device) @ _embed_texts(model, captions, device).T).cpu().numpy()
        a, b = recall_at_1(sims, captions)
        i2t.append(a)
        t2i.append(b)
    return {"image_to_text_r1": statistics.fmean(i2t), "text_to_image_r1": statistics.fmean(t2i)}


# ----------------------------------------------------------------------------- one arm


@dataclass
class ArmResult:
    arm: str
    seed: int
    curve: list[dict[str, float]] = field(
        default_factory=list
    )  # flops, train_flops, growth_flops, holdout_loss
    final: dict[str, Any] = field(default_factory=dict)
    growths: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0


def growth_flops(controller: GrowthController) -> float:
    """Compute the growth controller spent so far besides training: supernet training, scoring
    candidates, and the guard's base model trained beside each fresh growth."""
    return float(controller.work.growth_flops)


class Meter:
    """The loop's observer: counts training FLOPs and evaluates at even FLOPs intervals."""

    def __init__(self, run: ArmRun) -> None:
        self.run = run
        self.train_flops = 0.0

    def on_records(self, counts: dict[str, int]) -> None:
        pass

    def on_step(self, stats: StepStats, data_wait_s: float) -> None:
        arch = self.run.loop.trainer.model.arch
        self.train_flops += 3.0 * arch.flops_per_sample() * stats.batch_size
        self.run.maybe_evaluate()

    def on_growth(self, event: GrowthEvent) -> None:
        pass  # read from the controller's history at the end

    def on_eval(self, loss: float) -> None:
        pass


class ArmRun:
    def __init__(
        self, scale: Scale, arm: str, seed: int, arch: ArchConfig, budget: float, data: EvalData
    ) -> None:
        self.scale, self.budget, self.data = scale, budget, data
        self.device = torch.device(scale.device)
        self.result = ArmResult(arm, seed)
        torch.manual_seed(seed)
        random.seed(seed)
        growth = arm_growth(scale, arm)
        train = replace(scale.train, seed=seed)
        self.meter = Meter(self)
        self.controller = GrowthController(
            replace(growth or scale.growth, enabled=growth is not None, seed=seed), train
        )
        self.loop = OnlineLoop(
            source=StreamSource(StagedStream(seed), self.progress),
            dead_letter=DeadLetters(),
            pipeline=DecodePipeline(
                Decoder(ImageTransform(arch.image_size, arch.channels), RecordLimits()),
                scale.loop.holdout_fraction,
                1,
                "thread",
            ),
            tokenizer=ByteTokenizer(arch.context_length),
            trainer=OnlineTrainer(GrowCLIP(arch), train),
            growth=self.controller,
            cfg=scale.loop,
            publish=lambda *a, **k: None,
            observer=self.meter,
        )
        self.next_point = 0

    def spent(self) -> float:
        s = growth_flops(self.controller)
        return self.meter.train_flops + s

    def progress(self) -> float:
        return min(1.0, self.spent() / self.budget)

    def maybe_evaluate(self, force: bool = False) -> None:
        points = self.scale.curve_points
        if not force and self.spent() < self.budget * (self.next_point + 1) / points:
            return
        self.next_point += 1
        trainer = self.loop.trainer
        loss = trainer.eval_loss(self.data.holdout)
        was_training = trainer.model.training
        self.result.curve.append(
            {
                "flops": self.spent(),
                "train_flops": self.meter.train_flops,
                "growth_flops": self.spent() - self.meter.train_flops,
                "samples": trainer.samples,
                "holdout_loss": float(loss if loss is not None else math.nan),
                "zero_shot_top1": zero_shot_top1(trainer.model.eval(), self.data, self.device),
                "params": trainer.model.arch.num_params(),
            }
        )
        trainer.model.train(was_training)

    def run(self) -> ArmResult:
        start = time.perf_counter()
        try:
            while self.spent() < self.budget:
                self.loop.run_once()
        finally:
            self.loop.pipeline.close()
        if self.result.curve[-1]["flops"] != self.spent():
            self.maybe_evaluate(force=True)
        model = self.loop.trainer.model.eval()
        self.result.final = {
            "holdout_loss": self.result.curve[-1]["holdout_loss"],
            "zero_shot_top1": zero_shot_top1(model, self.data, self.device),
            **retrieval(model, self.data, self.device),
            "params": model.arch.num_params(),
            "flops_per_sample": model.arch.flops_per_sample(),
            "arch": model.arch.to_dict(),
            "samples_trained": self.loop.trainer.samples,
            "steps": self.loop.trainer.step,
            "train_flops": self.meter.train_flops,
            "growth_flops": self.spent() - self.meter.train_flops,
        }
        self.result.growths = [
            {"outcome": e.outcome, "step": e.step, "trigger": e.trigger, "ops": list(e.ops),
             "params_after": e.params_after, "guard": e.guard}
            for e in self.controller.history
        ]  # fmt: skip
        self.result.wall_s = time.perf_counter() - start
        return self.result


# ----------------------------------------------------------------------------- analysis


def flops_to_reach(curve: Sequence[dict[str, float]], target: float) -> float | None:
    """FLOPs at which the held-out loss first reaches `target` (linear between points), or None."""
    prev: dict[str, float] | None = None
    for point in curve:
        if point["holdout_loss"] <= target:
            if prev is None or prev["holdout_loss"] == point["holdout_loss"]:
                return point["flops"]
            frac = (prev["holdout_loss"] - target) / (prev["holdout_loss"] - point["holdout_loss"])
            return prev["flops"] + frac * (point["flops"] - prev["flops"])
        prev = point
    return None


def _outcomes(events: Sequence[dict[str, Any]]) -> str:
    """grown/declined/rolled back counts of one run's growth decisions."""
    n = {k: sum(1 for e in events if e["outcome"] == k) for k in ("grown", "declined", "rolled_back")}
    return f"{n['grown']}/{n['declined']}/{n['rolled_back']}"


def summarise(results: Sequence[ArmResult], budget: float) -> dict[str, Any]:
    """Per arm medians, and the paired differences against fixed_large (and fixed_small) by seed."""
    by = {(r.arm, r.seed): r for r in results}
    seeds = sorted({r.seed for r in results})
    arms = [a for a in ARMS if any(r.arm == a for r in results)]
    metrics = ("zero_shot_top1", "image_to_text_r1", "text_to_image_r1", "holdout_loss")
    table: dict[str, Any] = {}
    for arm in arms:
        row: dict[str, Any] = {}
        for m in metrics:
            row[m] = statistics.median(by[arm, s].final[m] for s in seeds)
        reach = []
        for s in seeds:
            target = by["fixed_large", s].final["holdout_loss"] if ("fixed_large", s) in by else math.nan
            f = flops_to_reach(by[arm, s].curve, target)
            reach.append(f / budget if f is not None else None)
        row["budget_share_to_reach_fixed_large_loss"] = reach
        row["params"] = [by[arm, s].final["params"] for s in seeds]
        row["growths"] = [_outcomes(by[arm, s].growths) for s in seeds]
        row["growth_flops_share"] = [by[arm, s].final["growth_flops"] / budget for s in seeds]
        row["budget_used"] = [
            (by[arm, s].final["growth_flops"] + by[arm, s].final["train_flops"]) / budget for s in seeds
        ]
        table[arm] = row
    paired: dict[str, Any] = {}
    for ref in ("fixed_large", "fixed_small"):
        for arm in arms:
            if arm == ref or not all((ref, s) in by for s in seeds):
                continue
            for m in metrics:
                diffs = [by[arm, s].final[m] - by[ref, s].final[m] for s in seeds]
                sign = [(-d if m == "holdout_loss" else d) for d in diffs]  # > 0: the arm is better
                verdict = (
                    "better on every seed" if all(x > 0 for x in sign)
                    else "worse on every seed" if all(x < 0 for x in sign)
                    else "no consistent difference"
                )  # fmt: skip
                paired[f"{arm} - {ref}: {m}"] = {"per_seed": diffs, "verdict": verdict}
    return {"arms": table, "paired": paired}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"# Growth experiment ({meta['mode']} mode)",
        "",
        f"Machine: {meta['machine']}. Seeds {meta['seeds']}; "
        f"budget {meta['budget_flops']:.3g} training FLOPs per arm (search included); "
        f"{meta['wall_s'] / 60:.1f} min in all.",
        "",
        "Medians over seeds. `reach`: share of the budget each seed needed to reach fixed_large's final "
        "held-out loss (— where it never did).",
        "",
        "| arm | zero-shot top-1 | R@1 image→text | R@1 text→image | final held-out loss | reach "
        "| params (per seed) | grown/declined/rolled back | growth-work share | budget used |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | --- |",
    ]
    for arm, row in summary["arms"].items():
        reach = ", ".join(
            "—" if r is None else f"{r:.2f}" for r in row["budget_share_to_reach_fixed_large_loss"]
        )
        search = ", ".join(f"{s:.2f}" for s in row["growth_flops_share"])
        lines.append(
            f"| {arm} | {row['zero_shot_top1']:.3f} | {row['image_to_text_r1']:.3f} "
            f"| {row['text_to_image_r1']:.3f} "
            f"| {row['holdout_loss']:.3f} | {reach} | {', '.join(str(p) for p in row['params'])} "
            f"| {', '.join(str(g) for g in row['growths'])} | {search} "
            f"| {', '.join(f'{u:.3f}' for u in row['budget_used'])} |"
        )
    lines += ["", "Paired by seed (arm minus reference, per seed):", ""]
    for name, p in summary["paired"].items():
        lines.append(f"- {name}: {', '.join(f'{d:+.3f}' for d in p['per_seed'])} ({p['verdict']})")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[ArmResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(ARMS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in results:
        xs = [p["flops"] for p in r.curve]
        ax[0].plot(xs, [p["holdout_loss"] for p in r.curve], color=colors[r.arm], alpha=0.8,
                   label=r.arm if r.seed == results[0].seed else None)  # fmt: skip
    ax[0].set_xlabel("training FLOPs (search included)")
    ax[0].set_ylabel("held-out contrastive loss")
    ax[0].legend(fontsize=8)
    for r in results:
        ax[1].plot([p["flops"] for p in r.curve], [p["zero_shot_top1"] for p in r.curve], color=colors[r.arm],
                   alpha=0.8)  # fmt: skip
    ax[1].set_xlabel("training FLOPs (search included)")
    ax[1].set_ylabel("zero-shot top-1, Fashion-MNIST test")
    fig.suptitle("one line per arm and seed; arms of a seed see the same stream")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def run(mode: str, out_dir: Path, arms: Sequence[str] = ARMS, machine: str | None = None) -> dict[str, Any]:
    scale = scale_for(mode)
    if scale.torch_threads:
        torch.set_num_threads(scale.torch_threads)
    budget = 3.0 * scale.arch.flops_per_sample() * scale.budget_small_samples
    start = time.perf_counter()
    data = build_eval(scale)
    results: list[ArmResult] = []
    for seed in scale.seeds:
        final_arch: ArchConfig | None = None
        for arm in arms:
            if arm == "fixed_large":
                if final_arch is None:
                    continue
                arch = final_arch
            else:
                arch = scale.arch
            res = ArmRun(scale, arm, seed, arch, budget, data).run()
            grown = ArchConfig.from_dict(res.final["arch"])
            if arm.startswith("grown") and (
                final_arch is None or grown.num_params() > final_arch.num_params()
            ):
                final_arch = grown
            results.append(res)
            log.info(
                "arm done",
                extra={"arm": arm, "seed": seed, "wall_s": round(res.wall_s, 1), "final": {
                    k: v for k, v in res.final.items() if k != "arch"}},
            )  # fmt: skip
    meta = {
        "mode": mode,
        "seeds": list(scale.seeds),
        "budget_flops": budget,
        "wall_s": time.perf_counter() - start,
        "machine": machine
        or f"{platform.machine()}, {torch.get_num_threads()} torch threads, {scale.device}",
        "torch": torch.__version__,
    }
    summary = summarise(results, budget)
    out = {"meta": meta, "summary": summary, "runs": [r.__dict__ for r in results]}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"growth_experiment_{mode}"
    (out_dir / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(summary, meta))
    plot(results, out_dir / f"{stem}.png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("smoke", "quick", "full"), default="quick")
    parser.add_argument("--out", type=Path, help="output folder (required for smoke; default bench/results)")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--machine", default=None, help="name of the machine, recorded with the results")
    args = parser.parse_args(argv)
    if args.mode == "smoke" and args.out is None:
        parser.error("--mode smoke needs --out (smoke runs never write bench/results)")
    if args.out is not None and args.mode == "smoke" and args.out.resolve() == RESULTS.resolve():
        parser.error("smoke runs never write bench/results")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    out = run(args.mode, args.out or RESULTS, args.arms, args.machine)
    print(markdown(out["summary"], out["meta"]))  # the table is the script's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
