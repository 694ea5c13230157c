"""Every GPU measurement in one run, written to one JSON file.

    python bench/gpu.py --out bench/results/gpu_h200.json            # on the GPU machine (~6-8 min)
    python bench/gpu.py --device cpu --tiny --out /tmp/gpu_tiny.json  # the whole flow, tiny, on CPU

Sections (``--sections``, default all):

- ``throughput``: our training step (bf16 autocast, torch.compile, fused AdamW: configs/gpu.yaml's
  train settings) and eagerly, against OpenCLIP 3.3.0's on identical architectures (ViT-B/32 at
  batch 1024, ViT-B/16 at batch 256, a 22M-parameter 64-pixel model at batch 4096; OpenCLIP gets our
  259-token byte vocabulary so the shapes match), random data already on the device: samples/s,
  MFU (3 x forward FLOPs counted by torch's FlopCounterMode, over a bf16 matmul peak measured in
  the same run), peak memory.
- ``growth``: one full growth step (supernet training + selection + PIM) from configs/gpu.yaml's
  ViT-S/16-size model to the ViT-B/16-size union, its wall time per phase, and the latency of
  serving requests (a bf16 snapshot on its own stream) made all through it against before it.
- ``daemon``: ``growclip-daemon start`` end to end, reading synthetic JPEG records from a local
  embedded broker, against the same trainer fed synthetic in-memory batches: samples/s and the
  per-step data wait.

OpenCLIP is a benchmark-only dependency: if it does not import, ``pip install open-clip-torch==3.3.0``
is tried (from ``.whl/`` when that folder exists: a machine without a network gets the wheels
carried there); if it still cannot be used the JSON says why. A ``--tiny`` run never writes under
bench/results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from growclip_stream.batch import Batch  # noqa: E402
from growclip_stream.model.clip import ArchConfig, GrowCLIP, TowerConfig  # noqa: E402
from growclip_stream.train.config import TrainConfig  # noqa: E402
from growclip_stream.train.trainer import OnlineTrainer  # noqa: E402

REFERENCE_PEAK_TFLOPS = 791.0  # bf16 matmul peak measured on the H200 (8192^3)
OPENCLIP_VERSION = "3.3.0"


# ----------------------------------------------------------------------------- shapes


def tower(width: int, depth: int, head_dim: int = 64) -> TowerConfig:
    return TowerConfig(width=width, depth=depth, mlp_hidden=4 * width, head_dim=head_dim)


def vit_b(patch: int) -> ArchConfig:
    return ArchConfig(
        image=tower(768, 12), text=tower(512, 12), shared=tower(512, 0), embed_dim=512,
        image_size=224, patch_size=patch, channels=3, context_length=77,
    )  # fmt: skip


def small_64px() -> ArchConfig:
    """~22M parameters, 64-pixel images (8x8 patches of 8 px), both towers 384 wide x 6."""
    return ArchConfig(
        image=tower(384, 6), text=tower(384, 6), shared=tower(384, 0), embed_dim=384,
        image_size=64, patch_size=8, channels=3, context_length=77,
    )  # fmt: skip


def tiny(image_size: int = 32, width: int = 64) -> ArchConfig:
    return ArchConfig(
        image=tower(width, 2, 32), text=tower(width, 2, 32), shared=tower(width, 0, 32), embed_dim=32,
        image_size=image_size, patch_size=8, channels=3, context_length=16,
    )  # fmt: skip


def throughput_cases(args: argparse.Namespace) -> list[tuple[str, ArchConfig, int]]:
    if args.tiny:
        return [("tiny-32px", tiny(), 16), ("tiny-64px", tiny(64), 32)]
    return [("ViT-B/32", vit_b(32), 1024), ("ViT-B/16", vit_b(16), 256), ("S-64px-22M", small_64px(), 4096)]


# ----------------------------------------------------------------------------- helpers


def void(_: object) -> None:
    """Discards a step's statistics (timed loops take callables returning None)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def random_batch(arch: ArchConfig, n: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, arch.channels, arch.image_size, arch.image_size, generator=g)
    tokens = torch.randint(3, 259, (n, arch.context_length), generator=g)
    tokens[:, 0] = 257  # BOS
    tokens[:, -1] = 258  # EOS
    return Batch(images.to(device), tokens.to(device), tuple(str(i) for i in range(n)))


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Run `warmup` untimed steps (compilation happens there), then `steps` timed ones."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return {"warmup_s": warm_s, "seconds": time.perf_counter() - start, "steps": steps}


