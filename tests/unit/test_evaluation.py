"""Evaluation: the metric math against plain numpy, the prompts, the suites' data sources, a model."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from growclip_stream.data.datasets import (
    CLASS_CAPTION_TEMPLATES,
    class_caption,
    load_items,
    load_labelled,
)
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.records import Record, RecordLimits
from growclip_stream.data.shards import write_parquet_shards
from growclip_stream.evaluation import (
    PROMPT_TEMPLATES,
    EvalSet,
    SuiteConfig,
    caption_relation,
    class_prompts,
    decode_suite,
    embed_images,
    embed_texts,
    evaluate,
    load_eval_set,
    read_suite,
    recall_at_k,
    retrieval_recall,
    top1_accuracy,
    zero_shot_top1,
)
from growclip_stream.model import ArchConfig, GrowCLIP, TowerConfig
from tests.helpers import random_model

ARCH = ArchConfig(
    image=TowerConfig(16, 1, 32, head_dim=8),
    text=TowerConfig(16, 1, 32, head_dim=8),
    shared=TowerConfig(16, 0, 32, head_dim=8),
    embed_dim=8,
)

# --- plain numpy, written from the definitions in the evaluation module's docstring ------------


def numpy_top1(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    """Correct when the label's score is the unique maximum of the row (a tie is a miss)."""
    hits = 0
    for scores, label in zip(image_emb @ class_emb.T, labels, strict=True):
        best = scores.max()
        hits += int(scores[label] == best and np.count_nonzero(scores == best) == 1)
    return hits / len(labels)


def numpy_recall(
    image_emb: np.ndarray, captions: list[str], text_emb_of: dict[str, np.ndarray], ks: tuple[int, ...]
) -> dict[str, dict[int, float]]:
    """Rank every candidate list by score with ties ordered wrong-before-right (stable sort on
    (-score, is_right)); a query hits at k when a right candidate is among the first k."""
    texts = sorted(set(captions))  # any order of the distinct texts: the metric must not depend on it
    text_emb = np.stack([text_emb_of[t] for t in texts])
    scores = image_emb @ text_emb.T  # (N, T)

    def first_right(row: np.ndarray, right: np.ndarray) -> int:
        order = np.lexsort((right.astype(int), -row))  # by score descending, wrong ones first in a tie
        return int(np.flatnonzero(right[order])[0])

    i2t = [first_right(scores[i], np.array([t == captions[i] for t in texts])) for i in range(len(captions))]
    t2i = [first_right(scores[:, j], np.array([c == t for c in captions])) for j, t in enumerate(texts)]
    return {
        "image_to_text": {k: float(np.mean([r < k for r in i2t])) for k in ks},
        "text_to_image": {k: float(np.mean([r < k for r in t2i])) for k in ks},
    }


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_top1_matches_numpy_on_fixed_embeddings_with_ties() -> None:
    rng = np.random.default_rng(0)
    images = unit(rng.standard_normal((200, 6))).astype(np.float32)
    classes = unit(rng.standard_normal((7, 6))).astype(np.float32)
    classes[5] = classes[2]  # two classes with one embedding: images labelled 2 or 5 can never be right
    images[:20] = classes[rng.integers(0, 7, 20)]  # some images exactly on a class
    labels = rng.integers(0, 7, 200)
    ours = top1_accuracy(torch.from_numpy(images @ classes.T), torch.from_numpy(labels))
    assert ours == pytest.approx(numpy_top1(images, classes, labels), abs=1e-12)
    assert 0 < ours < 1
    # the tie rule matters here: counting a tie as a hit would give a different number
    optimistic = np.mean(
        [(images[i] @ classes.T)[labels[i]] >= (images[i] @ classes.T).max() for i in range(200)]
    )
    assert optimistic > ours


def test_top1_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.2, 0.1], [0.0, 0.3, 0.8], [0.5, 0.4, 0.6]])
    labels = torch.tensor([0, 1, 2, 0])  # right, tie (a miss), right, wrong
    assert top1_accuracy(scores, labels) == 0.5


