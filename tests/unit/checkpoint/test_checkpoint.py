"""The checkpoint store: layout, round trip, never rewriting a published folder, fallback, retention."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from growclip_stream.batch import Batch
from growclip_stream.checkpoint import Checkpointer, CheckpointError, CheckpointFormatError, restore_optimizer
from growclip_stream.growth.operators import GrowthOp, apply_op
from growclip_stream.model import GrowCLIP
from growclip_stream.optim import build_optimizer
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.trainer import OnlineTrainer
from tests.helpers import tiny_arch

ROOT = Path(__file__).resolve().parents[3]


def trained_grown_trainer() -> OnlineTrainer:
    torch.manual_seed(0)
    trainer = OnlineTrainer(
        apply_op(GrowCLIP(tiny_arch()), GrowthOp.parse("deepen:text+1")), TrainConfig(batch_size=8)
    )
    g = torch.Generator().manual_seed(1)
    batch = Batch(
        torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 256, (8, 32), generator=g), tuple("abcdefgh")
    )
    for _ in range(3):
        trainer.train_step(batch)
    return trainer


def save(ckpt: Checkpointer, trainer: OnlineTrainer, step: int, generation: int = 0, **source: int) -> str:
    return ckpt.save(
        trainer.model, trainer.optimizer, step=step, samples=8 * step,
        growth={"history": [{"generation": g + 1} for g in range(generation)]},
        source={"topic": "t", "positions": dict(source)},
    )  # fmt: skip


def folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


@pytest.mark.parametrize("root", ["local", "memory://ckpt-test"])
def test_round_trip_restores_grown_shape_weights_optimizer_and_positions(tmp_path, root) -> None:
    url = str(tmp_path / "ckpt") if root == "local" else root
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(url)
    assert ckpt.latest() is None and ckpt.load_latest() is None
    path = ckpt.save(
        trainer.model, trainer.optimizer, step=trainer.step, samples=trainer.samples,
        growth={"history": [{"generation": 1}]}, source={"positions": {"0": 24}},
    )  # fmt: skip
    assert ckpt.latest() == path
    loaded = ckpt.load()
    assert loaded.path == path and loaded.generation == 1
    assert loaded.model.arch == trainer.model.arch and loaded.model.arch.text.depth == 2
    for (n1, p1), (n2, p2) in zip(
        trainer.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    assert loaded.step == 3 and loaded.samples == 24
    assert loaded.manifest["source"] == {"positions": {"0": 24}}
    assert loaded.manifest["format_version"] == 2 and set(loaded.manifest["files"]) == {
        "model.safetensors",
        "optimizer.safetensors",
    }
    opt = build_optimizer(loaded.model, trainer.cfg)
    assert restore_optimizer(loaded.model, opt, loaded.optimizer_state) == len(
        list(loaded.model.parameters())
    )
    orig = dict(trainer.model.named_parameters())
    for name, p in loaded.model.named_parameters():
        assert torch.equal(opt.state[p]["exp_avg_sq"], trainer.optimizer.state[orig[name]]["exp_avg_sq"])


def test_a_save_at_the_same_step_goes_to_a_new_folder_and_never_touches_the_published_one(tmp_path) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path))
    first = save(ckpt, trainer, 3, **{"0": 24})
    published = {p.name: p.read_bytes() for p in Path(first).iterdir()}
    second = save(ckpt, trainer, 3, **{"0": 30})  # no step between them: an idle stream, a stop, ...
    assert second != first and ckpt.latest() == second
    assert {p.name: p.read_bytes() for p in Path(first).iterdir()} == published
    assert folders(tmp_path) == ["00000001-g0-s000000000003", "00000002-g0-s000000000003"]
    assert ckpt.load().manifest["source"]["positions"] == {"0": 30}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left behind"


def test_retention_keeps_the_newest_and_the_last_checkpoint_before_each_growth(tmp_path) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step, generation in [(5, 0), (10, 0), (15, 1), (20, 1), (25, 1), (30, 2), (35, 2), (40, 2)]:
        save(ckpt, trainer, step, generation)
    assert folders(tmp_path) == [
        "00000002-g0-s000000000010",  # the last of generation 0, before the first growth
        "00000005-g1-s000000000025",  # the last of generation 1
        "00000007-g2-s000000000035",  # the newest two
        "00000008-g2-s000000000040",
    ]
    assert ckpt.latest() == str(tmp_path / "00000008-g2-s000000000040")


def damage(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_corruption_is_detected_for_an_explicit_path(tmp_path) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path))
    path = save(ckpt, trainer, 1)
    damage(Path(path) / "model.safetensors")
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.load(path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.load()
    manifest = Path(path) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": "one"}))
    with pytest.raises(CheckpointError, match="unknown format version"):
        ckpt.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).load()


@pytest.mark.parametrize("how", ["damaged file", "no manifest", "manifest not json", "file missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, how) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path))
    good = save(ckpt, trainer, 3, **{"0": 24})
    newest = Path(save(ckpt, trainer, 4, **{"0": 32}))
    if how == "damaged file":
        damage(newest / "optimizer.safetensors")
    elif how == "no manifest":
        (newest / "manifest.json").unlink()
    elif how == "manifest not json":
        (newest / "manifest.json").write_text('{"format_version": 2, "ste')
    else:
        (newest / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="growclip_stream.checkpoint.store"):
        loaded = ckpt.load()
    assert loaded.path == good and loaded.step == 3
    assert loaded.manifest["source"]["positions"] == {"0": 24}
    messages = [r.getMessage() for r in caplog.records]
    assert "checkpoint unusable, trying the previous one" in messages
    assert "resuming from an older checkpoint: newer ones are unusable" in messages


def test_a_newer_format_stops_loading_instead_of_falling_back(tmp_path) -> None:
    """A newer version's checkpoint is not damage: falling back past it would drop its progress."""
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path))
    save(ckpt, trainer, 3)
    manifest = Path(save(ckpt, trainer, 4)) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 3}))
    with pytest.raises(CheckpointFormatError, match="newer"):
        ckpt.load()


