"""Learning per step: GrowCLIP + OnlineTrainer (and the online loop) against a small reference CLIP.

Every arm trains on Fashion-MNIST train images with captions drawn from the dataset's templates,
and is scored by zero-shot top-1 on the first 2,000 images of the reserved test split at fixed
step counts: with the one prompt "a photo of a {}" and with evaluation.py's four-template
ensemble (prompts the training captions never use verbatim, so it shows whether the text tower
generalises). Arms of one seed see the same batches in the same order:

- ``reference``: a plain ~60-line CLIP (`RefCLIP`, PyTorch's own transformer layers and default
  initialisation, separate projection heads, byte tokens, AdamW with linear warmup, identical
  captions as positives), of the demo's width and depth.
- ``growclip:<key=value,...>``: GrowCLIP trained by OnlineTrainer. Keys: ``init`` (``model``: the
  model's own initialisation; ``legacy``: N(0, 0.02) everywhere, as before the width-scaled init),
  ``ctx`` (context length), ``lr``, ``warmup``, ``wd``, ``beta2``, ``clip`` (grad clip),
  ``width``/``depth`` (per tower), and ``feed``: ``direct`` (batches from the shared random
  order: the bare trainer), ``stream`` (the bare trainer on the record stream the daemon would
  consume, held-out ids skipped) or ``loop`` (the same stream through OnlineLoop: decode pipeline,
  held-out split, replay; ``replay`` sets replay_fraction, 0 disables it). Unset keys come from
  configs/demo.yaml.

Runs are separate processes, ``--jobs`` at a time, one torch thread each, interleaved over arms
and seeds. Results merge into bench/results/learning_reference.json under ``--tag``; ``--quick``
writes to /tmp only. Usage: ``.venv/bin/python bench/learning_reference.py --tag T --seeds 0 1
--steps 1000 --arms reference:ctx=64 growclip:init=legacy,ctx=32 growclip growclip:feed=loop``
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "learning_reference.json"
CACHE = Path("/tmp/growclip-bench-fmnist-pixels.npz")
SINGLE = ("a photo of {a}",)  # {a}: the class name with its article, as in evaluation.py
EVAL_IMAGES = 2000

# ----------------------------------------------------------------------------- the reference CLIP


class RefTower(nn.Module):
    def __init__(self, width: int, depth: int, mlp: int, tokens: int, embed_dim: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            width, width // 16, mlp, 0.0, "gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.ln = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.ln(x)), dim=-1)


class RefCLIP(nn.Module):
    """Patch ViT + causal byte-token transformer, pooled at the class token / first EOS."""

    def __init__(self, width: int, depth: int, mlp: int, ctx: int, embed_dim: int = 64) -> None:
        super().__init__()
        self.ctx = ctx
        self.patch = nn.Conv2d(1, width, 7, 7)
        self.cls = nn.Parameter(torch.zeros(width))
        self.image = RefTower(width, depth, mlp, 17, embed_dim)
        self.tok = nn.Embedding(259, width)
        self.text = RefTower(width, depth, mlp, ctx, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, w)
        x = torch.cat([self.cls.expand(len(x), 1, -1), x], 1) + self.image.pos
        return self.image.head(self.image.blocks(x)[:, 0])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.text.pos
        x = self.text.blocks(x, mask=self.mask, is_causal=True)
        eos = (tokens == 258).int().argmax(1)
        return self.text.head(x[torch.arange(len(x)), eos])

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.logit_scale.exp() * self.encode_image(images) @ self.encode_text(tokens).T
        pos = (tokens[:, None] == tokens[None]).all(-1).float()  # identical captions are positives
        target = pos / pos.sum(1, keepdim=True)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_reference(model: RefCLIP, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
                    on_step: Any) -> None:  # fmt: skip
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        images, tokens = next(batches)
        loss = model.loss(images, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        on_step(step + 1, float(loss.detach()))


# ----------------------------------------------------------------------------- data


def train_pixels() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """All train images as (N, 1, 28, 28) uint8 (decoded as the daemon decodes), labels, class names."""
    from growclip_stream.data.datasets import load_labelled
    from growclip_stream.data.images import ImageTransform
    from growclip_stream.data.records import RecordLimits

    if not CACHE.exists():
        images, labels, classes = load_labelled("fashion-mnist", "train")
        transform, limits = ImageTransform(28, 1), RecordLimits()
        pixels = np.stack([transform.pixels(b, limits) for b in images])
        tmp = CACHE.with_suffix(".tmp.npz")
        np.savez(tmp, pixels=pixels, labels=np.array(labels), classes=np.array(classes))
        tmp.rename(CACHE)
    data = np.load(CACHE)
    return data["pixels"], data["labels"], tuple(str(c) for c in data["classes"])


def direct_batches(seed: int, ctx: int, batch_size: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random images (epoch permutations) with a random caption template each; same for every arm."""
    from growclip_stream.data.datasets import class_caption
    from growclip_stream.data.images import normalize
    from growclip_stream.model.tokenizer import ByteTokenizer

    pixels, labels, classes = train_pixels()
    rng, caption_rng, tok = np.random.default_rng(seed), random.Random(seed), ByteTokenizer(ctx)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.permutation(len(pixels)).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        captions = [class_caption(classes[labels[i]], caption_rng) for i in idx]
        yield normalize(torch.from_numpy(pixels[idx])), tok.encode(captions)


