"""Zero-shot evaluation on the reserved test split."""

from __future__ import annotations

import torch

from growclip_stream.data.datasets import load_labelled
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.records import RecordLimits
from growclip_stream.evaluation import EvalSet, load_eval_set, zero_shot_top1
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig
from tests.helpers import random_model

ARCH = ArchConfig(
    image=TowerConfig(16, 1, 32, head_dim=8),
    text=TowerConfig(16, 1, 32, head_dim=8),
    shared=TowerConfig(16, 0, 32, head_dim=8),
    embed_dim=8,
)


def test_eval_set_is_the_test_split_through_the_serving_transform() -> None:
    data = load_eval_set("fashion-mnist", ARCH, limit=40)
    images, labels, names = load_labelled("fashion-mnist", "test")
    assert data.images.shape == (40, ARCH.channels, ARCH.image_size, ARCH.image_size)
    assert data.images.dtype == torch.float32 and data.labels.tolist() == labels[:40]
    assert data.class_names == names and len(names) == 10
    transform = ImageTransform(ARCH.image_size, ARCH.channels)
    for i in (0, 17, 39):  # the same pixels the serving path computes for these bytes
        assert torch.equal(data.images[i], transform.from_bytes(images[i], RecordLimits()))


def test_zero_shot_top1_counts_each_image_for_exactly_one_class() -> None:
    data = load_eval_set("fashion-mnist", ARCH, limit=60)
    model: GrowCLIP = random_model(ARCH, seed=3)
    model.train()
    # labelling every image with class k scores the share predicted as k: the shares sum to one
    shares = [
        zero_shot_top1(model, EvalSet(data.images, torch.full_like(data.labels, k), data.class_names))
        for k in range(len(data.class_names))
    ]
    assert abs(sum(shares) - 1.0) < 1e-6 and all(0.0 <= s <= 1.0 for s in shares)
    assert 0.0 <= zero_shot_top1(model, data) <= 1.0
    assert model.training  # the mode it was in comes back