def test_recall_matches_numpy_with_duplicate_captions_and_ties() -> None:
    rng = np.random.default_rng(1)
    vocabulary = [f"caption {i}" for i in range(40)]
    captions = [vocabulary[i] for i in rng.integers(0, 40, 120)]  # many images share a caption
    text_emb_of = {t: v for t, v in zip(vocabulary, unit(rng.standard_normal((40, 5))), strict=True)}
    images = unit(rng.standard_normal((120, 5)))
    images[:30] = np.stack([text_emb_of[c] for c in captions[:30]])  # some on their caption exactly
    images[30:40] = images[40:50]  # duplicate images: ties in the text -> image direction
    ks = (1, 3, 5, 10)
    texts, positive = caption_relation(captions)
    ours = retrieval_recall(
        torch.from_numpy(images), torch.from_numpy(np.stack([text_emb_of[t] for t in texts])), positive, ks
    )
    expected = numpy_recall(images, captions, text_emb_of, ks)
    for direction in ("image_to_text", "text_to_image"):
        for k in ks:
            assert ours[direction][k] == pytest.approx(expected[direction][k], abs=1e-12), (direction, k)
    assert 0 < ours["image_to_text"][1] < ours["image_to_text"][10] < 1


def test_recall_by_hand_duplicate_caption_is_a_hit() -> None:
    # three images; the first and the third are described alike
    captions = ["a red circle", "a blue square", "a red circle"]
    texts, positive = caption_relation(captions)
    assert texts == ("a red circle", "a blue square")  # each distinct caption once
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    recall = retrieval_recall(image_emb, text_emb, positive, (1, 2))
    # image 3 is nearer "a blue square" (0.8) than its caption (0.6): a miss at 1, a hit at 2
    assert recall["image_to_text"] == {1: 2 / 3, 2: 1.0}
    # "a red circle" retrieves image 1 first, which carries that caption (image 3 need not come first)
    assert recall["text_to_image"] == {1: 1.0, 2: 1.0}


def test_recall_ties_count_against_and_a_collapsed_model_scores_zero() -> None:
    scores = torch.zeros((4, 4))
    positive = torch.eye(4, dtype=torch.bool)
    assert recall_at_k(scores, positive, (1, 3)) == {1: 0.0, 3: 0.0}  # every candidate ties
    assert recall_at_k(scores, positive, (4,)) == {4: 1.0}  # 3 wrong candidates tie: rank 3 < 4


# --- prompts ----------------------------------------------------------------------------------


def test_prompts_take_the_article_the_training_captions_use() -> None:
    prompts = class_prompts(["ankle boot", "bag"], PROMPT_TEMPLATES)
    assert "a photo of an ankle boot" in prompts and "a photo of a bag" in prompts
    assert not any("a ankle" in p or "an bag" in p for p in prompts)
    captions = {class_caption("ankle boot", random.Random(seed)) for seed in range(200)}
    assert "a photo of an ankle boot" in captions  # the same words the model was trained on
    assert not any("a ankle" in c for c in captions)
    # every training template works as a prompt template too (same placeholders)
    assert len(class_prompts(["ankle boot"], CLASS_CAPTION_TEMPLATES)) == len(CLASS_CAPTION_TEMPLATES)


# --- data sources -----------------------------------------------------------------------------