class MemorySource:
    """The record stream as the daemon receives it (binary wire format), from memory."""

    def __init__(self, seed: int) -> None:
        from growclip_stream.data.datasets import iter_records

        self.records = iter_records("fashion-mnist", seed=seed, repeat=True)
        self.position = 0

    def poll(self, timeout_s: float, max_records: int | None = None) -> list[Any]:
        from growclip_stream.data.records import encode_binary

        out = []
        for _ in range(max_records or 256):
            value, headers = encode_binary(next(self.records), "image/png")
            out.append(_Msg(value, headers))
        self.position += len(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass


class _Msg:
    def __init__(self, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.value, self.headers = value, tuple(headers)


def stream_batches(seed: int, ctx: int, holdout: float, batch_size: int = 128) -> Iterator[Any]:
    """The bare trainer on the loop's stream: the same records in the same order, held-out ids skipped."""
    from growclip_stream.batch import Batch
    from growclip_stream.data.images import ImageTransform
    from growclip_stream.data.pipeline import Decoder, collate, route
    from growclip_stream.data.records import RecordLimits
    from growclip_stream.model.tokenizer import ByteTokenizer

    source, tok = MemorySource(seed), ByteTokenizer(ctx)
    decoder = Decoder(ImageTransform(28, 1), RecordLimits())
    pending = []
    while True:
        for msg in source.poll(0.0, batch_size):
            status, sample = route(decoder, msg, holdout)
            if status == "trained":
                pending.append(sample)
        while len(pending) >= batch_size:
            b = collate(pending[:batch_size], tok)
            pending = pending[batch_size:]
            yield Batch(b.images, b.tokens, b.ids)


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    def __init__(self, ctx: int) -> None:
        from growclip_stream.data.datasets import load_labelled
        from growclip_stream.data.images import ImageTransform, normalize_batch
        from growclip_stream.data.records import RecordLimits
        from growclip_stream.evaluation import PROMPT_TEMPLATES
        from growclip_stream.model.tokenizer import ByteTokenizer

        images, labels, self.classes = load_labelled("fashion-mnist", "test")
        transform, limits = ImageTransform(28, 1), RecordLimits()
        self.images = normalize_batch([transform.pixels(b, limits) for b in images[:EVAL_IMAGES]])
        self.labels = torch.tensor(labels[:EVAL_IMAGES])
        self.tok, self.ensemble = ByteTokenizer(ctx), PROMPT_TEMPLATES

    @torch.inference_mode()
    def top1(self, model: Any, templates: Sequence[str]) -> float:
        from growclip_stream.evaluation import class_prompts

        was = model.training
        model.eval()
        prompts = class_prompts(self.classes, templates)  # class-major
        text = model.encode_text(self.tok.encode(prompts)).view(len(self.classes), len(templates), -1)
        text = F.normalize(text.mean(1), dim=-1)
        pred = (model.encode_image(self.images) @ text.T).argmax(-1)
        model.train(was)
        return float((pred == self.labels).float().mean())

    def __call__(self, model: Any) -> dict[str, float]:
        return {"top1": self.top1(model, SINGLE), "top1_ensemble": self.top1(model, self.ensemble)}


# ----------------------------------------------------------------------------- one run


def parse_arm(arm: str) -> tuple[str, dict[str, str]]:
    kind, _, rest = arm.partition(":")
    if kind not in ("reference", "growclip"):
        raise ValueError(f"unknown arm {arm!r}")
    return kind, dict(kv.split("=", 1) for kv in rest.split(",") if kv)


def demo_settings() -> tuple[Any, Any, Any]:
    from growclip_daemon.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    return cfg.model, cfg.train, cfg.loop


def legacy_init(model: nn.Module) -> None:
    """The initialisation before the width-scaled one: N(0, 0.02) for every matrix, embedding, token."""
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln" in name or name == "logit_scale" or "ln_" in name:
            continue
        with torch.no_grad():
            p.normal_(0.0, 0.02)


def scheme_init(model: Any, scheme: str) -> None:
    """Candidate initialisations, to compare before one goes into the model (``fanin``, ``openclip``)."""
    a = model.arch
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                fan_in = m.weight[0].numel()
                std = fan_in**-0.5
                if scheme == "openclip" and name.endswith(("attn.out", "mlp.fc2")):
                    tower = a.tower(name.split(".")[0]) if not name.startswith("shared") else a.shared
                    std *= (2 * max(tower.depth, 1)) ** -0.5
                if scheme == "openclip" and isinstance(m, nn.Conv2d):
                    std = (3 * fan_in) ** -0.5
                m.weight.normal_(0.0, std)
        wi, wt = a.image.width, a.text.width
        if scheme == "fanin":
            model.text.token_embed.weight.normal_(0.0, wt**-0.5)
            model.text.pos_embed.normal_(0.0, wt**-0.5)
        else:
            model.text.token_embed.weight.normal_(0.0, 0.02)
            model.text.pos_embed.normal_(0.0, 0.01)
        model.image.class_token.normal_(0.0, wi**-0.5)
        model.image.pos_embed.normal_(0.0, wi**-0.5)


def run(arm: str, seed: int, steps: int, eval_at: Sequence[int]) -> dict[str, Any]:
    torch.set_num_threads(1)
    kind, opts = parse_arm(arm)
    arch0, train0, loop0 = demo_settings()
    ctx = int(opts.get("ctx", arch0.context_length))
    width = int(opts.get("width", arch0.image.width))
    depth = int(opts.get("depth", arch0.image.depth))
    mlp = int(opts.get("mlp", 2 * width))
    evaluator = Evaluator(ctx)
    torch.manual_seed(seed)
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    start = time.perf_counter()
    model: Any

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step in eval_at:
            curve.append({"step": step, **evaluator(model), "train_loss": statistics.fmean(losses[-50:]),
                          "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip

    if kind == "reference":
        model = RefCLIP(width, depth, mlp, ctx)
        train_reference(model, direct_batches(seed, ctx), steps, on_step)
        return {"arm": arm, "seed": seed, "curve": curve}

    from dataclasses import replace

    from growclip_stream.batch import Batch
    from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig
    from growclip_stream.train.trainer import OnlineTrainer

    tower = TowerConfig(width, depth, mlp, 16)
    arch = ArchConfig(tower, tower, replace(arch0.shared, width=width), context_length=ctx)
    model = GrowCLIP(arch)
    if opts.get("init", "model") == "legacy":
        legacy_init(model)
    elif opts.get("init", "model") != "model":
        scheme_init(model, opts["init"])
    keys = {"lr": "lr", "warmup": "warmup_steps", "wd": "weight_decay", "beta2": "beta2", "clip": "grad_clip"}
    train = replace(train0, seed=seed, **{keys[k]: type(getattr(train0, keys[k]))(float(v))
                                          for k, v in opts.items() if k in keys})  # fmt: skip
    trainer = OnlineTrainer(model, train)
    feed = opts.get("feed", "direct")
    if feed == "direct":
        batches = direct_batches(seed, ctx)
        for _ in range(steps):
            images, tokens = next(batches)
            stats = trainer.train_step(Batch(images, tokens, ("",) * len(images)))
            on_step(stats.step, stats.loss)
    elif feed == "stream":
        stream = stream_batches(seed, ctx, loop0.holdout_fraction)
        for _ in range(steps):
            stats = trainer.train_step(next(stream))
            on_step(stats.step, stats.loss)
    elif feed == "loop":
        run_loop(trainer, seed, steps, opts, loop0, on_step)
    else:
        raise ValueError(f"unknown feed {feed!r}")
    return {"arm": arm, "seed": seed, "curve": curve}


def run_loop(trainer: Any, seed: int, steps: int, opts: dict[str, str], loop0: Any, on_step: Any) -> None:
    from dataclasses import replace

    from growclip_stream.data.decode import DecodePipeline
    from growclip_stream.data.images import ImageTransform
    from growclip_stream.data.pipeline import Decoder
    from growclip_stream.data.records import RecordLimits
    from growclip_stream.growth.config import GrowthConfig
    from growclip_stream.growth.controller import GrowthController
    from growclip_stream.model.tokenizer import ByteTokenizer
    from growclip_stream.train.loop import LoopConfig, OnlineLoop

    class Observer:
        def on_records(self, counts: dict[str, int]) -> None:
            pass

        def on_step(self, stats: Any, data_wait_s: float) -> None:
            on_step(stats.step, stats.loss)

        def on_growth(self, event: Any) -> None:
            pass

        def on_eval(self, loss: float) -> None:
            pass

    cfg: LoopConfig = replace(loop0, poll_timeout_s=0.01)
    if "replay" in opts:
        cfg = replace(cfg, replay_fraction=float(opts["replay"]))
    arch = trainer.model.arch
    loop = OnlineLoop(
        source=MemorySource(seed), dead_letter=None,  # type: ignore[arg-type]
        pipeline=DecodePipeline(Decoder(ImageTransform(arch.image_size, arch.channels), RecordLimits()),
                                cfg.holdout_fraction, 1, "thread"),
        tokenizer=ByteTokenizer(arch.context_length), trainer=trainer,
        growth=GrowthController(GrowthConfig(enabled=False), trainer.cfg), cfg=cfg,
        publish=lambda *a, **k: None, observer=Observer(),
    )  # fmt: skip
    try:
        while trainer.step < steps:
            loop.run_once()
    finally:
        loop.pipeline.close()


# ----------------------------------------------------------------------------- driver


def summarise(runs: list[dict[str, Any]], arms: Sequence[str]) -> dict[str, Any]:
    """Medians per arm and checkpoint, and the median paired (same seed) difference to the first arm."""
    out: dict[str, Any] = {}
    base = {r["seed"]: {c["step"]: c for c in r["curve"]} for r in runs if r["arm"] == arms[0]}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        rows = {}
        for step in sorted({c["step"] for r in mine for c in r["curve"]}):
            pts = [(r["seed"], c) for r in mine for c in r["curve"] if c["step"] == step]
            row = {
                m: statistics.median(c[m] for _, c in pts) for m in ("top1", "top1_ensemble", "train_loss")
            }
            row["seeds"] = len(pts)
            paired = [c["top1"] - base[s][step]["top1"] for s, c in pts if s in base and step in base[s]]
            if arm != arms[0] and paired:
                row["paired_top1_minus_first_arm"] = statistics.median(paired)
            rows[str(step)] = row
        out[arm] = rows
    return out


def table(tag: str) -> str:
    """The committed experiment as a markdown table: medians over seeds, per arm and checkpoint."""
    exp = json.loads(RESULTS.read_text())["experiments"][tag]
    lines = ["| arm | step | top-1 (1 prompt) | top-1 (4 prompts) | paired top-1 vs first arm | seeds |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for arm, rows in exp["summary"].items():
        for step, row in rows.items():
            paired = row.get("paired_top1_minus_first_arm")
            lines.append(f"| `{arm}` | {step} | {row['top1']:.3f} | {row['top1_ensemble']:.3f} | "
                         f"{'' if paired is None else f'{paired:+.3f}'} | {row['seeds']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--table", metavar="TAG", help="print the committed experiment TAG as a table, run nothing"
    )
    ap.add_argument("--tag", help="experiment name: results merge under it")
    ap.add_argument("--arms", nargs="+", default=["reference", "growclip:init=legacy,ctx=32"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-at", nargs="+", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--note", default="")
    ap.add_argument("--append", action="store_true", help="add these runs to the tag's earlier ones")
    ap.add_argument("--quick", action="store_true", help="60 steps, one seed; results to /tmp only")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.tag:
        ap.error("--tag is required to run")
    if args.quick:
        args.steps, args.seeds = 60, args.seeds[:1]
    eval_at = sorted(set(args.eval_at or [s for s in (300, 600, 1000, 1500, 2000, 2440) if s < args.steps]) |
                     {args.steps})  # fmt: skip
    train_pixels()  # fill the cache once, before the workers read it
    tasks = [(arm, seed) for seed in args.seeds for arm in args.arms]  # interleaved: seed-major
    runs: list[dict[str, Any]] = []
    path = Path("/tmp/learning_reference_quick.json") if args.quick else RESULTS
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, arm, seed, args.steps, eval_at) for arm, seed in tasks]
        for f in futures:
            r = f.result()
            runs.append(r)
            print(json.dumps({"arm": r["arm"], "seed": r["seed"], "last": r["curve"][-1]}), flush=True)
            save(path, args, runs)  # after every run: an interrupted experiment keeps what finished
    print(json.dumps(summarise(runs, args.arms), indent=1))


def save(path: Path, args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"experiments": {}}
    if args.append and args.tag in data["experiments"]:  # more seeds for the same arms
        old = data["experiments"][args.tag]
        mine = {(r["arm"], r["seed"]) for r in runs}
        runs = [r for r in old["runs"] if (r["arm"], r["seed"]) not in mine] + runs
        args.seeds = sorted({r["seed"] for r in runs})
    data["machine"] = "2-core AMD EPYC VM, shared with other work (loaded); one torch thread per run"
    summary = summarise(runs, args.arms)
    data["experiments"][args.tag] = {"arms": args.arms, "seeds": args.seeds, "steps": args.steps,
                                     "note": args.note, "summary": summary, "runs": runs}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