def forward_flops(model: torch.nn.Module, call: Callable[[], Any]) -> int:
    """Forward FLOPs of one call, counted by torch (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call()
    return int(counter.get_total_flops())


def measured_peak_tflops(device: torch.device) -> float | None:
    """bf16 dense matmul peak: the mean of 10 8192^3 products after 3 warm-ups."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def rate(samples: int, seconds: float, flops_per_sample: int, peak: float | None) -> dict[str, Any]:
    sps = samples / seconds
    out: dict[str, Any] = {"samples_per_s": round(sps, 1), "train_flops_per_sample": 3 * flops_per_sample}
    if peak:
        out["mfu"] = round(3 * flops_per_sample * sps / (peak * 1e12), 4)
        out["mfu_vs_791"] = round(3 * flops_per_sample * sps / (REFERENCE_PEAK_TFLOPS * 1e12), 4)
    return out


# ----------------------------------------------------------------------------- ours


def gpu_train_config(args: argparse.Namespace, batch: int, compile_: bool) -> TrainConfig:
    return TrainConfig(
        batch_size=batch, device=args.device, precision=args.precision, compile=compile_,
        compile_backend=args.compile_backend, fused_adam="auto", warmup_steps=0,
    )  # fmt: skip


def bench_ours(
    args: argparse.Namespace, arch: ArchConfig, batch: int, compile_: bool, peak: float | None
) -> dict[str, Any]:
    device = torch.device(args.device)
    reset_peak(device)
    torch.manual_seed(0)
    trainer = OnlineTrainer(GrowCLIP(arch), gpu_train_config(args, batch, compile_))
    data = random_batch(arch, batch, device)
    flops = forward_flops(trainer.model, lambda: trainer.model(data.images[:1], data.tokens[:1]))
    timing = timed_steps(lambda: void(trainer.train_step(data)), device, args.warmup, args.steps)
    out = {
        **rate(batch * timing["steps"], timing["seconds"], flops, peak),
        "params": arch.num_params(),
        "peak_memory_gib": peak_gib(device),
        "compile_warmup_s": round(timing["warmup_s"], 1),
        "graphs_compiled": trainer.compile_counter.graphs,
    }
    return out


# ----------------------------------------------------------------------------- OpenCLIP


