"""`growclip-daemon status` for people: GET /v1/model as a short summary (``--json`` prints it raw).

Written against the answer's documented fields and tolerant of missing ones (an older daemon, a
component still starting): a field that is absent is left out, never a crash.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _params(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 100_000 else f"{value / 1e3:.1f}k"


def _section(name: str, text: str) -> str:
    return f"{name:<11}{text}"


def render_status(s: Mapping[str, Any]) -> str:
    """The summary lines of a /v1/model answer."""
    lines: list[str] = []
    params = s.get("parameters") or {}
    towers = ", ".join(f"{k} {_params(params[k])}" for k in ("image", "text", "shared") if k in params)
    head = f"{s.get('model', '?')}  generation {_num(s.get('generation'))}, step {_num(s.get('step'))}"
    if params:
        head += f", {_params(params.get('total'))} parameters ({towers})"
    if "flops_per_sample" in s:
        head += f", {_num(s['flops_per_sample'] / 1e6)} MFLOPs/sample"
    lines.append(head)

    t = s.get("training") or {}
    if t:
        text = f"{t.get('state', '?')}, {_num(t.get('samples_trained'))} samples"
        if t.get("samples_per_second") is not None:
            text += f", {_num(t['samples_per_second'])} samples/s"
        if t.get("loss_ema") is not None:
            text += f", loss {_num(t['loss_ema'])} (first {_num(t.get('loss_first'))})"
        if t.get("holdout_loss") is not None:
            text += f", held-out loss {_num(t['holdout_loss'])}"
        if t.get("growth_search_running"):
            text += ", growth search running"
        elif t.get("growth_waiting_for_budget"):
            text += ", growth due (waiting for its search budget)"
        lines.append(_section("training", text))
        if t.get("last_checkpoint"):
            lines.append(_section("checkpoint", str(t["last_checkpoint"])))

    src = s.get("source") or {}
    if src:
        lag = src.get("lag") or {}
        total = sum(v for v in lag.values() if isinstance(v, int | float))
        per = ", ".join(f"{p}: {_num(v)}" for p, v in sorted(lag.items()))
        text = f"{src.get('kind', '?')} {src.get('topic', '')}, lag {_num(total)}"
        lines.append(_section("source", text + (f" ({per})" if len(lag) > 1 else "")))

    history = s.get("growth_history") or []
    lines.append(_section("growth", f"{len(history)} growth(s)" if history else "none yet"))
    for event in history:
        ops = ",".join(event.get("ops") or []) or "?"
        text = (
            f"  -> gen {event.get('generation', '?')} at step {_num(event.get('step'))}: {ops} "
            f"({event.get('trigger', '?')}), params {_params(event.get('params_before'))} -> "
            f"{_params(event.get('params_after'))}, {_num(event.get('duration_s'))} s"
        )
        drift = event.get("drift")
        if isinstance(drift, dict):
            text += ", moved: " + _drift_pair(drift)
        lines.append(" " * 11 + text)

    serving = s.get("serving") or {}
    if serving:
        held = ", ".join(serving.get("versions_held") or []) or "-"
        batching = "on" if serving.get("batching") else "off"
        text = f"versions held {held} (keep {serving.get('keep_versions', '?')}); batching {batching}"
        if serving.get("batching"):
            text += f" (up to {serving.get('max_batch_items', '?')} items)"
        queued = serving.get("queued_items") or {}
        if queued:
            text += ", queued " + ", ".join(f"{k} {v}" for k, v in queued.items())
        lines.append(_section("serving", text))

    drift = s.get("drift") or {}
    latest = drift.get("latest") if isinstance(drift, dict) else None
    if isinstance(latest, dict):
        for against in ("previous", "oldest"):
            found = latest.get(f"against_{against}")
            if isinstance(found, dict):
                lines.append(
                    _section(
                        "drift" if against == "previous" else "",
                        f"{latest.get('version')} vs {against} {found.get('version')}: {_drift_pair(found)}",
                    )
                )

    ev = (s.get("evaluation") or {}) if isinstance(s.get("evaluation"), dict) else {}
    suites = ev.get("suites") or {}
    if suites:
        for name, result in sorted(suites.items()):
            scores = ", ".join(
                f"{k} {_num(v)}"
                for k, v in result.items()
                if isinstance(v, float) and k not in ("evaluated_at",)
            )
            lines.append(_section("evaluation" if name == min(suites) else "", f"{name}: {scores}"))
    elif ev:
        lines.append(_section("evaluation", str(ev.get("state", "-"))))
    return "\n".join(line.rstrip() for line in lines)


def _drift_pair(found: Mapping[str, Any]) -> str:
    parts = []
    for modality in ("image", "text"):
        m = found.get(modality)
        if isinstance(m, dict):
            cosine, overlap = _num(m.get("mean_cosine")), _num(m.get("neighbour_overlap_at_10"))
            parts.append(f"{modality} cos {cosine} overlap@10 {overlap}")
    return "; ".join(parts) or "-"
