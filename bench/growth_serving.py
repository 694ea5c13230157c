"""Serving during growth: does the embeddings API keep answering while the model grows?

Starts the real daemon (``growclip_daemon.cli start --config configs/demo.yaml``: embedded broker,
in-process Fashion-MNIST producer, trainer, HTTP API) with the data-volume and plateau triggers
effectively off, lets it train, then runs closed-loop ``POST /v1/embeddings`` clients for the whole
measurement while growths are forced through ``POST /admin/grow``. Two modes, each in its own
daemon run: the search pauses training (the default) and the search runs beside training
(``growth.train_during_search=true``).

For every request it records the start time, latency, HTTP status and the model version it names,
and checks: every answer is a 200; every vector has ``embed_dim`` components, is finite and unit
length; versions never go back within a client thread (old generation, then new, never mixed);
equal versions give equal vectors for the same input (the served snapshot is immutable).

A growth window runs from the admin call to the grown model's publication (the event's
``finished_at``); the baseline window is the steady state before the first growth.

    .venv/bin/python bench/growth_serving.py            # 2 growths per mode (~5 min), writes the results
    .venv/bin/python bench/growth_serving.py --quick    # 1 growth per mode, 20 supernet steps, ~1.5 min
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import itertools
import json
import math
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DAEMON = [sys.executable, "-m", "growclip_daemon.cli"]
CONFIG = ROOT / "configs" / "demo.yaml"
RESULTS = ROOT / "bench" / "results" / "growth_serving.json"
TOKEN_ENV = "GROWCLIP_ADMIN_TOKEN"
MODEL_PREFIX = "growclip@"
TEXTS = ["a photo of a sneaker", "a grey ankle boot on white"]
MODES = {
    "search_pauses_training": {"growth.train_during_search": "false"},
    "search_beside_training": {"growth.train_during_search": "true"},
}
COMMON_OVERRIDES = {
    "producer.rate": "4000",  # records/s: more than the trainer takes, so training never idles
    "growth.min_interval_samples": "1000000000000",  # data-volume trigger off: growth only when forced
    "growth.plateau_enabled": "false",
    "growth.policy": "search",
    "log_format": "json",
}


@dataclass
class Timing:
    threads: int = 2
    growths: int = 2
    min_samples: int = 1500
    warmup_s: float = 2.0  # client warm-up, excluded from every window
    baseline_s: float = 10.0
    settle_s: float = 6.0  # after each growth, before the next one (outside growth)
    growth_timeout_s: float = 150.0
    overrides: dict[str, str] = field(default_factory=dict)  # extra --set for every mode


@dataclass
class Req:
    thread: int
    t0: float  # wall clock (time.time(), comparable to the daemon's finished_at)
    t1: float
    status: int
    version: tuple[int, int] | None = None
    error: str | None = None


@dataclass
class ClientState:
    embed_dim: int
    image_b64: str
    stop: threading.Event = field(default_factory=threading.Event)
    records: list[list[Req]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # wrong dims, non-finite, not unit length
    # version -> the vectors first seen for it; later answers of the same version must match
    reference: dict[tuple[int, int], list[list[float]]] = field(default_factory=dict)
    same_version_checked: int = 0
    same_version_mismatch: int = 0
    max_same_version_diff: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


# -- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_b64(value: int) -> str:
    buf = io.BytesIO()
    img = Image.new("L", (28, 28), color=value)
    for x in range(6, 22):  # a little structure, so the image tower does real work on it
        img.putpixel((x, x), 255 - value)
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def parse_version(model: str) -> tuple[int, int]:
    gen, step = model.removeprefix(MODEL_PREFIX).split(".")[:2]  # growclip@<generation>.<step>.<run>
    return int(gen), int(step)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def med(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def ms_after(t: float | None, ref: float) -> float | None:
    return None if t is None else round((t - ref) * 1000, 2)


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import torch

    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.strip()
    return {
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu_model": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
    }


# -- the load ------------------------------------------------------------------------------------


def client_loop(base: str, idx: int, state: ClientState) -> None:
    out = state.records[idx]
    body = {"input": [*TEXTS, {"image": state.image_b64}]}
    with httpx.Client(base_url=base, timeout=30) as client:
        while not state.stop.is_set():
            t0 = time.time()
            try:
                resp = client.post("/v1/embeddings", json=body)
            except httpx.HTTPError as err:
                out.append(Req(idx, t0, time.time(), 0, error=f"{type(err).__name__}: {err}"))
                continue
            t1 = time.time()
            req = Req(idx, t0, t1, resp.status_code)
            if resp.status_code != 200:
                req.error = resp.text[:300]
                out.append(req)
                continue
            try:
                answer = resp.json()
                req.version = parse_version(answer["model"])
                vectors = [d["embedding"] for d in answer["data"]]
            except (ValueError, KeyError) as err:
                req.status, req.error = -1, f"unreadable answer: {err!r}"
                out.append(req)
                continue
            out.append(req)
            check_vectors(state, req, vectors, resp.headers.get("x-growclip-model-version"))


def check_vectors(state: ClientState, req: Req, vectors: list[list[float]], header: str | None) -> None:
    problems: list[str] = []
    if header is None or parse_version(MODEL_PREFIX + header) != req.version:
        problems.append(f"version header {header!r} differs from body {req.version}")
    if len(vectors) != 3:
        problems.append(f"{len(vectors)} vectors for 3 inputs")
    for v in vectors:
        if len(v) != state.embed_dim:
            problems.append(f"vector of length {len(v)} (embed_dim {state.embed_dim})")
        elif not all(math.isfinite(x) for x in v):
            problems.append("non-finite component")
        elif abs(math.sqrt(sum(x * x for x in v)) - 1.0) > 1e-3:
            problems.append("vector not unit length")
    with state.lock:
        if problems:
            state.problems.append(f"{req.version} at {req.t1:.3f}: {'; '.join(problems)}")
            return
        assert req.version is not None
        ref = state.reference.setdefault(req.version, vectors)
        if ref is not vectors:
            diff = max(
                abs(a - b) for ra, rb in zip(ref, vectors, strict=True) for a, b in zip(ra, rb, strict=True)
            )
            state.same_version_checked += 1
            state.max_same_version_diff = max(state.max_same_version_diff, diff)
            if diff > 1e-4:
                state.same_version_mismatch += 1


# -- one daemon run ------------------------------------------------------------------------------


class DaemonRun:
    def __init__(self, mode: str, workdir: Path, overrides: dict[str, str]) -> None:
        self.mode = mode
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.log_path = workdir / "daemon.log"
        self.overrides = {
            "serve.port": str(self.port),
            "pidfile": str(workdir / "daemon.pid"),
            "checkpoint.root": str(workdir / "checkpoints"),
            "kafka.topic": f"bench.growth.{mode}.{secrets.token_hex(4)}",
            **COMMON_OVERRIDES,
            **overrides,
        }
        args = ["start", "--config", str(CONFIG)]
        for key, value in self.overrides.items():
            args += ["--set", f"{key}={value}"]
        env = {**os.environ, TOKEN_ENV: self.token}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                DAEMON + args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.client = httpx.Client(base_url=self.base, timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_for(self, predicate: Any, timeout_s: float, what: str, every_s: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                value = predicate()
            except httpx.HTTPError:
                value = None
            if value:
                return value
            time.sleep(every_s)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{self.log_tail()}")

    def model(self) -> dict[str, Any]:
        resp = self.client.get("/v1/model")
        resp.raise_for_status()
        return resp.json()

    def grow(self) -> httpx.Response:
        return self.client.post("/admin/grow", headers={"Authorization": f"Bearer {self.token}"})

    def stop(self) -> tuple[int | None, float]:
        self.client.close()
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.monotonic() - start


def run_mode(mode: str, timing: Timing, workdir: Path) -> dict[str, Any]:
    print(f"[{mode}] starting the daemon", flush=True)
    daemon = DaemonRun(mode, workdir, {**timing.overrides, **MODES[mode]})
    result: dict[str, Any] = {"mode": mode, "overrides": daemon.overrides}
    clients: list[threading.Thread] = []
    state: ClientState | None = None
    try:
        t_start = time.monotonic()
        daemon.wait_for(lambda: daemon.client.get("/readyz").status_code == 200, 120, "readiness")
        result["ready_after_s"] = round(time.monotonic() - t_start, 1)

        def trained() -> dict[str, Any] | None:
            m = daemon.model()
            t = m.get("training", {})
            enough = t.get("samples_trained", 0) >= timing.min_samples and t.get("held_out_records", 0) >= 64
            return m if enough else None

        m0 = daemon.wait_for(trained, 180, f"{timing.min_samples} samples and 64 held-out records")
        result["trained_before_load_s"] = round(time.monotonic() - t_start, 1)
        embed_dim = int(m0["architecture"]["embed_dim"])
        eval_batch = 64  # loop.eval_batch_size (demo.yaml keeps the default)
        print(
            f"[{mode}] ready in {result['ready_after_s']} s; {m0['training']['samples_trained']} samples, "
            f"{m0['training']['held_out_records']} held out after {result['trained_before_load_s']} s",
            flush=True,
        )

        state = ClientState(embed_dim=embed_dim, image_b64=png_b64(200))
        state.records = [[] for _ in range(timing.threads)]
        clients = [
            threading.Thread(
                target=client_loop, args=(daemon.base, i, state), name=f"client-{i}", daemon=True
            )
            for i in range(timing.threads)
        ]
        t_load = time.time()
        for c in clients:
            c.start()
        time.sleep(timing.warmup_s)
        base_t0 = time.time()
        s0 = daemon.model()["training"]["samples_trained"]
        time.sleep(timing.baseline_s)
        base_t1 = time.time()
        s1 = daemon.model()["training"]["samples_trained"]
        baseline = {"t0": base_t0, "t1": base_t1, "train_samples_per_s": (s1 - s0) / (base_t1 - base_t0)}

        growths: list[dict[str, Any]] = []
        generation = int(m0["generation"])
        for i in range(timing.growths):
            before = daemon.model()
            s_before = before["training"]["samples_trained"]
            held_out = before["training"]["held_out_records"]
            t_call = time.time()
            resp = daemon.grow()
            t_ack = time.time()
            if resp.status_code != 200:
                raise RuntimeError(f"POST /admin/grow answered {resp.status_code}: {resp.text}")
            print(f"[{mode}] growth {i + 1}/{timing.growths} requested", flush=True)

            def grown(gen: int = generation) -> dict[str, Any] | None:
                m = daemon.model()
                return m if int(m["generation"]) > gen else None

            after = daemon.wait_for(
                grown, timing.growth_timeout_s, f"generation {generation + 1}", every_s=0.25
            )
            t_seen = time.time()
            event = after["growth_history"][-1]
            generation = int(after["generation"])
            growths.append(
                {
                    "t_call": t_call,
                    "t_ack": t_ack,
                    "t_end": float(event["finished_at"]),
                    "t_seen_by_poll": t_seen,
                    "new_generation": generation,
                    "held_out_records": held_out,
                    "held_out_batches": held_out // eval_batch,
                    "duration_s": event["duration_s"],
                    "phases": event.get("phases", {}),
                    "trigger": event["trigger"],
                    "policy": event.get("policy"),
                    "ops": event["ops"],
                    "params_before": event["params_before"],
                    "params_after": event["params_after"],
                    "train_samples_during": after["training"]["samples_trained"] - s_before,
                }
            )
            print(
                f"[{mode}] generation {generation}: {','.join(event['ops'])} in {event['duration_s']:.2f} s "
                f"({event['params_before']} -> {event['params_after']} params, "
                f"phases {json.dumps({k: round(v, 2) for k, v in event.get('phases', {}).items()})})",
                flush=True,
            )
            time.sleep(timing.settle_s)
        t_unload = time.time()
    finally:
        if state is not None:
            state.stop.set()
        for c in clients:
            c.join(timeout=60)
        code, stop_s = daemon.stop()
        result["exit_code"], result["stop_s"] = code, round(stop_s, 2)
        print(f"[{mode}] SIGTERM: exit code {code} after {stop_s:.1f} s", flush=True)
        if code != 0:
            result["log_tail"] = daemon.log_tail()

    assert state is not None
    result.update(analyse(state, baseline, growths, t_load + timing.warmup_s, t_unload, m0))
    return result


# -- analysis ------------------------------------------------------------------------------------


def longest_gap(successes_t1: list[float], t0: float, t1: float) -> tuple[float, float]:
    """The longest stretch of [t0, t1] in which no successful answer completed (edges included),
    and when it ended."""
    points = [t0, *(t for t in successes_t1 if t0 < t < t1), t1]
    return max((b - a, b) for a, b in itertools.pairwise(points))


def window_stats(reqs: list[Req], successes_t1: list[float], t0: float, t1: float) -> dict[str, Any]:
    """Requests started in [t0, t1): count, rate, statuses, latency percentiles, longest answer gap."""
    inside = [r for r in reqs if t0 <= r.t0 < t1]
    ok = [r for r in inside if r.status == 200]
    lat = [(r.t1 - r.t0) * 1000 for r in ok]
    gap, gap_end = longest_gap(successes_t1, t0, t1)
    statuses: dict[str, int] = {}
    for r in inside:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return {
        "seconds": round(t1 - t0, 3),
        "requests": len(inside),
        "ok": len(ok),
        "answers_per_s": rnd(len(ok) / (t1 - t0)) if t1 > t0 else None,
        "statuses": statuses,
        "success_ratio": rnd(len(ok) / len(inside), 4) if inside else None,
        "p50_ms": rnd(pct(lat, 0.50)),
        "p95_ms": rnd(pct(lat, 0.95)),
        "p99_ms": rnd(pct(lat, 0.99)),
        "max_ms": rnd(max(lat) if lat else None),
        "longest_gap_ms": rnd(gap * 1000),
        "longest_gap_ends_s_into_window": rnd(gap_end - t0, 3),
        "longest_gap_ends_at": round(gap_end, 3),
        "errors": [f"{r.status} {r.error}" for r in inside if r.status != 200][:5],
    }


def analyse(
    state: ClientState,
    baseline: dict[str, float],
    growths: list[dict[str, Any]],
    load_t0: float,
    load_t1: float,
    m0: dict[str, Any],
) -> dict[str, Any]:
    reqs = sorted((r for thread in state.records for r in thread), key=lambda r: r.t0)
    measured = [r for r in reqs if r.t0 >= load_t0]
    ok_t1 = sorted(r.t1 for r in reqs if r.status == 200)

    base = window_stats(measured, ok_t1, baseline["t0"], baseline["t1"])
    base["train_samples_per_s"] = rnd(baseline["train_samples_per_s"], 1)
    per_growth = []
    for g in growths:
        w = window_stats(measured, ok_t1, g["t_call"], g["t_end"])
        old, new = g["new_generation"] - 1, g["new_generation"]
        first_new = min((r.t1 for r in reqs if r.version and r.version[0] == new), default=None)
        last_old_start = max((r.t0 for r in reqs if r.version and r.version[0] == old), default=None)
        w.update(
            {
                "generation": f"{old} -> {new}",
                "ops": g["ops"],
                "params": [g["params_before"], g["params_after"]],
                "duration_s": rnd(g["duration_s"], 3),
                "phases_s": {k: rnd(v, 3) for k, v in g["phases"].items()},
                "admin_ack_ms": rnd((g["t_ack"] - g["t_call"]) * 1000),
                "call_to_published_s": rnd(g["t_end"] - g["t_call"], 3),
                "first_new_answer_after_publish_ms": ms_after(first_new, g["t_end"]),
                "last_old_request_start_after_publish_ms": ms_after(last_old_start, g["t_end"]),
                "train_samples_per_s": rnd(
                    g["train_samples_during"] / max(g["t_seen_by_poll"] - g["t_call"], 1e-9), 1
                ),
                "trigger": g["trigger"],
                "policy": g["policy"],
                "held_out_records": g["held_out_records"],
            }
        )
        per_growth.append(w)

    windows = [(g["t_call"], g["t_end"]) for g in growths]

    def in_growth(r: Req) -> bool:
        return any(a <= r.t0 < b or a < r.t1 <= b for a, b in windows)

    outside = [r for r in measured if r.t0 < load_t1 and not in_growth(r)]
    # stretches outside growth: the baseline, and from 1 s after each publication to the next call
    quiet = [(baseline["t0"], baseline["t1"])]
    quiet += [(b + 1.0, a2) for (_, b), (a2, _) in itertools.pairwise([*windows, (load_t1, load_t1)])]
    quiet_gaps = [longest_gap(ok_t1, a, b)[0] for a, b in quiet if b > a]
    out_lat = [(r.t1 - r.t0) * 1000 for r in outside if r.status == 200]
    during_all = [r for r in measured if any(a <= r.t0 < b for a, b in windows)]

    # versions: monotonic per client thread, only known generations, all answers the right shape
    regressions = []
    for i, thread in enumerate(state.records):
        last: tuple[int, int] | None = None
        for r in thread:
            if r.version is None:
                continue
            if last is not None and r.version < last:
                regressions.append(f"thread {i}: {last} then {r.version} at {r.t0:.3f}")
            last = r.version
    generations_seen = sorted({r.version[0] for r in reqs if r.version})
    expected_gens = list(range(int(m0["generation"]), int(m0["generation"]) + len(growths) + 1))
    ok_total = sum(r.status == 200 for r in measured)

    checks = {
        "all_200": ok_total == len(measured),
        "all_200_during_growth": all(r.status == 200 for r in during_all),
        "vectors_have_embed_dim_and_unit_norm": not state.problems,
        "versions_monotonic_per_thread": not regressions,
        "generations_seen": generations_seen,
        "generations_expected": expected_gens,
        "every_generation_served": generations_seen == expected_gens,
        "same_version_same_vectors": state.same_version_mismatch == 0,
        "same_version_comparisons": state.same_version_checked,
        "same_version_max_abs_diff": state.max_same_version_diff,
        "shape_problems": state.problems[:5],
        "version_regressions": regressions[:5],
    }
    checks["passed"] = all(
        checks[k]
        for k in (
            "all_200",
            "vectors_have_embed_dim_and_unit_norm",
            "versions_monotonic_per_thread",
            "every_generation_served",
            "same_version_same_vectors",
        )
    )

    def over_growths(key: str) -> float | None:
        return rnd(med([g[key] for g in per_growth]))

    summary = {
        "growths": len(per_growth),
        "growth_duration_s_median": rnd(med([g["duration_s"] for g in per_growth]), 3),
        "growth_duration_s": [g["duration_s"] for g in per_growth],
        "phases_s_median": {
            k: rnd(med([g["phases_s"].get(k) for g in per_growth]), 3)
            for k in sorted({k for g in per_growth for k in g["phases_s"]})
        },
        "requests_total": len(measured),
        "requests_ok": ok_total,
        "success_ratio": rnd(ok_total / len(measured), 4) if measured else None,
        "requests_during_growth": len(during_all),
        "ok_during_growth": sum(r.status == 200 for r in during_all),
        "success_ratio_during_growth": rnd(sum(r.status == 200 for r in during_all) / len(during_all), 4)
        if during_all
        else None,
        "answers_per_s_baseline": base["answers_per_s"],
        "answers_per_s_growth_median": over_growths("answers_per_s"),
        "latency_ms_baseline": {k: base[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
        "latency_ms_during_growth_median": {k: over_growths(k) for k in ("p50_ms", "p95_ms", "p99_ms")},
        "latency_ms_outside_growth": {
            "p50_ms": rnd(pct(out_lat, 0.5)),
            "p95_ms": rnd(pct(out_lat, 0.95)),
            "p99_ms": rnd(pct(out_lat, 0.99)),
            "requests": len(out_lat),
        },
        "longest_gap_ms_baseline": base["longest_gap_ms"],
        "longest_gap_ms_outside_growth": rnd(max(quiet_gaps) * 1000 if quiet_gaps else None),
        "longest_gap_ms_during_growth_max": rnd(max((g["longest_gap_ms"] for g in per_growth), default=None)),
        "first_new_answer_after_publish_ms_median": over_growths("first_new_answer_after_publish_ms"),
        "train_samples_per_s_baseline": base["train_samples_per_s"],
        "train_samples_per_s_during_growth_median": over_growths("train_samples_per_s"),
    }
    return {"embed_dim": int(m0["architecture"]["embed_dim"]), "summary": summary, "checks": checks,
            "baseline": base, "growths": per_growth}  # fmt: skip


# -- report --------------------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per figure, one column per mode."""

    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    def trio(d: dict[str, Any]) -> str:
        return " / ".join(cell(d[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))

    figures: list[tuple[str, Any]] = [
        ("forced growths", lambda s, c: s["growths"]),
        ("growth duration, s (median; each)", lambda s, c: f"{cell(s['growth_duration_s_median'])} "
         f"({', '.join(cell(d) for d in s['growth_duration_s'])})"),
        ("phases, s (median): supernet / selection / inherit", lambda s, c: " / ".join(
            cell(s["phases_s_median"].get(k)) for k in ("supernet_s", "selection_s", "inherit_s"))),
        ("requests answered 200 / sent, during growth", lambda s, c:
         f"{s['ok_during_growth']} / {s['requests_during_growth']}"),
        ("requests answered 200 / sent, whole run", lambda s, c:
         f"{s['requests_ok']} / {s['requests_total']}"),
        ("answers/s: baseline → during growth (median)", lambda s, c:
         f"{cell(s['answers_per_s_baseline'])} → {cell(s['answers_per_s_growth_median'])}"),
        ("latency p50 / p95 / p99 ms, baseline", lambda s, c: trio(s["latency_ms_baseline"])),
        ("latency p50 / p95 / p99 ms, outside growth", lambda s, c: trio(s["latency_ms_outside_growth"])),
        ("latency p50 / p95 / p99 ms, during growth (median)", lambda s, c:
         trio(s["latency_ms_during_growth_median"])),
        ("longest gap between answers, ms: outside / during growth", lambda s, c:
         f"{cell(s['longest_gap_ms_outside_growth'])} / {cell(s['longest_gap_ms_during_growth_max'])}"),
        ("first new-generation answer after publication, ms (median)", lambda s, c:
         cell(s["first_new_answer_after_publish_ms_median"])),
        ("training samples/s: baseline → during growth (median)", lambda s, c:
         f"{cell(s['train_samples_per_s_baseline'])} → "
         f"{cell(s['train_samples_per_s_during_growth_median'])}"),
        ("generations served; versions monotonic; vectors embed_dim", lambda s, c:
         f"{c['generations_seen']}; {'yes' if c['versions_monotonic_per_thread'] else 'NO'}; "
         f"{'yes' if c['vectors_have_embed_dim_and_unit_norm'] else 'NO'}"),
        ("same version, same vectors (comparisons, max diff)", lambda s, c:
         f"{'yes' if c['same_version_same_vectors'] else 'NO'} "
         f"({c['same_version_comparisons']}, {c['same_version_max_abs_diff']:g})"),
    ]  # fmt: skip
    rows = ["| | " + " | ".join(r["mode"] for r in results) + " |", "| --- |" + " --- |" * len(results)]
    for name, get in figures:
        rows.append(f"| {name} | " + " | ".join(str(get(r["summary"], r["checks"])) for r in results) + " |")
    rows.append("| SIGTERM exit code (s to stop) | " + " | ".join(
        f"{r['exit_code']} ({r['stop_s']})" for r in results) + " |")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 growth per mode, 20 supernet steps, short windows (~2 min)"
    )
    parser.add_argument("--out", type=Path, help=f"JSON output (default {RESULTS}; with --quick: none)")
    parser.add_argument("--growths", type=int, help="forced growths per mode (default 2; --quick 1)")
    parser.add_argument("--workdir", type=Path, help="keep each daemon's state and log here (default: temp)")
    parser.add_argument("--mode", choices=sorted(MODES), action="append", help="run only this mode")
    args = parser.parse_args()
    timing = Timing()
    if args.quick:  # a smoke run: shorter searches than the product's default, one growth per mode
        timing = Timing(growths=1, baseline_s=5.0, settle_s=3.0, overrides={"growth.supernet_steps": "20"})
    if args.growths is not None:
        timing.growths = args.growths
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    started = time.monotonic()
    results = []
    for mode in args.mode or list(MODES):
        if args.workdir is not None:
            (args.workdir / mode).mkdir(parents=True, exist_ok=True)
            results.append(run_mode(mode, timing, args.workdir / mode))
            continue
        with tempfile.TemporaryDirectory(prefix="growth-serving-") as tmp:
            results.append(run_mode(mode, timing, Path(tmp)))
    report = {
        "benchmark": "growth_serving",
        "machine": machine(),
        "config": {
            "base": str(CONFIG.relative_to(ROOT)),
            "overrides": {**COMMON_OVERRIDES, **timing.overrides},
            "modes": MODES,
            "timing": timing.__dict__,
            "request": {"input": [*TEXTS, {"image": "28x28 grayscale PNG"}], "encoding_format": "float"},
            "quick": args.quick,
        },
        "wall_s": round(time.monotonic() - started, 1),
        "results": results,
    }
    print(
        json.dumps({r["mode"]: {"summary": r["summary"], "checks": r["checks"]} for r in results}, indent=2)
    )
    print()
    print(table(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out}")
    passed = all(r["checks"]["passed"] and r["exit_code"] == 0 for r in results)
    print(f"\n{'PASS' if passed else 'FAIL'}: serving during growth ({report['wall_s']} s)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