class _TorchvisionStandIn:
    """Stands in for a torchvision that cannot load (PyPI's CUDA build beside a CPU torch): OpenCLIP
    imports it at import time, for transforms and ResNet parts a ViT CLIP does not use."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        import importlib.machinery

        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> Any:
        import types

        class Placeholder(type):
            def __getattr__(cls, name: str) -> str:
                if name.startswith("__"):
                    raise AttributeError(name)
                return f"{cls.__name__}.{name}"

        class Module(types.ModuleType):
            def __getattr__(self, name: str) -> Any:
                if name.startswith("__"):
                    raise AttributeError(name)
                return Placeholder(name, (), {})

        module = Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: Any) -> None:
        pass


def import_open_clip(notes: list[str]) -> Any:
    """open_clip, installed if missing (a benchmark-only dependency); raises with the reason.

    It is installed without its dependencies, always: resolving them could replace this
    environment's torch (open-clip-torch depends on torchvision, which pins a torch of its own).
    Where torchvision cannot be imported (PyPI's CUDA build beside a CPU torch), OpenCLIP is
    loaded with a stand-in for it.
    """
    try:
        return importlib.import_module("open_clip")
    except ModuleNotFoundError as err:
        if err.name != "open_clip":
            return _open_clip_without_torchvision(notes, err)
    except Exception as err:  # torchvision's CUDA build beside a CPU torch fails here
        return _open_clip_without_torchvision(notes, err)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
    wheels = ROOT / ".whl"
    if wheels.is_dir():  # a machine without a network: wheels carried beside the tree
        cmd += ["--no-index", "--find-links", str(wheels)]
    cmd += [f"open-clip-torch=={OPENCLIP_VERSION}", "ftfy", "wcwidth"]
    notes.append("installed: " + " ".join(cmd[3:]))
    subprocess.run(cmd, check=True, timeout=600)
    importlib.invalidate_caches()
    try:
        return importlib.import_module("open_clip")
    except Exception as err:
        return _open_clip_without_torchvision(notes, err)


def _open_clip_without_torchvision(notes: list[str], err: BaseException) -> Any:
    notes.append(f"open_clip import failed ({type(err).__name__}: {err}); loaded with a torchvision stand-in")
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "open_clip", "timm")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _TorchvisionStandIn())  # type: ignore[arg-type]
    return importlib.import_module("open_clip")


def openclip_model(open_clip: Any, arch: ArchConfig) -> torch.nn.Module:
    """OpenCLIP's CLIP with our architecture (and our 259-id vocabulary)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    i, t = arch.image, arch.text
    return CLIP(
        embed_dim=arch.embed_dim,
        output_dict=True,
        vision_cfg=CLIPVisionCfg(
            layers=i.depth, width=i.width, head_width=i.head_dim, mlp_ratio=i.mlp_hidden / i.width,
            patch_size=arch.patch_size, image_size=arch.image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=arch.context_length, vocab_size=arch.vocab_size, width=t.width,
            heads=t.heads, layers=t.depth, mlp_ratio=t.mlp_hidden / t.width,
        ),
    )  # fmt: skip


def bench_openclip(
    args: argparse.Namespace, open_clip: Any, arch: ArchConfig, batch: int, peak: float | None
) -> dict[str, Any]:
    from open_clip.loss import ClipLoss as OpenClipLoss

    device = torch.device(args.device)
    reset_peak(device)
    torch.manual_seed(0)
    model = openclip_model(open_clip, arch).to(device).train()
    fused = True if device.type == "cuda" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    loss_fn = OpenClipLoss()
    data = random_batch(arch, batch, device)
    flops = forward_flops(model, lambda: model(data.images[:1], data.tokens[:1]))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )

    def step() -> None:  # the same work per step as our trainer: clip, step, read the loss
        with autocast:
            out = model(data.images, data.tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        float(loss.detach())

    timing = timed_steps(step, device, args.warmup, args.steps)
    out = {
        **rate(batch * timing["steps"], timing["seconds"], flops, peak),
        "params": sum(p.numel() for p in model.parameters()),
        "peak_memory_gib": peak_gib(device),
    }
    return out


def section_throughput(args: argparse.Namespace, result: dict[str, Any]) -> None:
    peak = result["machine"].get("bf16_peak_tflops")
    rows: list[dict[str, Any]] = []
    result["throughput"] = rows
    for name, arch, batch in throughput_cases(args):
        row: dict[str, Any] = {"model": name, "batch": batch, "params": arch.num_params()}
        rows.append(row)
        for label, compile_ in (("ours_compiled", True), ("ours_eager", False)):
            row[label] = guarded(lambda a=arch, b=batch, c=compile_: bench_ours(args, a, b, c, peak))  # type: ignore[misc]
            write(args, result)
    notes: list[str] = []
    try:
        open_clip = import_open_clip(notes)
    except Exception as err:
        result["openclip"] = {"skipped": f"{type(err).__name__}: {err}", "notes": notes}
        return
    result["openclip"] = {"version": getattr(open_clip, "__version__", "?"), "notes": notes}
    for row, (_, arch, batch) in zip(rows, throughput_cases(args), strict=True):
        row["openclip_eager"] = guarded(lambda a=arch, b=batch: bench_openclip(args, open_clip, a, b, peak))  # type: ignore[misc]
        ours, theirs = row.get("ours_compiled", {}), row["openclip_eager"]
        if "samples_per_s" in ours and "samples_per_s" in theirs:
            row["ours_compiled_over_openclip"] = round(ours["samples_per_s"] / theirs["samples_per_s"], 3)
        write(args, result)


# ----------------------------------------------------------------------------- growth


def gpu_config(args: argparse.Namespace) -> Any:
    from growclip_daemon.config import load_config

    overrides = [f"train.device={args.device}", f"train.precision={args.precision}"]
    overrides.append(f"train.compile_backend={args.compile_backend}")
    if args.tiny:
        overrides += [
            "model.image={width: 32, depth: 2, mlp_hidden: 64, head_dim: 16}",
            "model.text={width: 32, depth: 2, mlp_hidden: 64, head_dim: 16}",
            "model.shared={width: 32, depth: 0, mlp_hidden: 64, head_dim: 16}",
            "model.embed_dim=32", "model.image_size=32", "model.patch_size=8", "model.context_length=16",
            "growth.space=[widen:image*2, widen_mlp:image+64, widen:text*2, widen_mlp:text+64]",
            "train.batch_size=16", "loop.eval_batch_size=16", "growth.supernet_steps=2",
            "growth.selection_samples=32", "data.decode_workers=1",
        ]  # fmt: skip
    else:
        overrides += ["growth.supernet_steps=20", "growth.selection_samples=1024", "train.batch_size=256"]
    return load_config(ROOT / "configs" / "gpu.yaml", overrides)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class ServingLoad:
    """A thread embedding a small batch of texts and images from one snapshot, back to back."""

    def __init__(self, snap: Any, arch: ArchConfig) -> None:
        self.snap, self.arch = snap, arch
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-load", daemon=True)
        self.error: str | None = None

    def _run(self) -> None:
        a = self.arch
        pixels = torch.randn(8, a.channels, a.image_size, a.image_size)
        texts = ["a photo of a dog on a red sofa", "a grey ankle boot"] * 4
        try:
            while not self._stop.is_set():
                start = time.perf_counter()
                self.snap.embed_texts(texts)
                self.snap.embed_pixels(pixels)
                self.latencies.append(time.perf_counter() - start)
        except Exception as err:
            self.error = repr(err)

    def __enter__(self) -> ServingLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "requests": len(ms), "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99),
            "max_ms": max(ms) if ms else None, "error": self.error,
        }  # fmt: skip


