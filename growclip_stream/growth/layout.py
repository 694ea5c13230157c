"""Which axis of each GrowCLIP parameter is residual width, heads or MLP units: the one description.

Widening (`growth.operators`), growing optimizer statistics with the weights (same module) and the
supernet's extraction of a candidate (`growth.supernet`) all read this table, so they cannot
disagree about a parameter's layout.

Every axis that growth touches has a role:

- ``out``: the axis *writes* tower T's residual stream (or its heads, which follow the width):
  embeddings, positions, the class token, LayerNorm gains and biases, the rows of qkv, of the
  attention out-projection, of fc2 and of to_shared. Widening T by r lays the axis out as r copies
  [x, x, ..., x] (per part: qkv stacks three width-sized parts, q, k and v). After widening, each copy
  receives about 1/r of the gradient the original row received, because the readers of the copies
  split their weights across them.
- ``in``: the axis *reads* tower T's residual stream or heads: the columns of qkv, fc1, the
  out-projection, to_shared and proj. Widening splits each weight into r shares that sum to it;
  every share sees the original input, so it receives the original weight's gradient.
- ``hidden``: the MLP hidden units of tower T (rows of fc1, columns of fc2, fc1's bias).
  ``widen_mlp`` appends units there.

Axes of other towers, and parameters no growth touches (``logit_scale``), are absent.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from growclip_stream.model.clip import TowerName

__all__ = ["Axis", "Role", "axes", "block_index"]

Role = Literal["out", "in", "hidden"]


@dataclass(frozen=True)
class Axis:
    dim: int
    role: Role
    tower: TowerName
    parts: int = 1  # width-sized blocks stacked along `dim` (3 for qkv's rows), each widened alone


_BLOCK_RE = re.compile(r"^(?P<tower>image|text|shared)\.blocks\.(?P<index>\d+)\.(?P<rest>.+)$")


def _block_axes(t: TowerName) -> dict[str, tuple[Axis, ...]]:
    out = Axis(0, "out", t)
    return {
        "ln_1.weight": (out,),
        "ln_1.bias": (out,),
        "ln_2.weight": (out,),
        "ln_2.bias": (out,),
        "attn.qkv.weight": (Axis(0, "out", t, 3), Axis(1, "in", t)),  # (3·w, w): [q | k | v] rows
        "attn.qkv.bias": (Axis(0, "out", t, 3),),
        "attn.out.weight": (out, Axis(1, "in", t)),  # (w, w): residual rows, head columns
        "attn.out.bias": (out,),
        "mlp.fc1.weight": (Axis(0, "hidden", t), Axis(1, "in", t)),  # (h, w)
        "mlp.fc1.bias": (Axis(0, "hidden", t),),
        "mlp.fc2.weight": (out, Axis(1, "hidden", t)),  # (w, h)
        "mlp.fc2.bias": (out,),
    }


_TOP_AXES: dict[str, tuple[Axis, ...]] = {
    "image.patch_embed.weight": (Axis(0, "out", "image"),),  # (w, C, p, p)
    "image.class_token": (Axis(0, "out", "image"),),  # (w,)
    "image.pos_embed": (Axis(1, "out", "image"),),  # (T, w)
    "image.to_shared.weight": (Axis(0, "out", "shared"), Axis(1, "in", "image")),  # (s, w_img)
    "image.to_shared.bias": (Axis(0, "out", "shared"),),
    "text.token_embed.weight": (Axis(1, "out", "text"),),  # (V, w)
    "text.pos_embed": (Axis(1, "out", "text"),),  # (L, w)
    "text.to_shared.weight": (Axis(0, "out", "shared"), Axis(1, "in", "text")),  # (s, w_txt)
    "text.to_shared.bias": (Axis(0, "out", "shared"),),
    "ln_post.weight": (Axis(0, "out", "shared"),),
    "ln_post.bias": (Axis(0, "out", "shared"),),
    "proj.weight": (Axis(1, "in", "shared"),),  # (embed_dim, s)
    "logit_scale": (),
}


def block_index(name: str) -> tuple[TowerName, int] | None:
    """(tower, block index) of a block parameter's name, None for any other parameter."""
    m = _BLOCK_RE.match(name)
    if m is None:
        return None
    return m["tower"], int(m["index"])  # type: ignore[return-value]  # the regex admits tower names only


@functools.lru_cache(maxsize=1024)
def axes(name: str) -> tuple[Axis, ...]:
    """The growth axes of parameter `name` (a GrowCLIP state-dict key); unknown names raise.

    A parameter missing here would be grown or extracted wrongly without a sound, so it fails loudly.
    """
    m = _BLOCK_RE.match(name)
    if m is not None:
        rules = _block_axes(m["tower"])  # type: ignore[arg-type]
        if m["rest"] not in rules:
            raise RuntimeError(f"no growth layout for block parameter {name!r}")
        return rules[m["rest"]]
    if name not in _TOP_AXES:
        raise RuntimeError(f"no growth layout for parameter {name!r}")
    return _TOP_AXES[name]
