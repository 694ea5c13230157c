"""RNG states and the replay / held-out reservoirs survive a checkpoint, without pickle."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from growclip_stream.checkpoint import (
    CheckpointStore,
    capture,
    python_rng_state,
    restore_global_rng,
    restore_python_rng,
)
from growclip_stream.data.pipeline import Sample
from growclip_stream.data.reservoir import Reservoir
from growclip_stream.model import GrowCLIP
from tests.helpers import tiny_arch


def filled(capacity: int, n: int, seed: int) -> Reservoir:
    res = Reservoir(capacity, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = torch.randint(0, 256, (1, 28, 28), generator=g, dtype=torch.uint8)
        res.add(Sample(f"id-{i}-é", pixels, f"caption {i} ✓ {'x' * (i % 7)}"))
    return res


def same(a: list[Sample], b: list[Sample]) -> bool:
    return [(s.id, s.caption) for s in a] == [(s.id, s.caption) for s in b] and all(
        torch.equal(x.image, y.image) for x, y in zip(a, b, strict=True)
    )


def test_rng_and_reservoirs_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    replay, holdout = filled(50, 180, seed=3), filled(20, 20, seed=4)
    empty = Reservoir(10, seed=5)
    loop_rng = random.Random(7)
    loop_rng.random()
    torch.manual_seed(11)
    torch.rand(3)
    model = GrowCLIP(tiny_arch())
    state = capture(
        model, None, step=5, samples=40,
        loop={"rng": python_rng_state(loop_rng), "replay": replay.state_dict(),
              "holdout": holdout.state_dict(), "recent": empty.state_dict()},
    )  # fmt: skip
    # what each generator draws next, had the process gone on
    torch_next = torch.rand(4)
    loop_next = loop_rng.random()
    replay_next = replay.sample(8)
    newcomer = Sample("new", torch.zeros(1, 28, 28, dtype=torch.uint8), "new")
    replay.add(newcomer)
    replay_after_add = list(replay.samples)

    store = CheckpointStore(str(tmp_path))
    path = Path(store.write(state).path)
    torch.manual_seed(999)  # a restarted process starts elsewhere
    loaded = store.load()

    restore_global_rng(loaded.rng)
    assert torch.equal(torch.rand(4), torch_next)
    rng = random.Random(0)
    restore_python_rng(rng, loaded.loop_state["rng"])
    assert rng.random() == loop_next
    restored = Reservoir(50, seed=0)
    restored.load_state_dict(loaded.loop_state["replay"])
    assert restored.seen == 180 and len(restored) == 50
    assert same(restored.sample(8), replay_next)
    restored.add(newcomer)
    assert same(restored.samples, replay_after_add)
    held = Reservoir(20, seed=0)
    held.load_state_dict(loaded.loop_state["holdout"])
    assert same(held.samples, holdout.samples) and held.seen == 20
    again = Reservoir(10, seed=0)
    again.load_state_dict(loaded.loop_state["recent"])
    assert len(again) == 0 and again.seen == 0

    # stored compactly: uint8 pixels and UTF-8 bytes in safetensors, nothing pickled, JSON manifest
    tensors = load_file(str(path / "loop.safetensors"))
    assert tensors["replay/images"].dtype == torch.uint8 and tensors["replay/images"].shape == (50, 1, 28, 28)
    assert tensors["replay/captions/bytes"].dtype == torch.uint8
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["loop"]["replay"]["images"] == {"__tensor__": "replay/images"}
    assert sorted(p.name for p in path.iterdir()) == [
        "loop.safetensors",
        "manifest.json",
        "model.safetensors",
    ]


def test_a_smaller_reservoir_keeps_what_fits() -> None:
    big = filled(30, 30, seed=1)
    small = Reservoir(10, seed=0)
    small.load_state_dict(big.state_dict())
    assert same(small.samples, big.samples[:10]) and small.seen == 30