def test_eval_set_is_the_test_split_through_the_serving_transform() -> None:
    data = load_eval_set("fashion-mnist", ARCH, limit=40)
    images, labels, names = load_labelled("fashion-mnist", "test")
    chosen = [i * len(images) // 40 for i in range(40)]  # evenly spread over the split
    assert data.images.shape == (40, ARCH.channels, ARCH.image_size, ARCH.image_size)
    assert data.labels is not None and data.labels.tolist() == [labels[i] for i in chosen]
    assert data.class_names == names and len(names) == 10
    transform = ImageTransform(ARCH.image_size, ARCH.channels)
    for j in (0, 17, 39):  # the same pixels the serving path computes for these bytes
        assert torch.equal(data.images[j], transform.from_bytes(images[chosen[j]], RecordLimits()))


def test_dataset_retrieval_suite_has_the_real_descriptions() -> None:
    items = read_suite(SuiteConfig(task="retrieval", dataset="tuxpaint", limit=30))
    reference = load_items("tuxpaint", "test", 30)
    assert list(items.captions) == reference.captions and len(items.images) == 30
    assert all(c and not c.startswith("tuxpaint") for c in items.captions)
    data = decode_suite(items, 28, 1, RecordLimits())  # colour stamps to the demo's 28x28 grey input
    assert data.images.shape == (30, 1, 28, 28) and data.skipped == 0


def png(value: int, size: tuple[int, int] = (20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_of_class_subfolders(tmp_path: Path) -> None:
    for cls, n in (("ankle_boot", 3), ("bag", 2), ("coat", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.png").write_bytes(png(40 * i + len(cls)))
    (tmp_path / "bag" / "notes.txt").write_text("not an image")
    (tmp_path / "coat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    items = read_suite(SuiteConfig(task="zeroshot", folder=str(tmp_path)))
    assert items.class_names == ("ankle boot", "bag", "coat")
    assert sorted(items.labels or ()) == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]  # broken.png is read, not yet decoded
    data = decode_suite(items, 8, 3, RecordLimits())
    assert data.skipped == 1 and len(data.images) == 9 and data.labels is not None
    assert sorted(data.labels.tolist()) == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    # a limit keeps every class
    few = read_suite(SuiteConfig(task="zeroshot", folder=str(tmp_path), limit=3))
    assert sorted(few.labels or ()) == [0, 1, 2]


def test_folder_of_captioned_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "cat.png").write_bytes(png(10))
    (tmp_path / "cat.txt").write_text("a cat\non a mat\n")
    (tmp_path / "sub" / "dog.png").write_bytes(png(90))
    (tmp_path / "sub" / "dog.txt").write_text("a dog")
    (tmp_path / "nocaption.png").write_bytes(png(200))
    items = read_suite(SuiteConfig(task="retrieval", folder=str(tmp_path)))
    assert items.captions == ("a cat on a mat", "a dog") and items.images[1] == png(90)


def test_shards_as_a_retrieval_suite(tmp_path: Path) -> None:
    records = [Record(id=f"r{i}", caption=f"shape number {i}", image=png(20 * i)) for i in range(7)]
    write_parquet_shards(records, str(tmp_path / "shards"), per_shard=3)
    items = read_suite(SuiteConfig(task="retrieval", shards=str(tmp_path / "shards"), limit=5))
    assert items.captions == tuple(f"shape number {i}" for i in range(5))
    assert items.images == tuple(png(20 * i) for i in range(5))


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        read_suite(SuiteConfig(task="retrieval", folder=str(tmp_path / "nowhere")))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "zeroshot"}, "exactly one"),
        ({"task": "zeroshot", "dataset": "emoji", "folder": "/x"}, "exactly one"),
        ({"task": "zeroshot", "shards": "/x"}, "retrieval"),
        ({"task": "zeroshot", "dataset": "mnist"}, "unknown dataset"),
        ({"task": "zeroshot", "dataset": "emoji", "templates": ("a photo",)}, "templates"),
        ({"task": "retrieval", "dataset": "emoji", "ks": (0,)}, "ks"),
        ({"task": "retrieval", "dataset": "emoji", "limit": 0}, "limit"),
    ],
)
def test_suite_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SuiteConfig(**kwargs)


# --- on a model -------------------------------------------------------------------------------


def test_zero_shot_top1_counts_each_image_for_exactly_one_class() -> None:
    data = load_eval_set("fashion-mnist", ARCH, limit=60)
    assert data.labels is not None
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


def test_evaluate_on_a_model_is_the_metric_of_its_embeddings() -> None:
    model = random_model(ARCH, seed=5).eval()
    cfg = SuiteConfig(task="retrieval", dataset="emoji", limit=40, ks=(1, 5))
    data = decode_suite(read_suite(cfg), ARCH.image_size, ARCH.channels, RecordLimits())
    result = evaluate(model, cfg, data, batch_size=16)  # batches must not change the numbers
    texts, positive = caption_relation(data.captions)
    images, text = embed_images(model, data.images), embed_texts(model, texts)
    assert result.recall == retrieval_recall(images, text, positive, (1, 5))
    assert result.samples == 40 and result.candidates == len(texts) and result.top1 is None
    assert result.to_dict()["recall"]["image_to_text"].keys() == {"1", "5"}

    zs = SuiteConfig(task="zeroshot", dataset="fashion-mnist", limit=50)
    zdata = decode_suite(read_suite(zs), ARCH.image_size, ARCH.channels, RecordLimits())
    class_emb = F.normalize(
        embed_texts(model, class_prompts(zdata.class_names, PROMPT_TEMPLATES)).view(10, 4, -1).mean(1), dim=-1
    )
    assert zdata.labels is not None
    assert evaluate(model, zs, zdata).top1 == top1_accuracy(
        embed_images(model, zdata.images) @ class_emb.T, zdata.labels
    )
