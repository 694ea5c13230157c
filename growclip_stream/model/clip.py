"""GrowCLIP: a CLIP-style image-text dual encoder with a shared encoder, in one file.

Composition (OpenCLIP-like):

    images (B, C, S, S) -> patch embedding, class token, positions -> image blocks -> image.to_shared
    tokens (B, L)       -> token embedding, positions -> text blocks (causal)   -> text.to_shared
    each modality then  -> shared blocks (same weights; causal for text) -> pool (image: class token,
                           text: first EOS) -> ln_post -> proj (no bias) -> L2 normalise

All blocks are pre-LayerNorm transformer blocks (attention, then a GELU MLP). The shape of the whole
model lives in one frozen `ArchConfig`; growth (growclip_stream.growth.operators) builds a new model
from a new config, so `GrowCLIP.arch` is always the single source of truth for the current shape.
State-dict keys are part of the growth operators' contract: towers are `image`, `text`, `shared`,
each with `blocks.<i>`; see `Block` for the names inside a block.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from growclip_stream.model.tokenizer import EOS_ID, VOCAB_SIZE

TowerName = Literal["image", "text", "shared"]
TOWER_NAMES: tuple[TowerName, ...] = ("image", "text", "shared")
# Initialisation (OpenCLIP's scheme, fan-in scaled): a fixed std such as 0.02 for every matrix is
# tiny at widths like 32, where AdamW's first steps (each ~lr per weight) then rewrite the weights
# relative to their size and learning is slow and seed-dependent (bench/README.md, "Learning").
INIT_STD = 0.02  # token embeddings
TEXT_POS_STD = 0.01  # text positional embedding


def fan_in_std(fan_in: int) -> float:
    """Std of a freshly initialised matrix (linear layers, the patch embedding's rows) of this fan-in."""
    return float(fan_in**-0.5)


MAX_LOGIT_SCALE = 100.0  # cap of the softmax temperature exp(logit_scale), as in CLIP
LOGIT_SCALE_CAP = math.log(MAX_LOGIT_SCALE)  # the same cap on the parameter, where it is enforced


# ----------------------------------------------------------------------------- configuration


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class TowerConfig:
    """Shape of one stack of transformer blocks (a modality tower or the shared encoder)."""

    width: int  # residual width: channels of every token in this stack
    depth: int  # number of transformer blocks (0 allowed: the shared encoder may be empty)
    mlp_hidden: int  # hidden units of each block's MLP
    head_dim: int = 16  # channels per attention head; heads = width // head_dim, so heads follow width

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012  (read by pydantic, not a field)

    def __post_init__(self) -> None:
        for name, minimum in (("width", 1), ("depth", 0), ("mlp_hidden", 1), ("head_dim", 1)):
            _check_int("TowerConfig", name, getattr(self, name), minimum)
        if self.width % self.head_dim:
            raise ValueError(
                f"TowerConfig.width ({self.width}) must be a multiple of head_dim ({self.head_dim})"
            )

    @property
    def heads(self) -> int:
        return self.width // self.head_dim


@dataclass(frozen=True)
class ArchConfig:
    """The whole model's shape. Growth changes the towers only; everything else is fixed for life."""

    image: TowerConfig
    text: TowerConfig
    shared: TowerConfig  # shared encoder used by both modalities (depth may be 0)
    embed_dim: int = 64  # joint embedding size served by the API: NEVER changes under growth
    image_size: int = 28  # input images are (channels, image_size, image_size)
    patch_size: int = 7  # image_size must be a multiple of it
    channels: int = 1
    context_length: int = 64  # text tokens per caption, BOS and EOS included (captions are cut to 62 bytes)
    vocab_size: int = VOCAB_SIZE

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012  (read by pydantic, not a field)

    def __post_init__(self) -> None:
        for tower in TOWER_NAMES:
            if not isinstance(getattr(self, tower), TowerConfig):
                raise ValueError(f"ArchConfig.{tower} must be a TowerConfig, got {getattr(self, tower)!r}")
        for name in ("embed_dim", "image_size", "patch_size", "channels"):
            _check_int("ArchConfig", name, getattr(self, name), 1)
        _check_int("ArchConfig", "context_length", self.context_length, 2)
        _check_int("ArchConfig", "vocab_size", self.vocab_size, VOCAB_SIZE)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ArchConfig.image_size ({self.image_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        return self.num_patches + 1  # patches + class token

    def tower(self, name: TowerName) -> TowerConfig:
        if name not in TOWER_NAMES:
            raise ValueError(f"unknown tower {name!r}; expected one of {TOWER_NAMES}")
        cfg: TowerConfig = getattr(self, name)
        return cfg

    def replace_tower(self, name: TowerName, cfg: TowerConfig) -> ArchConfig:
        self.tower(name)  # validates the name
        changes: dict[str, Any] = {name: cfg}
        return replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count, from the config alone (equals the built model's, checked by a test)."""
        i, t, s = self.image, self.text, self.shared
        image = (
            self.channels * self.patch_size**2 * i.width  # patch embedding (no bias)
            + i.width  # class token
            + self.image_tokens * i.width  # positional embedding
            + i.depth * _block_params(i)
            + i.width * s.width
            + s.width  # to_shared
        )
        text = (
            self.vocab_size * t.width  # token embedding
            + self.context_length * t.width  # positional embedding
            + t.depth * _block_params(t)
            + t.width * s.width
            + s.width  # to_shared
        )
        head = 2 * s.width + s.width * self.embed_dim + 1  # ln_post, proj (no bias), logit_scale
        return image + text + s.depth * _block_params(s) + head

    def flops_per_sample(self) -> int:
        """Forward FLOPs of one (image, text) pair: matmuls and attention, 2 FLOPs per multiply-add.

        A block over T tokens of width w with MLP hidden h costs 2·T·(3w² + w² + 2wh) for the qkv,
        output and MLP projections plus 4·T²·w for the attention scores and the weighted sum (the
        causal mask is not discounted). Image: 2·P·(C·p²)·w_img for the patch embedding (P patches),
        image blocks over T_img = P + 1 tokens, then 2·T_img·w_img·w_shared for to_shared and the
        shared blocks over T_img tokens. Text: text blocks over L = context_length tokens (padding
        included), 2·L·w_txt·w_shared, the shared blocks over L tokens. Head: 2·w_shared·embed_dim per
        modality on the pooled token. Embedding lookups, LayerNorm, GELU, softmax and the batch
        similarity matrix are not counted.
        """
        i, t, s = self.image, self.text, self.shared
        ti, tt = self.image_tokens, self.context_length
        image = (
            2 * self.num_patches * self.channels * self.patch_size**2 * i.width
            + i.depth * _block_flops(i, ti)
            + 2 * ti * i.width * s.width
            + s.depth * _block_flops(s, ti)
        )
        text = t.depth * _block_flops(t, tt) + 2 * tt * t.width * s.width + s.depth * _block_flops(s, tt)
        head = 2 * (2 * s.width * self.embed_dim)
        return image + text + head

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict; `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ArchConfig: unknown keys {unknown}")
        kwargs = dict(d)
        for name in TOWER_NAMES:
            if name not in kwargs:
                raise ValueError(f"ArchConfig.{name} is missing")
            tower = kwargs[name]
            if isinstance(tower, dict):
                tower_unknown = sorted(set(tower) - {f.name for f in fields(TowerConfig)})
                if tower_unknown:
                    raise ValueError(f"ArchConfig.{name}: unknown keys {tower_unknown}")
                kwargs[name] = TowerConfig(**tower)
        return cls(**kwargs)


def _block_params(c: TowerConfig) -> int:
    w, h = c.width, c.mlp_hidden
    # 2 LayerNorms (4w), qkv (3w² + 3w), out (w² + w), fc1 (wh + h), fc2 (hw + w)
    return 4 * w * w + 2 * w * h + 9 * w + h


def _block_flops(c: TowerConfig, tokens: int) -> int:
    w, h = c.width, c.mlp_hidden
    return 2 * tokens * (4 * w * w + 2 * w * h) + 4 * tokens * tokens * w


# ----------------------------------------------------------------------------- modules


class Attention(nn.Module):
    """Multi-head self-attention. qkv output is laid out [q | k | v], each split into heads in order."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C), heads side by side
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, causal: bool) -> torch.Tensor:
    for block in blocks:
        x = block(x, causal)
    return x


class Transformer(nn.Module):
    """A stack of blocks; the shared encoder (depth 0 is the identity)."""

    def __init__(self, cfg: TowerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        return _run_blocks(self.blocks, x, causal)


class ImageTower(nn.Module):
    """Patches -> tokens of the shared width: (B, C, S, S) -> (B, 1 + patches, shared width)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        w, p = arch.image.width, arch.patch_size
        self.patch_embed = nn.Conv2d(arch.channels, w, kernel_size=p, stride=p, bias=False)
        self.class_token = nn.Parameter(torch.randn(w) * w**-0.5)
        self.pos_embed = nn.Parameter(torch.randn(arch.image_tokens, w) * w**-0.5)
        self.blocks = nn.ModuleList(Block(arch.image) for _ in range(arch.image.depth))
        self.to_shared = nn.Linear(w, arch.shared.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, w, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (B, P, w)
        cls = self.class_token.expand(x.shape[0], 1, -1)  # (B, 1, w)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + P, w)
        return self.to_shared(_run_blocks(self.blocks, x, causal=False))  # (B, 1 + P, shared width)


class TextTower(nn.Module):
    """Token ids -> tokens of the shared width: (B, T) -> (B, T, shared width), causal."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        w = arch.text.width
        self.token_embed = nn.Embedding(arch.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(arch.context_length, w) * TEXT_POS_STD)
        self.blocks = nn.ModuleList(Block(arch.text) for _ in range(arch.text.depth))
        self.to_shared = nn.Linear(w, arch.shared.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]]  # (B, T, w)
        return self.to_shared(_run_blocks(self.blocks, x, causal=True))  # (B, T, shared width)


def init_weights(module: nn.Module, generator: torch.Generator | None = None, depth: int = 1) -> None:
    """The model's initialisation of linear/conv/embedding/LayerNorm layers (growth reuses it).

    Linear layers: N(0, 1/fan_in); the patch embedding: N(0, 1/(3 fan_in)) (PyTorch's default
    scale for a conv); the residual writes of each block (attention output, second MLP layer) are
    scaled down by sqrt(2 x depth) more, `depth` being the blocks in their stack, so the residual
    stream's scale does not grow with depth. Token embeddings N(0, INIT_STD); biases 0; norms 1.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            fan_in = m.weight[0].numel()
            std = fan_in_std(3 * fan_in) if isinstance(m, nn.Conv2d) else fan_in_std(fan_in)
            if name.endswith(("attn.out", "mlp.fc2")):
                std *= (2 * max(depth, 1)) ** -0.5
            nn.init.normal_(m.weight, std=std, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=INIT_STD, generator=generator)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def same_caption(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) token ids -> (B, B) bool: which pairs of rows are the same caption (equal token rows).

    Compared one token position at a time into one (B, B) mask, never as a (B, B, T) tensor
    (1.3 GB at B = 4096, T = 77); under torch.compile the loop fuses into one kernel.
    """
    same = torch.ones(tokens.shape[0], tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for column in tokens.unbind(dim=1):  # (B,) ids at one position
        same &= column[:, None] == column[None, :]
    return same


@dataclass(frozen=True)
class ClipOutput:
    image_embeds: torch.Tensor  # (B, embed_dim), L2-normalised
    text_embeds: torch.Tensor  # (B, embed_dim), L2-normalised
    logit_scale: torch.Tensor  # scalar, already exp()'d, <= MAX_LOGIT_SCALE
    # (B, B) bool: image i and text j match. Captions repeat in real streams (a class name in a few
    # templates), so every pair with an identical caption matches; None means the diagonal only.
    positives: torch.Tensor | None = None


class GrowCLIP(nn.Module):
    """The dual encoder. Build a new one to change shape (growth does); `arch` is never mutated."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.image = ImageTower(arch)
        self.text = TextTower(arch)
        self.shared = Transformer(arch.shared)
        self.ln_post = nn.LayerNorm(arch.shared.width)
        self.proj = nn.Linear(arch.shared.width, arch.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_weights(self)
        for tower in TOWER_NAMES:  # the blocks again, their residual writes scaled by their stack's depth
            for block in getattr(self, tower).blocks:
                init_weights(block, depth=arch.tower(tower).depth)

    def _head(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(self.ln_post(pooled)), dim=-1)  # (B, embed_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        a = self.arch
        if images.dim() != 4 or tuple(images.shape[1:]) != (a.channels, a.image_size, a.image_size):
            raise ValueError(
                f"images must be (B, {a.channels}, {a.image_size}, {a.image_size}), got {tuple(images.shape)}"
            )
        x = self.shared(self.image(images), causal=False)  # (B, 1 + P, shared width)
        return self._head(x[:, 0])  # class token

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.arch.context_length:
            raise ValueError(
                f"tokens must be (B, T) with T <= {self.arch.context_length}, got {tuple(tokens.shape)}"
            )
        x = self.shared(self.text(tokens), causal=True)  # (B, T, shared width)
        eos = (tokens == EOS_ID).int().argmax(dim=1)  # (B,) first EOS (0, i.e. BOS, if none)
        return self._head(x[torch.arange(x.shape[0], device=x.device), eos])

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> ClipOutput:
        return ClipOutput(
            image_embeds=self.encode_image(images),
            text_embeds=self.encode_text(tokens),
            # Clamped before exp, where the gradient at the cap still flows (the trainer also
            # clamps the parameter itself after every step, so it never sits above the cap).
            logit_scale=self.logit_scale.clamp(max=LOGIT_SCALE_CAP).exp(),
            positives=same_caption(tokens),
        )

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the temperature parameter within [0, log 100] (OpenCLIP clamps it after each step).

        Clamping only the exp() in the forward would leave a parameter pushed past the cap with a
        zero gradient for good; clamping the parameter keeps it where its gradient is alive.
        """
        self.logit_scale.clamp_(0.0, LOGIT_SCALE_CAP)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE with multi-positive targets.

    Each row (image -> texts) and each column (text -> images) of the similarity matrix is a
    softmax whose target spreads evenly over its positives (`ClipOutput.positives`: the pair itself
    and every pair with an identical caption). Captions repeat in real data (a batch of 128
    Fashion-MNIST captions holds ~80 identical pairs); one-hot targets make them negatives of each
    other, so the loss can never fall below ~0.7 nats there however right the model is. Identical
    token rows get identical text embeddings, so these targets give the same gradients as one-hot
    ones; what changes is the loss's meaning: it is the KL divergence from the targets, 0 when
    perfect, comparable across batches that repeat captions more or less often.
    """

    def forward(self, out: ClipOutput) -> torch.Tensor:
        return self.per_sample(out).mean()

    def per_sample(self, out: ClipOutput) -> torch.Tensor:
        """(B,) each pair's share of the loss (its image's row and its text's column); their mean is
        the loss. Paired comparisons of two models on the same samples use them (growth selection).

        Always in fp32, also inside a bf16 autocast region (the growth search runs in one): bf16
        logits would round the loss to ~0.01, coarser than the differences selection compares.
        """
        with torch.autocast(out.image_embeds.device.type, enabled=False):
            return self._per_sample(out)

    def _per_sample(self, out: ClipOutput) -> torch.Tensor:
        # Cross-entropy against targets t = positives / count is logsumexp(row) - sum(t * row), so
        # both directions need only the logits, one masked copy of them and reductions along either
        # dimension: no transposed copies, no float target matrices (each (B, B) is 64 MB at 4096).
        image, text = out.image_embeds.float(), out.text_embeds.float()
        logits = out.logit_scale.float() * image @ text.T  # (B, B) image x text
        if out.positives is None:
            diag = logits.diagonal()  # (B,) the pairs themselves
            return (logits.logsumexp(dim=1) - diag + logits.logsumexp(dim=0) - diag) / 2
        pos = out.positives  # (B, B) bool, the diagonal always set
        per_image, per_text = pos.sum(dim=1), pos.sum(dim=0)  # (B,) positives of each row / column
        on_pos = torch.where(pos, logits, 0.0)  # (B, B)
        image_to_text = logits.logsumexp(dim=1) - on_pos.sum(dim=1) / per_image  # (B,)
        text_to_image = logits.logsumexp(dim=0) - on_pos.sum(dim=0) / per_text  # (B,)
        # Minus the targets' entropy (log of the positives' count): the KL divergence, the same
        # gradients, and 0 for a perfect model however often captions repeat.
        return (image_to_text - per_image.log() + text_to_image - per_text.log()) / 2
