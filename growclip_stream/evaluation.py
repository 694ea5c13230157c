"""Evaluation on data the stream never carries: zero-shot classification.

The evaluation set comes from the reserved test split of a labelled dataset (for Fashion-MNIST, the
10,000 test images; the producer streams the train split only). Zero-shot top-1 classifies each
image by its nearest class prompt, prompts averaged over a few templates as in CLIP's evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from growclip_stream.data.datasets import load_labelled
from growclip_stream.data.images import ImageTransform, normalize_batch
from growclip_stream.data.records import RecordLimits
from growclip_stream.model import ArchConfig, GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer

PROMPT_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {}")


@dataclass(frozen=True)
class EvalSet:
    """Decoded, transformed evaluation data, ready for any model of the same input geometry."""

    images: torch.Tensor  # (N, C, H, W) float32
    labels: torch.Tensor  # (N,) int64
    class_names: tuple[str, ...]


def load_eval_set(name: str, arch: ArchConfig, limit: int = 2000) -> EvalSet:
    """The first `limit` images of the dataset's reserved test split, with their labels."""
    transform = ImageTransform(arch.image_size, arch.channels)
    limits = RecordLimits()
    images, labels, class_names = load_labelled(name, "test")
    return EvalSet(
        images=normalize_batch([transform.pixels(b, limits) for b in images[:limit]]),
        labels=torch.tensor(labels[:limit], dtype=torch.long),
        class_names=tuple(class_names),
    )


@torch.inference_mode()
def embed_images(model: GrowCLIP, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return torch.cat(
        [model.encode_image(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


@torch.inference_mode()
def embed_texts(model: GrowCLIP, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    tok = ByteTokenizer(model.arch.context_length)
    return torch.cat(
        [model.encode_text(tok.encode(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
    )


@torch.inference_mode()
def zero_shot_top1(model: GrowCLIP, data: EvalSet, templates: Sequence[str] = PROMPT_TEMPLATES) -> float:
    """Share of images whose nearest class prompt (template-averaged) is their label."""
    was_training = model.training
    model.eval()
    prompts = [t.format(c) for c in data.class_names for t in templates]
    text = embed_texts(model, prompts).view(len(data.class_names), len(templates), -1).mean(dim=1)
    text = F.normalize(text, dim=-1)  # (classes, D)
    pred = (embed_images(model, data.images) @ text.T).argmax(dim=-1)
    model.train(was_training)
    return float((pred == data.labels).float().mean())