def section_growth(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from growclip_stream.growth.controller import GrowthController
    from growclip_stream.serving import ModelSnapshot

    cfg = gpu_config(args)
    device = torch.device(args.device)
    reset_peak(device)
    torch.manual_seed(0)
    trainer = OnlineTrainer(GrowCLIP(cfg.model), cfg.train)
    arch, batch = cfg.model, cfg.train.batch_size
    holdout = [random_batch(arch, cfg.loop.eval_batch_size, device, seed=100 + i) for i in range(4)]

    def train_batches() -> Iterator[Batch]:
        i = 0
        while True:
            yield random_batch(arch, batch, device, seed=i)
            i += 1

    for b in [random_batch(arch, batch, device, seed=i) for i in range(args.warmup)]:
        trainer.train_step(b)  # compiled, warm
    dtype = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else None
    snap = ModelSnapshot.capture(trainer.model, generation=0, step=trainer.step, samples_trained=0,
                                 growth_history=[], dtype=dtype)  # fmt: skip
    out: dict[str, Any] = {"from_params": arch.num_params(), "batch": batch}
    with ServingLoad(snap, arch) as idle:
        time.sleep(2.0 if not args.tiny else 0.5)
    out["serving_before"] = idle.summary()
    controller = GrowthController(cfg.growth, cfg.train)
    start = time.perf_counter()
    with ServingLoad(snap, arch) as load:
        with trainer.autocast():
            # "forced": an operator's request, which the search budget does not bound
            plan = controller.search(trainer.model, trigger="forced", train_batches=train_batches(),
                                     holdout_batches=holdout, optimizer=trainer.optimizer)  # fmt: skip
        if plan is None or plan.supernet is None:
            out["error"] = f"no search: {controller.last_refusal}"
            result["growth"] = out
            return
        out["selection"] = plan.choice.reason
        if plan.candidate is None:  # declined (random data: no real gain); grow into the union anyway
            largest = max(plan.supernet.candidates, key=lambda c: (c.flops, c.params))
            choice = dataclasses.replace(plan.choice, ops=largest.ops, reason="bench: the largest candidate")
            plan = dataclasses.replace(plan, choice=choice, candidate=largest, declined=False)
        grown = controller.inherit(plan, trainer.model)
        sync(device)
        out["search_and_pim_s"] = round(time.perf_counter() - start, 2)
        trainer.swap_model(grown)
        first = time.perf_counter()
        trainer.train_step(random_batch(grown.arch, batch, device))
        sync(device)
        out["first_step_after_growth_s"] = round(time.perf_counter() - first, 2)  # the recompilation
    out["wall_s"] = round(time.perf_counter() - start, 2)
    out["serving_during"] = load.summary()
    out["phases_s"] = {k: round(v, 2) for k, v in plan.phases.items()}
    out["supernet"] = plan.supernet_stats
    out["supernet_params"] = plan.supernet.arch.num_params() if plan.supernet else None
    out["chosen_ops"] = [str(o) for o in plan.choice.ops]
    out["to_params"] = grown.arch.num_params()
    out["graphs_compiled"] = trainer.compile_counter.graphs
    out["peak_memory_gib"] = peak_gib(device)
    result["growth"] = out


# ----------------------------------------------------------------------------- daemon end to end


def synthetic_records(n: int, size: int, seed: int = 0) -> Iterator[Any]:
    """JPEG records of smooth random images (~10-20 KB at 224 px) with template captions."""
    import cv2
    import numpy as np

    from growclip_stream.data.records import Record

    rng = np.random.default_rng(seed)
    colors = ["red", "green", "blue", "grey", "yellow", "black", "white", "orange"]
    things = ["dog", "cat", "car", "boot", "dress", "tree", "house", "bird", "chair", "lamp"]
    base = [cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size)) for _ in range(64)]
    for i in range(n):
        img = np.clip(base[i % 64].astype(np.int16) + rng.integers(-12, 12, (size, size, 3)), 0, 255)
        ok, enc = cv2.imencode(".jpg", img.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 85])
        assert ok
        caption = f"a photo of a {colors[i % 8]} {things[(i // 8) % 10]} number {i % 997}"
        yield Record(id=f"r{i}", caption=caption, image=enc.tobytes())


