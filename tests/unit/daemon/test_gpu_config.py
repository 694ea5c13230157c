"""configs/gpu.yaml and the ViT-B architectures in the model config."""

from __future__ import annotations

from pathlib import Path

from growclip_daemon.config import load_config
from growclip_stream.growth.operators import GrowthOp, grow_arch
from growclip_stream.model.clip import ArchConfig, TowerConfig

ROOT = Path(__file__).resolve().parents[3]


def vit_b(patch: int) -> ArchConfig:
    """OpenCLIP's ViT-B/32 or ViT-B/16 shape: 224 px RGB, 768 wide x 12 (MLP 3072, heads of 64);
    text 512 wide x 12 with 8 heads, 77 tokens; 512-d embeddings."""
    return ArchConfig(
        image=TowerConfig(width=768, depth=12, mlp_hidden=3072, head_dim=64),
        text=TowerConfig(width=512, depth=12, mlp_hidden=2048, head_dim=64),
        shared=TowerConfig(width=512, depth=0, mlp_hidden=2048, head_dim=64),
        embed_dim=512,
        image_size=224,
        patch_size=patch,
        channels=3,
        context_length=77,
    )


def test_gpu_config_validates_and_grows_from_vit_s_to_vit_b() -> None:
    cfg = load_config(ROOT / "configs" / "gpu.yaml")  # validates on a machine without a GPU
    t, arch = cfg.train, cfg.model
    assert (t.device, t.precision, t.compile, t.fused_adam) == ("cuda", "bf16", True, "auto")
    assert (arch.image_size, arch.patch_size, arch.channels, arch.context_length) == (224, 16, 3, 77)
    assert (arch.image.width, arch.image.depth, arch.image.mlp_hidden, arch.image.heads) == (384, 12, 1536, 6)
    grown = arch
    for op in cfg.growth.space:  # the whole space, which one growth step may apply at once
        grown = grow_arch(grown, GrowthOp.parse(op))
    assert cfg.growth.max_ops_per_step >= len(cfg.growth.space)
    assert grown == vit_b(16)
    assert arch.num_params() < 0.5 * grown.num_params() <= cfg.growth.max_params
    assert grown.image.heads == 12 and grown.text.heads == 8


def test_every_gpu_config_line_is_commented() -> None:
    for line in (ROOT / "configs" / "gpu.yaml").read_text().splitlines():
        if line.strip():
            assert "#" in line, line


def test_vit_b_architectures_are_expressible() -> None:
    for patch, tokens in ((32, 50), (16, 197)):
        arch = ArchConfig.from_dict(vit_b(patch).to_dict())
        assert arch.image_tokens == tokens and arch.image.heads == 12 and arch.text.heads == 8
        # OpenCLIP's ViT-B towers are ~86M (image) + ~38M (text, 25M of it the BPE embedding we do not
        # have: byte tokens need 259 rows); ours adds the projections into the joint width
        assert 100e6 < arch.num_params() < 135e6
