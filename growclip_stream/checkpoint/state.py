"""What one checkpoint holds, captured on the training thread as private CPU copies.

Capturing is the only part of a save the training thread waits for: every tensor is copied to
CPU memory here, so a background writer can serialise, hash and upload it while training goes on
and mutates the live model.

Nested state (the loop's reservoirs, RNG states) travels as plain dicts whose leaves are JSON
values or tensors; :func:`split_tensors` moves the tensors into a flat safetensors mapping and
leaves ``{"__tensor__": key}`` references in the JSON, :func:`join_tensors` puts them back. So no
state needs pickle, and loading never unpickles anything.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from growclip_stream.model import GrowCLIP

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_TENSOR_REF = "__tensor__"


@dataclass(frozen=True)
class TrainingState:
    """A consistent copy of everything a restart needs; owns its tensors (nothing aliases the live model)."""

    step: int
    samples: int
    generation: int
    architecture: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]  # ``<param>::exp_avg`` etc., see :func:`optimizer_tensors`
    growth: dict[str, Any]
    source: dict[str, Any]  # the source's positions, with the identity of what they were read from
    loop: dict[str, Any] = field(default_factory=dict)  # JSON leaves and tensors (reservoirs, loop RNG)
    rng: dict[str, Any] = field(default_factory=dict)  # JSON: process-wide generators
    run: dict[str, Any] = field(default_factory=dict)  # JSON: run id, parent checkpoint, reason
    captured_at: float = field(default_factory=time.time)


def capture(
    model: GrowCLIP,
    optimizer: torch.optim.Optimizer | None,
    *,
    step: int,
    samples: int,
    generation: int = 0,
    growth: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    loop: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> TrainingState:
    """Copy the training state to CPU; call it from the training thread between steps."""
    loop_state = dict(loop or {})
    return TrainingState(
        step=step,
        samples=samples,
        generation=generation,
        architecture=model.arch.to_dict(),
        model={k: _cpu_copy(v) for k, v in model.state_dict().items()},
        optimizer=optimizer_tensors(model, optimizer) if optimizer is not None else {},
        growth=_json_copy(growth or {}),
        source=_json_copy(source or {}),
        loop={k: _copy_tree(v) for k, v in loop_state.items()},
        rng=global_rng_state(),
        run=_json_copy(run or {}),
    )


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _copy_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _cpu_copy(value)
    if isinstance(value, Mapping):
        return {str(k): _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy_tree(v) for v in value]
    return value


def _json_copy(value: Any) -> Any:
    return _copy_tree(value)


def optimizer_tensors(model: GrowCLIP, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name (``<param>::exp_avg``), the way safetensors stores it."""
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        for key in (*_ADAM_KEYS, "step"):
            if key in state:
                out[f"{name}::{key}"] = _cpu_copy(torch.as_tensor(state[key]))
    return out


def restore_optimizer(
    model: GrowCLIP, optimizer: torch.optim.Optimizer, state: Mapping[str, Mapping[str, torch.Tensor]]
) -> int:
    """Put saved AdamW state back on the matching parameters; returns how many were restored."""
    restored = 0
    for name, param in model.named_parameters():
        saved = state.get(name)
        if not saved or any(saved[k].shape != param.shape for k in _ADAM_KEYS if k in saved):
            continue
        optimizer.state[param] = {k: v.to(param.device) for k, v in saved.items()}
        restored += 1
    return restored


# -- RNG --------------------------------------------------------------------------------------------


def global_rng_state() -> dict[str, Any]:
    """torch's CPU (and CUDA, when present) generator states, base64 of their bytes."""
    state: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_global_rng(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = [_unb64(s) for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


def python_rng_state(rng: random.Random) -> list[Any]:
    """A ``random.Random``'s state as JSON (``[version, [625 ints], gauss_next]``)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_python_rng(rng: random.Random, state: Sequence[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((int(version), tuple(int(x) for x in internal), gauss))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# -- strings as tensors -------------------------------------------------------------------------------


def pack_strings(strings: Sequence[str]) -> dict[str, torch.Tensor]:
    """UTF-8 bytes of every string concatenated, plus their end offsets: compact and pickle-free."""
    encoded = [s.encode("utf-8") for s in strings]
    ends = torch.tensor(_cumsum([len(b) for b in encoded]), dtype=torch.int64)
    joined = b"".join(encoded)
    data = (
        torch.frombuffer(bytearray(joined), dtype=torch.uint8)
        if joined
        else torch.zeros(0, dtype=torch.uint8)
    )
    return {"bytes": data, "ends": ends}


def unpack_strings(packed: Mapping[str, torch.Tensor]) -> list[str]:
    data = packed["bytes"].numpy().tobytes()
    out, start = [], 0
    for end in packed["ends"].tolist():
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out


def _cumsum(xs: Sequence[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


# -- nested state <-> flat safetensors ------------------------------------------------------------------


def split_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Nested dicts/lists with tensor leaves -> (JSON skeleton with references, flat tensor mapping)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.contiguous()
            return {_TENSOR_REF: path}
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{path}/{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        return value

    return walk(tree, prefix), tensors


def join_tensors(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, Mapping):
        if set(skeleton) == {_TENSOR_REF}:
            return tensors[skeleton[_TENSOR_REF]]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton
