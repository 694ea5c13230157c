"""Exports of a trained model for the tools users already have.

Three formats, all from a checkpoint (see :func:`load_checkpoint`):

- ``safetensors``: one file with every weight, and the architecture, step and tokenizer in the
  safetensors metadata; :func:`load_exported` rebuilds the exact model from it (no pickle).
- ``onnx``: the image and the text encoder as two ONNX graphs with a dynamic batch dimension, plus
  ``growclip_onnx.json`` naming the inputs, the preprocessing and the tokenizer. Inputs are what the
  library feeds its own model: normalised pixels and byte-token ids.
- ``open_clip``: ``open_clip_config.json`` and ``open_clip_model.safetensors``, the files OpenCLIP's
  ``create_model("local-dir:PATH")`` reads. OpenCLIP's towers put their final LayerNorm directly on
  the blocks' output, while ours first map each modality into the shared width (``to_shared``, a
  linear map with bias). That map folds exactly into the token, patch and position embeddings only
  when a tower has no blocks of its own, so only models whose blocks all live in the shared encoder
  (``image.depth == 0`` and ``text.depth == 0``) can be expressed; the shared blocks become both of
  OpenCLIP's towers. Anything else is refused with the reason. Texts must still be tokenized with
  the byte tokenizer (described in the config's ``growclip`` entry): OpenCLIP has no byte-level
  tokenizer, and its default BPE tokenizer gives ids this vocabulary does not have.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from growclip_stream.checkpoint import Checkpoint, CheckpointError
from growclip_stream.checkpoint import store as checkpoint_store
from growclip_stream.data.images import MEAN, STD
from growclip_stream.model import BOS_ID, EOS_ID, PAD_ID, ArchConfig, GrowCLIP
from growclip_stream.model.clip import Block

log = logging.getLogger(__name__)

ExportFormat = Literal["safetensors", "onnx", "open_clip"]
FORMATS: tuple[ExportFormat, ...] = ("safetensors", "onnx", "open_clip")
EXPORT_VERSION = "1"
ONNX_IMAGE_FILE = "image_encoder.onnx"
ONNX_TEXT_FILE = "text_encoder.onnx"
ONNX_INFO_FILE = "growclip_onnx.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
# ITU-R 601-2 luma, the weights PIL and OpenCV use to turn RGB into the grayscale a 1-channel model sees
LUMA_RGB = (0.299, 0.587, 0.114)


class ExportError(ValueError):
    """The checkpoint cannot be exported in the requested format; the message says why."""


def tokenizer_spec(arch: ArchConfig) -> dict[str, Any]:
    """How texts become the ids an exported text encoder takes (the library's ByteTokenizer)."""
    return {
        "kind": "utf-8 bytes",
        "vocab_size": arch.vocab_size,
        "context_length": arch.context_length,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "layout": "BOS, the caption's UTF-8 bytes (cut to context_length - 2 at a character boundary), "
        "EOS, then PAD up to context_length",
    }


def preprocessing_spec(arch: ArchConfig) -> dict[str, Any]:
    """How images become the pixels an exported image encoder takes."""
    return {
        "image_size": arch.image_size,
        "channels": arch.channels,
        "color": "grayscale (ITU-R 601-2 luma)" if arch.channels == 1 else "RGB",
        "resize": "shorter side to image_size (area when shrinking, bicubic when enlarging), center crop",
        "normalize": f"(x / 255 - {MEAN}) / {STD}, i.e. [-1, 1]",
        "mean": MEAN,
        "std": STD,
    }


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(url: str) -> Checkpoint:
    """One checkpoint folder (it holds manifest.json), or the newest checkpoint under a root."""
    try:
        return checkpoint_store.load_checkpoint(url)
    except (CheckpointError, FileNotFoundError) as err:
        raise ExportError(f"no checkpoint at {url}: {err}") from err


# ----------------------------------------------------------------------------- safetensors


def export_safetensors(model: GrowCLIP, out: Path, extra: dict[str, Any] | None = None) -> Path:
    """All weights in one safetensors file; the architecture and tokenizer go in its metadata."""
    metadata = {
        "format": "growclip",
        "growclip_export_version": EXPORT_VERSION,
        "architecture": json.dumps(model.arch.to_dict()),
        "tokenizer": json.dumps(tokenizer_spec(model.arch)),
        "preprocessing": json.dumps(preprocessing_spec(model.arch)),
    }
    metadata.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out), metadata=metadata)
    return out