@pytest.mark.parametrize("how", ["missing", "garbage", "names a missing folder", "names a broken folder"])
def test_a_bad_latest_pointer_falls_back_to_scanning_the_folders(tmp_path, how) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path))
    save(ckpt, trainer, 3)
    newest = save(ckpt, trainer, 4)
    latest = tmp_path / "LATEST"
    if how == "missing":
        latest.unlink()
    elif how == "garbage":
        latest.write_bytes(b"\x00\xff not a name")
    elif how == "names a missing folder":
        latest.write_text("00000009-g0-s000000000009")
    else:  # LATEST names the older folder, which is broken: the newer complete one is used
        first = tmp_path / "00000001-g0-s000000000003"
        latest.write_text(first.name)
        damage(first / "model.safetensors")
    assert ckpt.has_checkpoint()
    assert ckpt.load().path == newest


_SAVE_AGAIN_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from growclip_stream.checkpoint import Checkpointer

root, limit = sys.argv[1], int(sys.argv[2])
ckpt = Checkpointer(root)
loaded = ckpt.load()
# The kernel kills the process (SIGXFSZ) once a write would take a file past `limit` bytes:
# the save dies in the middle of writing its model file, like a kill -9 during a slow write.
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
ckpt.save(loaded.model, None, step=loaded.step, samples=loaded.samples,
          growth=loaded.manifest["growth"], source={"topic": "t", "positions": {"0": 99}})
"""


def test_a_process_killed_while_saving_the_same_step_again_leaves_the_published_checkpoint_loadable(
    tmp_path,
) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path))
    published = save(ckpt, trainer, 3, **{"0": 24})
    model_bytes = (Path(published) / "model.safetensors").stat().st_size
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE_AGAIN_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path), str(model_bytes // 2)],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr.decode()[-2000:]
    truncated = [p for p in tmp_path.rglob("model.safetensors") if p.stat().st_size == model_bytes // 2]
    assert truncated, "the second save was killed in the middle of its model file"

    loaded = Checkpointer(str(tmp_path)).load()  # what the next start does
    assert loaded.path == published and loaded.step == 3
    assert loaded.manifest["source"]["positions"] == {"0": 24}
    pairs = zip(loaded.model.state_dict().values(), trainer.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # and the next save clears what the killed one left behind
    again = save(ckpt, trainer, 3, **{"0": 24})
    assert Checkpointer(str(tmp_path)).load().path == again
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
