"""Exports of a checkpoint: safetensors reloads identically, the ONNX encoders match PyTorch in
onnxruntime, OpenCLIP's own create_model loads the open_clip export and embeds alike; all on real
images and captions, from a model trained a few steps on them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from growclip_stream.checkpoint import Checkpointer
from growclip_stream.data.datasets import iter_records
from growclip_stream.data.images import ImageTransform, normalize_batch
from growclip_stream.data.records import RecordLimits
from growclip_stream.export import (
    ExportError,
    export_checkpoint,
    exported_metadata,
    load_exported,
    open_clip_state_dict,
)
from growclip_stream.model import ArchConfig, ByteTokenizer, ClipLoss, GrowCLIP, TowerConfig
from tests.helpers import DAEMON

HERE = Path(__file__).parent
TOL = 1e-4  # max abs difference allowed between an export's embeddings and PyTorch's


def _arch(tower_depth: int, shared_depth: int, channels: int = 1) -> ArchConfig:
    def tower(depth: int) -> TowerConfig:
        return TowerConfig(width=32, depth=depth, mlp_hidden=64, head_dim=16)

    return ArchConfig(
        image=tower(tower_depth),
        text=tower(tower_depth),
        shared=TowerConfig(width=48, depth=shared_depth, mlp_hidden=96, head_dim=16),
        embed_dim=32,
        channels=channels,
    )


def _real_data(dataset: str, n: int, arch: ArchConfig) -> tuple[torch.Tensor, list[str], list[bytes]]:
    """n test-split (Fashion-MNIST) or train-split (others: captions only in train) records."""
    split = "test" if dataset == "fashion-mnist" else "train"
    records = list(islice(iter_records(dataset, split=split, seed=3), n))  # type: ignore[arg-type]
    transform, limits = ImageTransform(arch.image_size, arch.channels), RecordLimits()
    images = normalize_batch([transform.pixels(r.image, limits) for r in records])
    return images, [r.caption for r in records], [r.image for r in records]


def _trained_checkpoint(root: Path, arch: ArchConfig, dataset: str) -> tuple[str, GrowCLIP]:
    """A model trained 15 AdamW steps on real pairs, saved as a checkpoint under ``root``."""
    torch.manual_seed(0)
    model = GrowCLIP(arch)
    images, captions, _ = _real_data(dataset, 15 * 16, arch)
    tokens = ByteTokenizer(arch.context_length).encode(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(15):
        sl = slice(step * 16, (step + 1) * 16)
        loss = ClipLoss()(model(images[sl], tokens[sl]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = Checkpointer(str(root)).save(
        model, opt, step=15, samples=240, growth={"history": []}, source={"positions": {}}
    )
    return path, model.eval()


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, GrowCLIP]:
    """A checkpoint of a model with blocks in every tower and in the shared encoder (what growth makes)."""
    root = tmp_path_factory.mktemp("ckpt-grown")
    _, model = _trained_checkpoint(root, _arch(tower_depth=1, shared_depth=1), "fashion-mnist")
    return str(root), model


@pytest.fixture(scope="module")
def eval_inputs(grown: tuple[str, GrowCLIP]) -> tuple[torch.Tensor, torch.Tensor]:
    """48 real Fashion-MNIST test images and real captions (Fashion-MNIST's and Tux Paint's
    human-written stamp descriptions), tokenized."""
    arch = grown[1].arch
    images, captions, _ = _real_data("fashion-mnist", 48, arch)
    captions += _real_data("tuxpaint", 16, ArchConfig(**{**arch.__dict__, "channels": 3}))[1]
    return images, ByteTokenizer(arch.context_length).encode(captions)


def test_safetensors_export_reloads_and_embeds_identically(grown, eval_inputs, tmp_path) -> None:
    root, model = grown
    summary = export_checkpoint(root, "safetensors", tmp_path / "m.safetensors")
    assert summary["step"] == 15 and summary["files"] == [str(tmp_path / "m.safetensors")]
    loaded = load_exported(tmp_path / "m.safetensors")
    assert loaded.arch == model.arch and loaded.arch.shared.depth == 1
    images, tokens = eval_inputs
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))
        assert torch.equal(loaded.logit_scale, model.logit_scale)
    meta = exported_metadata(tmp_path / "m.safetensors")
    assert meta["tokenizer"]["eos_id"] == 258 and meta["source"]["step"] == 15


def test_load_exported_rejects_a_plain_safetensors_file(tmp_path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match="not a growclip safetensors export"):
        load_exported(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_onnx_encoders_match_pytorch_in_onnxruntime(grown, eval_inputs, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    root, model = grown
    out = tmp_path / "onnx"
    export_checkpoint(root, "onnx", out)
    info = json.loads((out / "growclip_onnx.json").read_text())
    images, tokens = eval_inputs
    with torch.no_grad():
        expected = {"image": model.encode_image(images).numpy(), "text": model.encode_text(tokens).numpy()}
    for kind, inputs in (("image", images.numpy()), ("text", tokens.numpy())):
        spec = info[f"{kind}_encoder"]
        path = out / spec["file"]
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        assert inp.name == spec["input"]["name"] and isinstance(inp.shape[0], str)  # dynamic batch
        whole = session.run(None, {inp.name: inputs})[0]
        assert whole.shape == (len(inputs), model.arch.embed_dim)
        assert np.abs(whole - expected[kind]).max() < TOL
        # other batch sizes than the traced one (2): one row, and an odd count
        for sl in (slice(0, 1), slice(5, 18)):
            part = session.run(None, {inp.name: inputs[sl]})[0]
            assert np.abs(part - expected[kind][sl]).max() < TOL


def _open_clip_available() -> None:
    # found, not imported: OpenCLIP does not import in this process (see open_clip_check.py)
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("needs open-clip-torch (requirements-nodeps.txt)")


@pytest.mark.slow
@pytest.mark.parametrize(("channels", "dataset"), [(1, "fashion-mnist"), (3, "tuxpaint")])
def test_open_clip_export_loads_in_open_clip_and_embeds_alike(tmp_path, channels, dataset) -> None:
    """All blocks in the shared encoder (what OpenCLIP can express): OpenCLIP's create_model loads the
    export, strict state dict, and its embeddings of real images and captions match ours. A grayscale
    model takes RGB in OpenCLIP: a grayscale image converted to RGB embeds as the original."""
    _open_clip_available()
    arch = _arch(tower_depth=0, shared_depth=2, channels=channels)
    _, model = _trained_checkpoint(tmp_path / "ckpt", arch, dataset)
    out = tmp_path / "oc"
    export_checkpoint(str(tmp_path / "ckpt"), "open_clip", out)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    images, captions, encoded = _real_data(dataset, 24, arch)
    rgb = normalize_batch([ImageTransform(arch.image_size, 3).pixels(b, RecordLimits()) for b in encoded])
    tokens = ByteTokenizer(arch.context_length).encode(captions)
    save_file({"pixels": rgb, "tokens": tokens}, str(tmp_path / "in.safetensors"))
    run = subprocess.run(
        [sys.executable, str(HERE / "open_clip_check.py"), str(out), str(tmp_path / "in.safetensors"),
         str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        assert (got["image"] - model.encode_image(images)).abs().max() < TOL
        assert (got["text"] - model.encode_text(tokens)).abs().max() < TOL
        assert torch.equal(got["logit_scale"], model.logit_scale)


def test_open_clip_state_dict_matches_open_clips_key_layout() -> None:
    """The keys we write are exactly those of OpenCLIP's CLIP built from our config (read from the
    installed package's model code, no weights involved)."""
    _open_clip_available()
    arch = _arch(tower_depth=0, shared_depth=2)
    code = (
        "import json,sys; sys.path.insert(0, sys.argv[1]); import open_clip_check as c; "
        "sys.meta_path.insert(0, c._TorchvisionStandIn()); from open_clip.model import CLIP; "
        "cfg = json.loads(sys.argv[2]); "
        "print(json.dumps({k: list(v.shape) for k, v in CLIP(**cfg['model_cfg']).state_dict().items()}))"
    )
    from growclip_stream.export import open_clip_config

    cfg = open_clip_config(arch)
    result = subprocess.run(
        [sys.executable, "-c", code, str(HERE), json.dumps(cfg)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout)
    ours = {k: list(v.shape) for k, v in open_clip_state_dict(GrowCLIP(arch)).items()}
    assert ours == theirs


def test_open_clip_refuses_towers_with_their_own_blocks(grown, tmp_path) -> None:
    root, _ = grown
    with pytest.raises(ExportError, match=r"image tower has 1 block.*image\.to_shared"):
        export_checkpoint(root, "open_clip", tmp_path / "oc")
    result = subprocess.run(
        [*DAEMON, "export", "--checkpoint", root, "--format", "open_clip", "--out", str(tmp_path / "oc")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "OpenCLIP cannot express this architecture" in result.stderr and "text.to_shared" in result.stderr
    assert not (tmp_path / "oc").exists()


@pytest.mark.slow
def test_export_cli_from_a_checkpoint_folder_and_its_errors(grown, tmp_path) -> None:
    root, model = grown
    folder = Checkpointer(root).latest()
    assert folder is not None
    ok = subprocess.run(
        [*DAEMON, "export", "--checkpoint", folder, "--format", "safetensors", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["format"] == "safetensors" and summary["step"] == 15
    assert load_exported(tmp_path / "x" / "model.safetensors").arch == model.arch
    for args, message in (
        (["--checkpoint", root, "--format", "pickle"], "unknown export format 'pickle'"),
        (["--checkpoint", str(tmp_path / "nothing"), "--format", "onnx"], "no checkpoint at"),
    ):
        bad = subprocess.run(
            [*DAEMON, "export", *args, "--out", str(tmp_path / "y")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert bad.returncode == 2 and message in bad.stderr