def exported_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a safetensors export, JSON values decoded."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != "growclip":
        raise ExportError(f"{path} is not a growclip safetensors export (no 'format: growclip' metadata)")
    return {k: v if k in ("format", "growclip_export_version") else json.loads(v) for k, v in raw.items()}


def load_exported(path: str | Path) -> GrowCLIP:
    """Rebuild the model a safetensors export holds (architecture from its metadata, weights strict)."""
    meta = exported_metadata(path)
    if meta.get("growclip_export_version") != EXPORT_VERSION:
        raise ExportError(f"{path}: unknown export version {meta.get('growclip_export_version')!r}")
    model = GrowCLIP(ArchConfig.from_dict(meta["architecture"]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- ONNX


class _ImageEncoder(nn.Module):
    def __init__(self, model: GrowCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class _TextEncoder(nn.Module):
    def __init__(self, model: GrowCLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def export_onnx(model: GrowCLIP, out: Path) -> dict[str, Any]:
    """The two encoders as ONNX graphs (dynamic batch, L2-normalised embeddings out) into folder ``out``.

    Traced with torch.export (the exporter PyTorch maintains); the example batch has 2 rows so that
    the batch dimension is not specialised to 1.
    """
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"the onnx format needs the package(s) {', '.join(missing)}: "
            "pip install 'growclip-stream[export]'"
        )
    arch = model.arch
    model = model.eval()
    out.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    image = torch.zeros(2, arch.channels, arch.image_size, arch.image_size)
    tokens = torch.full((2, arch.context_length), PAD_ID, dtype=torch.int64)
    tokens[:, 0], tokens[:, 1] = BOS_ID, EOS_ID
    # weights inside the .onnx file up to protobuf's 2 GB limit, beside it (external data) beyond
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_500_000_000
    for module, example, name, inp, outp in (
        (_ImageEncoder(model), image, ONNX_IMAGE_FILE, "pixel_values", "image_embeds"),
        (_TextEncoder(model), tokens, ONNX_TEXT_FILE, "input_ids", "text_embeds"),
    ):
        torch.onnx.export(
            module.eval(),
            (example,),
            str(out / name),
            input_names=[inp],
            output_names=[outp],
            dynamic_shapes={inp: {0: batch}},
            external_data=external,
            verbose=False,
        )
    info = {
        "growclip_export_version": EXPORT_VERSION,
        "architecture": arch.to_dict(),
        "image_encoder": {
            "file": ONNX_IMAGE_FILE,
            "input": {
                "name": "pixel_values",
                "shape": ["batch", arch.channels, arch.image_size, arch.image_size],
                "dtype": "float32",
            },
            "output": {"name": "image_embeds", "shape": ["batch", arch.embed_dim], "l2_normalized": True},
        },
        "text_encoder": {
            "file": ONNX_TEXT_FILE,
            "input": {"name": "input_ids", "shape": ["batch", arch.context_length], "dtype": "int64"},
            "output": {"name": "text_embeds", "shape": ["batch", arch.embed_dim], "l2_normalized": True},
        },
        "logit_scale": float(model.logit_scale.detach().exp().clamp(max=100.0)),
        "preprocessing": preprocessing_spec(arch),
        "tokenizer": tokenizer_spec(arch),
    }
    (out / ONNX_INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------- OpenCLIP


def open_clip_refusal(arch: ArchConfig) -> str | None:
    """Why OpenCLIP cannot express this architecture, or None when it can."""
    reasons = []
    for tower in ("image", "text"):
        depth = arch.tower(tower).depth
        if depth:
            reasons.append(
                f"the {tower} tower has {depth} block(s) of its own followed by {tower}.to_shared, a linear "
                "map with bias into the shared width before the final LayerNorm; OpenCLIP's towers apply "
                "their final LayerNorm directly to the blocks' output, so that map has nowhere to go (it "
                "folds into the embeddings only when the tower has no blocks)"
            )
    if arch.channels not in (1, 3):
        reasons.append(f"OpenCLIP's patch embedding takes 3 channels; this model has {arch.channels}")
    s = arch.shared
    if int(s.width * (s.mlp_hidden / s.width)) != s.mlp_hidden:
        reasons.append(f"an MLP of {s.mlp_hidden} units on width {s.width} is no ratio OpenCLIP reproduces")
    if not reasons:
        return None
    return (
        "OpenCLIP cannot express this architecture: "
        + "; ".join(reasons)
        + ". Models whose blocks all live in the shared encoder (model.image.depth 0, model.text.depth 0, "
        "growth on the shared tower only) export to OpenCLIP; the safetensors and onnx formats take "
        "any model."
    )


def open_clip_config(arch: ArchConfig) -> dict[str, Any]:
    """The ``open_clip_config.json`` content: OpenCLIP's model config, preprocessing, and our tokenizer."""
    refusal = open_clip_refusal(arch)
    if refusal:
        raise ExportError(refusal)
    s = arch.shared
    block = {"width": s.width, "layers": s.depth, "mlp_ratio": s.mlp_hidden / s.width}
    channels = 3
    mean = [MEAN] * channels
    std = [STD] * channels
    return {
        "model_cfg": {
            "embed_dim": arch.embed_dim,
            "vision_cfg": {
                **block,
                "head_width": s.head_dim,
                "patch_size": arch.patch_size,
                "image_size": arch.image_size,
                "no_ln_pre": True,
                "pool_type": "tok",
            },
            "text_cfg": {
                **block,
                "heads": s.heads,
                "context_length": arch.context_length,
                "vocab_size": arch.vocab_size,
                "pad_id": PAD_ID,
                "eos_id": EOS_ID,
                "pool_type": "eos",
            },
        },
        "preprocess_cfg": {
            "size": arch.image_size,
            "mode": "RGB",
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "growclip": {
            "growclip_export_version": EXPORT_VERSION,
            "architecture": arch.to_dict(),
            "tokenizer": tokenizer_spec(arch),
            "preprocessing": preprocessing_spec(arch),
            "note": "tokenize texts with the byte tokenizer described here; OpenCLIP's get_tokenizer gives "
            "BPE ids this vocabulary does not have"
            + (
                ". The model was trained on grayscale: the RGB patch embedding weighs the channels by "
                "ITU-R 601-2 luma, so an RGB image gives the embedding of its grayscale version"
                if arch.channels == 1
                else ""
            ),
        },
    }


def _block_state(prefix: str, block: Block) -> dict[str, torch.Tensor]:
    """One of our blocks under OpenCLIP's ResidualAttentionBlock names (MultiheadAttention, c_fc, c_proj)."""
    return {
        f"{prefix}.ln_1.weight": block.ln_1.weight,
        f"{prefix}.ln_1.bias": block.ln_1.bias,
        f"{prefix}.attn.in_proj_weight": block.attn.qkv.weight,  # both lay q, k, v out in that order
        f"{prefix}.attn.in_proj_bias": block.attn.qkv.bias,
        f"{prefix}.attn.out_proj.weight": block.attn.out.weight,
        f"{prefix}.attn.out_proj.bias": block.attn.out.bias,
        f"{prefix}.ln_2.weight": block.ln_2.weight,
        f"{prefix}.ln_2.bias": block.ln_2.bias,
        f"{prefix}.mlp.c_fc.weight": block.mlp.fc1.weight,
        f"{prefix}.mlp.c_fc.bias": block.mlp.fc1.bias,
        f"{prefix}.mlp.c_proj.weight": block.mlp.fc2.weight,
        f"{prefix}.mlp.c_proj.bias": block.mlp.fc2.bias,
    }


@torch.no_grad()
def open_clip_state_dict(model: GrowCLIP) -> dict[str, torch.Tensor]:
    """Our weights under OpenCLIP's ``CLIP`` state-dict keys, ``to_shared`` folded into the embeddings.

    With no tower blocks, each modality's tokens are ``to_shared(embedding + position)``, an affine
    function of the embeddings, so ``A·e + A·p + b`` is rewritten as embeddings ``A·e`` and positions
    ``A·p + b``. A 1-channel model's patch embedding is spread over RGB with the luma weights.
    """
    open_clip_config(model.arch)  # refuses what cannot be expressed
    arch = model.arch
    img, txt = model.image, model.text
    a_img, b_img = img.to_shared.weight, img.to_shared.bias  # (shared, image width), (shared,)
    a_txt, b_txt = txt.to_shared.weight, txt.to_shared.bias
    conv = torch.einsum("sw,wchk->schk", a_img, img.patch_embed.weight)  # (shared, C, p, p)
    if arch.channels == 1:
        conv = conv * torch.tensor(LUMA_RGB, dtype=conv.dtype).view(1, 3, 1, 1)
    out: dict[str, torch.Tensor] = {
        "logit_scale": model.logit_scale,
        "visual.class_embedding": a_img @ img.class_token,
        "visual.positional_embedding": img.pos_embed @ a_img.T + b_img,
        "visual.conv1.weight": conv,
        "visual.ln_post.weight": model.ln_post.weight,
        "visual.ln_post.bias": model.ln_post.bias,
        "visual.proj": model.proj.weight.T,
        "token_embedding.weight": txt.token_embed.weight @ a_txt.T,
        "positional_embedding": txt.pos_embed @ a_txt.T + b_txt,
        "ln_final.weight": model.ln_post.weight,
        "ln_final.bias": model.ln_post.bias,
        "text_projection": model.proj.weight.T,
    }
    for i, block in enumerate(model.shared.blocks):
        out.update(_block_state(f"visual.transformer.resblocks.{i}", cast(Block, block)))
        out.update(_block_state(f"transformer.resblocks.{i}", cast(Block, block)))
    return {k: v.detach().cpu().float().contiguous().clone() for k, v in out.items()}


def export_open_clip(model: GrowCLIP, out: Path) -> dict[str, Any]:
    """The two files of an OpenCLIP ``local-dir:`` model into folder ``out``."""
    config = open_clip_config(model.arch)
    state = open_clip_state_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / OPEN_CLIP_WEIGHTS_FILE))
    (out / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return config


# ----------------------------------------------------------------------------- entry point


def export_checkpoint(checkpoint: str, fmt: str, out: Path) -> dict[str, Any]:
    """Export the checkpoint at ``checkpoint`` (root or folder, any fsspec URL) to local path ``out``.

    Returns a summary: format, source checkpoint, step, the files written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model.eval()
    source = {"checkpoint": ckpt.path, "step": ckpt.step, "samples": ckpt.samples}
    if fmt == "safetensors":
        target = out if out.suffix == ".safetensors" else out / "model.safetensors"
        files = [export_safetensors(model, target, extra={"source": source})]
    elif fmt == "onnx":
        export_onnx(model, out)
        files = [out / ONNX_IMAGE_FILE, out / ONNX_TEXT_FILE, out / ONNX_INFO_FILE]
    else:
        export_open_clip(model, out)
        files = [out / OPEN_CLIP_CONFIG_FILE, out / OPEN_CLIP_WEIGHTS_FILE]
    summary = {
        "format": fmt,
        **source,
        "parameters": model.arch.num_params(),
        "files": [str(f) for f in files],
    }
    log.info("exported", extra=summary)
    return summary
