import json

import pytest
import torch

from growclip_stream.batch import Batch
from growclip_stream.checkpoint import Checkpointer, CheckpointError, restore_optimizer
from growclip_stream.growth.operators import GrowthOp, apply_op
from growclip_stream.model import GrowCLIP
from growclip_stream.optim import build_optimizer
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.trainer import OnlineTrainer
from tests.helpers import tiny_arch


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


@pytest.mark.parametrize("root", ["local", "memory://ckpt-test"])
def test_round_trip_restores_grown_shape_weights_optimizer_and_positions(tmp_path, root) -> None:
    url = str(tmp_path / "ckpt") if root == "local" else root
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(url)
    assert ckpt.latest() is None
    path = ckpt.save(
        trainer.model, trainer.optimizer, step=trainer.step, samples=trainer.samples,
        growth={"history": [{"generation": 1}]}, source={"positions": {"0": 24}},
    )  # fmt: skip
    assert ckpt.latest() == path
    loaded = ckpt.load()
    assert loaded.model.arch == trainer.model.arch and loaded.model.arch.text.depth == 2
    for (n1, p1), (n2, p2) in zip(
        trainer.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    assert loaded.step == 3 and loaded.samples == 24
    assert loaded.manifest["source"] == {"positions": {"0": 24}}
    opt = build_optimizer(loaded.model, trainer.cfg)
    assert restore_optimizer(loaded.model, opt, loaded.optimizer_state) == len(
        list(loaded.model.parameters())
    )
    orig = dict(trainer.model.named_parameters())
    for name, p in loaded.model.named_parameters():
        assert torch.equal(opt.state[p]["exp_avg_sq"], trainer.optimizer.state[orig[name]]["exp_avg_sq"])


def test_latest_points_at_newest_and_retention_keeps_n(tmp_path) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path), keep=2)
    paths = [ckpt.save(trainer.model, None, step=s, samples=s, growth={}, source={}) for s in (5, 10, 15)]
    assert ckpt.latest() == paths[-1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["000000000010", "000000000015"]
    assert not list(tmp_path.glob("*.tmp"))


def test_corruption_is_detected(tmp_path) -> None:
    trainer = trained_grown_trainer()
    ckpt = Checkpointer(str(tmp_path))
    path = ckpt.save(trainer.model, trainer.optimizer, step=1, samples=8, growth={}, source={})
    blob = (tmp_path / "000000000001" / "model.safetensors").read_bytes()
    (tmp_path / "000000000001" / "model.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum"):
        ckpt.load(path)
    manifest = tmp_path / "000000000001" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version"):
        ckpt.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Checkpointer(str(tmp_path / "empty")).load()