_METRIC = re.compile(
    r"^(growclip_train_samples_total|growclip_train_data_wait_duration_seconds_(?:sum|count)|"
    r"growclip_train_step_duration_seconds_(?:sum|count)) (\S+)$"
)


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url, timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m[1]] = float(m[2])
    return out


def section_daemon(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from growclip_daemon.broker import EmbeddedBroker
    from growclip_stream.data.produce import ensure_topics, produce

    cfg = gpu_config(args)
    device = torch.device(args.device)
    out: dict[str, Any] = {}
    result["daemon"] = out
    # the same trainer on synthetic in-memory batches already on the device
    torch.manual_seed(0)
    trainer = OnlineTrainer(GrowCLIP(cfg.model), cfg.train)
    data = random_batch(cfg.model, cfg.train.batch_size, device)
    timing = timed_steps(lambda: void(trainer.train_step(data)), device, args.warmup, args.steps)
    out["in_memory_samples_per_s"] = round(cfg.train.batch_size * timing["steps"] / timing["seconds"], 1)
    reset_peak(device)

    n = args.daemon_records
    tmp = Path(tempfile.mkdtemp(prefix="growclip-gpu-bench-"))
    broker = EmbeddedBroker(log_path=tmp / "broker.log")
    broker.start()
    try:
        topic = "bench.pairs"
        ensure_topics(broker.bootstrap, [topic, f"{topic}.dlq"])
        start = time.perf_counter()
        sent = produce(broker.bootstrap, topic, synthetic_records(n, cfg.model.image_size), fmt="binary")
        out["records"] = sent
        out["produce_s"] = round(time.perf_counter() - start, 1)
        port = _free_port()
        overrides = [
            f"kafka.bootstrap={broker.bootstrap}", f"kafka.topic={topic}", "growth.enabled=false",
            f"serve.port={port}", f"checkpoint.root={tmp / 'ckpt'}", f"pidfile={tmp / 'pid'}",
            f"train.device={args.device}", f"train.precision={args.precision}",
            f"train.compile_backend={args.compile_backend}", "loop.eval_every_steps=1000000",
        ]  # fmt: skip
        cmd = [
            sys.executable,
            "-m",
            "growclip_daemon.cli",
            "start",
            "--config",
            str(ROOT / "configs" / "gpu.yaml"),
        ]
        for item in overrides + (_tiny_sets() if args.tiny else []):
            cmd += ["--set", item]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(tmp / "daemon.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        try:
            out.update(_watch_daemon(proc, f"http://127.0.0.1:{port}/metrics", n, cfg.train.batch_size, args))
        finally:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        if "samples_per_s" in out:
            out["daemon_over_in_memory"] = round(out["samples_per_s"] / out["in_memory_samples_per_s"], 3)
        out["log_tail"] = (tmp / "daemon.log").read_text(errors="replace")[-1500:]
    finally:
        broker.stop()


def _tiny_sets() -> list[str]:
    return [
        "model.image={width: 32, depth: 2, mlp_hidden: 64, head_dim: 16}",
        "model.text={width: 32, depth: 2, mlp_hidden: 64, head_dim: 16}",
        "model.shared={width: 32, depth: 0, mlp_hidden: 64, head_dim: 16}",
        "model.embed_dim=32", "model.image_size=32", "model.patch_size=8", "model.context_length=16",
        "train.batch_size=16", "data.decode_workers=1",
        "loop.replay_capacity=256", "loop.recent_capacity=256",
    ]  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _watch_daemon(
    proc: subprocess.Popen[bytes], url: str, n: int, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Poll /metrics until the records are trained (or the time runs out); the rate is taken
    between two batches in (past start-up and compilation) and 90% of the records."""
    deadline = time.monotonic() + args.daemon_timeout
    points: list[tuple[float, dict[str, float]]] = []
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):
            m = scrape(url)
            if m:
                points.append((time.monotonic(), m))
                if m.get("growclip_train_samples_total", 0) >= 0.9 * n * (1 - 0.02):
                    break
        time.sleep(0.5)
    if proc.poll() is not None:
        return {"error": f"daemon exited with {proc.returncode}"}
    started = [(t, m) for t, m in points if m.get("growclip_train_samples_total", 0) >= 2 * batch]
    if len(started) < 2:
        return {"error": "the daemon trained too little to measure", "points": len(points)}
    (t0, m0), (t1, m1) = started[0], started[-1]

    def delta(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    steps = max(delta("growclip_train_step_duration_seconds_count"), 1)
    wait_ms = 1000 * delta("growclip_train_data_wait_duration_seconds_sum") / steps
    return {
        "samples_per_s": round(delta("growclip_train_samples_total") / (t1 - t0), 1),
        "window_s": round(t1 - t0, 1),
        "steps": steps,
        "mean_data_wait_ms": round(wait_ms, 2),
        "mean_step_ms": round(1000 * delta("growclip_train_step_duration_seconds_sum") / steps, 2),
        "samples_trained": m1.get("growclip_train_samples_total"),
    }


# ----------------------------------------------------------------------------- main


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A measurement's result, or the error that stopped it (the rest of the run goes on)."""
    try:
        return fn()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}


def write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Written after every measurement, so a run cut short still leaves what it measured."""
    result["elapsed_s"] = round(time.perf_counter() - args.t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "device": str(device), "processor": platform.processor() or platform.machine(),
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda
        )
        info["bf16_peak_tflops"] = round(measured_peak_tflops(device) or 0, 1)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the whole flow in a minute or two")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sections", default="throughput,growth,daemon")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--compile-backend", default=None, help="default: inductor (aot_eager with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5; 1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 with --tiny)")
    p.add_argument("--daemon-records", type=int, default=None, help="default 60000 (600 with --tiny)")
    p.add_argument(
        "--daemon-timeout", type=float, default=None, help="seconds (default 150; 240 with --tiny)"
    )
    args = p.parse_args(argv)
    if args.tiny:
        defaults = {
            "compile_backend": "aot_eager",
            "warmup": 1,
            "steps": 2,
            "daemon_records": 600,
            "daemon_timeout": 240,
        }
    else:
        defaults = {
            "compile_backend": "inductor",
            "warmup": 5,
            "steps": 20,
            "daemon_records": 60000,
            "daemon_timeout": 150,
        }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    results = (ROOT / "bench" / "results").resolve()
    if args.tiny and (args.out.resolve() == results or results in args.out.resolve().parents):
        p.error("a --tiny run never writes under bench/results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.t0 = time.perf_counter()
    from growclip_stream.train.step import DeviceUnavailable, check_device

    try:
        device = check_device(args.device)
    except DeviceUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 loss matmul; bf16 work is unaffected
    result: dict[str, Any] = {
        "bench": "gpu", "tiny": args.tiny, "precision": args.precision,
        "compile_backend": args.compile_backend, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "machine": machine(device),
    }  # fmt: skip
    sections = {"throughput": section_throughput, "growth": section_growth, "daemon": section_daemon}
    for name in args.sections.split(","):
        t = time.perf_counter()
        try:
            sections[name](args, result)
        except Exception as err:
            result[name] = {**result.get(name, {}), "error": f"{type(err).__name__}: {err}",
                            "trace": traceback.format_exc()[-2000:]}  # fmt: skip
        result.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        write(args, result)
        reset_peak(device)
    print(json.dumps({k: result[k] for k in ("machine", "section_s", "elapsed_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
