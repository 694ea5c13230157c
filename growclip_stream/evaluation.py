"""Evaluation on data the stream never carries: zero-shot classification and image-text retrieval.

A *suite* is one evaluation set and its task (:class:`SuiteConfig`):

- ``zeroshot``: class-labelled images. Each image is classified by its nearest class embedding,
  the average of the class name's prompt embeddings over a few templates (a prompt ensemble, as in
  CLIP's evaluation); the metric is top-1 accuracy.
- ``retrieval``: images with their captions. Recall@k in both directions: image -> text (is the
  image's caption among the k texts nearest to it) and text -> image (is an image with this caption
  among the k images nearest to it).

Where the data comes from: a built-in dataset's reserved test split (:mod:`datasets`; the
producer streams the train split only), a folder on any fsspec URL (``zeroshot``: one subfolder per
class, named after it; ``retrieval``: images with a ``.txt`` caption of the same name beside them),
or image-text shards (``retrieval`` only, through :class:`ShardSource`: parquet or webdataset tar).
At most ``limit`` items are used, evenly spread over the source's order (shards: the first ones).

Metric definitions, decided here and relied on by the tests:

- Ties count against the model: an image is classified correctly only when its class scores
  strictly higher than every other class, and a retrieval query's rank is the number of wrong
  candidates scoring at least as high as its best right one; recall@k is the share of queries with
  rank < k. A model that maps everything to one point therefore scores 0, not 1.
- In retrieval, a right answer is any item whose caption *text* equals the query's caption: two
  images with the same description are interchangeable. Texts are deduplicated first: the
  image -> text gallery holds each distinct caption once, and each distinct caption is one
  text -> image query (whose right answers are all images carrying it).

All embeddings are computed in eval mode under ``torch.inference_mode()``; a model passed in
training mode is put back in training mode afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import torch
import torch.nn.functional as F

from growclip_stream.data.datasets import DATASETS, evenly_spaced, fill_template, load_items
from growclip_stream.data.images import ImageTransform, normalize_batch
from growclip_stream.data.records import RecordError, RecordLimits
from growclip_stream.model import ArchConfig, GrowCLIP
from growclip_stream.model.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

Task = Literal["zeroshot", "retrieval"]

PROMPT_TEMPLATES: tuple[str, ...] = ("a photo of {a}", "a picture of {a}", "an image of {a}", "{a}")
"""Zero-shot prompt ensemble; ``{a}`` is the class name with its article, ``{c}`` the bare name
(:func:`datasets.fill_template`, the same function the training captions are made with)."""

RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
DIRECTIONS: tuple[str, ...] = ("image_to_text", "text_to_image")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")


class EvalDataError(ValueError):
    """A suite whose data cannot be used: missing, empty, or without what its task needs."""


@dataclass(frozen=True)
class SuiteConfig:
    """One evaluation suite: its task, exactly one data source, and how much of it to use."""

    task: Task
    dataset: str | None = None  # a built-in dataset (its test split): fashion-mnist, tuxpaint, emoji, ...
    folder: str | None = None  # fsspec URL or path: class subfolders (zeroshot), image + .txt (retrieval)
    shards: str | None = None  # parquet/tar shards (a shard, folder or glob on any fsspec URL); retrieval
    limit: int = 1000  # at most this many images
    templates: tuple[str, ...] = PROMPT_TEMPLATES  # zeroshot prompts, with {a} and/or {c}
    ks: tuple[int, ...] = RETRIEVAL_KS  # retrieval recall@k
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options of folder/shards
    enabled: bool = True  # run by the daemon (a disabled suite can still be named to `eval --suite`)

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the daemon's config validation

    def __post_init__(self) -> None:
        sources = [s for s in (self.dataset, self.folder, self.shards) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of dataset, folder and shards")
        if self.dataset and self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.shards and self.task == "zeroshot":
            raise ValueError("shards carry captions, not class labels: use them with task retrieval")
        if self.limit < 1:
            raise ValueError("limit must be >= 1")
        if not self.templates or any("{a}" not in t and "{c}" not in t for t in self.templates):
            raise ValueError("templates must be non-empty and each must hold {a} or {c}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("ks must be non-empty and each >= 1")

    @property
    def source(self) -> str:
        """Where the data comes from, for logs and status."""
        if self.dataset:
            return f"dataset:{self.dataset}"
        return f"folder:{self.folder}" if self.folder else f"shards:{self.shards}"


DEFAULT_SUITES: dict[str, SuiteConfig] = {
    "fashion-mnist": SuiteConfig(task="zeroshot", dataset="fashion-mnist", limit=1000),
    "tuxpaint": SuiteConfig(task="retrieval", dataset="tuxpaint", limit=1000),
    "emoji": SuiteConfig(task="retrieval", dataset="emoji", limit=1000),
}
"""The daemon's suites unless configured otherwise: Fashion-MNIST's 10,000 reserved test images
(1,000 of them), and the test splits of the Tux Paint stamps (76) and Twitter emoji (179) with their
human-written descriptions and names."""


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class SuiteItems:
    """A suite's data as read from its source: encoded images, not yet decoded for a model."""

    images: tuple[bytes, ...]
    captions: tuple[str, ...]  # one per image (retrieval)
    labels: tuple[int, ...] | None  # one per image (zeroshot)
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class EvalSet:
    """Decoded, transformed evaluation data, ready for any model of the same input geometry."""

    images: torch.Tensor  # (N, C, H, W) float32, as the serving path computes them
    labels: torch.Tensor | None  # (N,) int64 class index (zeroshot)
    class_names: tuple[str, ...]
    captions: tuple[str, ...] = ()  # one per image (retrieval)
    skipped: int = 0  # images that could not be decoded (left out, counted)


def read_suite(cfg: SuiteConfig) -> SuiteItems:
    """The suite's items from its source. Raises :class:`EvalDataError` (or FileNotFoundError for a
    built-in dataset that is not installed) when there is nothing usable."""
    if cfg.dataset:
        items = load_items(cfg.dataset, "test", cfg.limit)
        if cfg.task == "zeroshot" and items.labels is None:
            raise EvalDataError(f"dataset {cfg.dataset!r} has no class labels")
        out = SuiteItems(
            tuple(items.images),
            tuple(items.captions),
            None if items.labels is None else tuple(items.labels),
            items.classes,
        )
    elif cfg.folder:
        out = _read_class_folders(cfg) if cfg.task == "zeroshot" else _read_captioned_folder(cfg)
    else:
        out = _read_shards(cfg)
    if not out.images:
        raise EvalDataError(f"no images found at {cfg.source}")
    return out


def _read_class_folders(cfg: SuiteConfig) -> SuiteItems:
    """``<folder>/<class name>/<image>``: classes are the subfolders, sorted; ``_`` reads as a space."""
    fs, root = fsspec.core.url_to_fs(cfg.folder, **cfg.storage_options)
    if not fs.isdir(root):
        raise EvalDataError(f"folder {cfg.folder} not found")
    subfolders = sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory")
    found: list[tuple[str, int]] = []
    for label, sub in enumerate(subfolders):
        found += [(path, label) for path in sorted(fs.find(sub)) if path.lower().endswith(IMAGE_SUFFIXES)]
    chosen = [found[i] for i in evenly_spaced(len(found), cfg.limit)]
    names = tuple(sub.rstrip("/").rsplit("/", 1)[-1].replace("_", " ") for sub in subfolders)
    images = tuple(fs.cat_file(path) for path, _ in chosen)
    return SuiteItems(images, (), tuple(label for _, label in chosen), names)


def _read_captioned_folder(cfg: SuiteConfig) -> SuiteItems:
    """Every image under the folder with a caption file beside it (``cat.png`` + ``cat.txt``)."""
    fs, root = fsspec.core.url_to_fs(cfg.folder, **cfg.storage_options)
    if not fs.isdir(root):
        raise EvalDataError(f"folder {cfg.folder} not found")
    files = set(fs.find(root))
    pairs = sorted(
        (path, stem + ".txt")
        for path in files
        if path.lower().endswith(IMAGE_SUFFIXES) and (stem := path.rsplit(".", 1)[0]) + ".txt" in files
    )
    chosen = [pairs[i] for i in evenly_spaced(len(pairs), cfg.limit)]
    captions = tuple(
        " ".join(fs.cat_file(txt).decode("utf-8", errors="replace").split()) for _, txt in chosen
    )
    kept = [(path, caption) for (path, _), caption in zip(chosen, captions, strict=True) if caption]
    return SuiteItems(tuple(fs.cat_file(p) for p, _ in kept), tuple(c for _, c in kept), None, ())


def _read_shards(cfg: SuiteConfig) -> SuiteItems:
    """The first ``limit`` usable rows of the shards (the reader that feeds training from shards)."""
    from growclip_stream.data.shards import ShardSource, iter_shard_records

    assert cfg.shards is not None  # SuiteConfig guarantees one source
    images: list[bytes] = []
    captions: list[str] = []
    with ShardSource(cfg.shards, storage_options=cfg.storage_options, count_rows=False) as source:
        for record in iter_shard_records(source):
            images.append(record.image)
            captions.append(record.caption)
            if len(images) >= cfg.limit:
                break
    return SuiteItems(tuple(images), tuple(captions), None, ())


def decode_suite(items: SuiteItems, image_size: int, channels: int, limits: RecordLimits) -> EvalSet:
    """Decode and transform every image exactly as serving does; undecodable ones are left out and
    counted in ``skipped``."""
    transform = ImageTransform(image_size, channels)
    pixels, keep = [], []
    for i, data in enumerate(items.images):
        try:
            pixels.append(transform.pixels(data, limits))
            keep.append(i)
        except RecordError as err:
            log.warning("evaluation image left out", extra={"index": i, "reason": err.reason})
    if not pixels:
        raise EvalDataError("none of the suite's images could be decoded")
    return EvalSet(
        images=normalize_batch(pixels),
        labels=None if items.labels is None else torch.tensor([items.labels[i] for i in keep]),
        class_names=items.class_names,
        captions=tuple(items.captions[i] for i in keep) if items.captions else (),
        skipped=len(items.images) - len(keep),
    )


def load_eval_set(name: str, arch: ArchConfig, limit: int = 2000) -> EvalSet:
    """``limit`` images of a built-in dataset's reserved test split, for the model geometry of ``arch``."""
    items = read_suite(SuiteConfig(task="zeroshot", dataset=name, limit=limit))
    return decode_suite(items, arch.image_size, arch.channels, RecordLimits())


# ---------------------------------------------------------------------------------------------
# metrics on embeddings (no model involved: the tests check them against plain numpy)


def top1_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose label column scores strictly higher than every other column.

    ``scores``: (N, C) image-class similarities; ``labels``: (N,) class indices.
    """
    true = scores.gather(1, labels[:, None])  # (N, 1)
    others = scores.masked_fill(F.one_hot(labels, scores.shape[1]).bool(), -torch.inf)  # (N, C)
    return int((true[:, 0] > others.max(dim=1).values).sum()) / len(labels)


def recall_at_k(scores: torch.Tensor, positive: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Share of queries whose best right candidate ranks within the first k, for each k.

    ``scores``: (Q, G) query-candidate similarities; ``positive``: (Q, G) bool, the right
    candidates (every query has one). A query's rank is the number of wrong candidates scoring at
    least as high as its best right one (ties count against it).
    """
    best = scores.masked_fill(~positive, -torch.inf).max(dim=1).values  # (Q,)
    rank = ((scores >= best[:, None]) & ~positive).sum(dim=1)  # (Q,)
    return {k: int((rank < k).sum()) / len(rank) for k in ks}


def caption_relation(captions: Sequence[str]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The distinct captions (first-seen order) and the (N images, T texts) bool matrix of which
    image carries which caption."""
    texts = tuple(dict.fromkeys(captions))
    index = {text: j for j, text in enumerate(texts)}
    positive = torch.zeros((len(captions), len(texts)), dtype=torch.bool)
    positive[torch.arange(len(captions)), torch.tensor([index[c] for c in captions])] = True
    return texts, positive


def retrieval_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, positive: torch.Tensor, ks: Sequence[int]
) -> dict[str, dict[int, float]]:
    """Recall@k both ways from (N, D) image and (T, D) distinct-text embeddings and their (N, T)
    relation (:func:`caption_relation`)."""
    scores = image_emb @ text_emb.T  # (N, T)
    return {
        "image_to_text": recall_at_k(scores, positive, ks),
        "text_to_image": recall_at_k(scores.T, positive.T, ks),
    }


# ---------------------------------------------------------------------------------------------
# running a model


@dataclass(frozen=True)
class SuiteResult:
    """One suite's metrics for one model."""

    task: Task
    samples: int  # images evaluated
    candidates: int  # classes (zeroshot) or distinct captions (retrieval)
    skipped: int  # images left out because they could not be decoded
    seconds: float
    top1: float | None = None  # zeroshot
    recall: Mapping[str, Mapping[int, float]] = field(default_factory=dict)  # direction -> k -> recall

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "samples": self.samples,
            "candidates": self.candidates,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }
        if self.top1 is not None:
            out["top1"] = self.top1
        if self.recall:
            out["recall"] = {d: {str(k): v for k, v in by_k.items()} for d, by_k in self.recall.items()}
        return out


@torch.inference_mode()
def embed_images(model: GrowCLIP, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, D) L2-normalised float32 image embeddings on the CPU, in batches (the model may be on
    a GPU and in bf16, as a serving snapshot there is)."""
    weight = model.proj.weight
    return torch.cat(
        [
            model.encode_image(images[i : i + batch_size].to(weight.device, weight.dtype)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    )


@torch.inference_mode()
def embed_texts(model: GrowCLIP, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N, D) L2-normalised float32 text embeddings on the CPU, in batches."""
    tok = ByteTokenizer(model.arch.context_length)
    device = model.proj.weight.device
    return torch.cat(
        [
            model.encode_text(tok.encode(list(texts[i : i + batch_size])).to(device)).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
    )


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class's prompts, class by class: ``"a photo of an ankle boot"``, ..."""
    return [fill_template(t, c) for c in class_names for t in templates]


@torch.inference_mode()
def class_embeddings(
    model: GrowCLIP, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """(C, D) class embeddings: each class's prompt embeddings averaged, then L2-normalised."""
    text = embed_texts(model, class_prompts(class_names, templates), batch_size)
    text = text.view(len(class_names), len(templates), -1)  # (C, templates, D)
    return F.normalize(text.mean(dim=1), dim=-1)


def zero_shot_top1(
    model: GrowCLIP, data: EvalSet, templates: Sequence[str] = PROMPT_TEMPLATES, batch_size: int = 256
) -> float:
    """Share of images whose nearest class (prompt ensemble) is their label."""
    if data.labels is None:
        raise EvalDataError("zero-shot classification needs class labels")
    with _eval_mode(model):
        text = class_embeddings(model, data.class_names, templates, batch_size)
        return top1_accuracy(embed_images(model, data.images, batch_size) @ text.T, data.labels)


def evaluate(model: GrowCLIP, cfg: SuiteConfig, data: EvalSet, batch_size: int = 256) -> SuiteResult:
    """The suite's metrics for ``model`` (its task decides which)."""
    start = time.perf_counter()
    if cfg.task == "zeroshot":
        top1 = zero_shot_top1(model, data, cfg.templates, batch_size)
        return SuiteResult(
            "zeroshot",
            len(data.images),
            len(data.class_names),
            data.skipped,
            time.perf_counter() - start,
            top1,
        )
    if not data.captions:
        raise EvalDataError("retrieval needs a caption per image")
    texts, positive = caption_relation(data.captions)
    with _eval_mode(model):
        recall = retrieval_recall(
            embed_images(model, data.images, batch_size),
            embed_texts(model, texts, batch_size),
            positive,
            cfg.ks,
        )
    return SuiteResult(
        "retrieval", len(data.images), len(texts), data.skipped, time.perf_counter() - start, recall=recall
    )


class _eval_mode:
    """Eval mode for the duration, then the mode the model was in."""

    def __init__(self, model: GrowCLIP) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        if self.was_training:
            self.model.eval()

    def __exit__(self, *exc: object) -> None:
        if self.was_training:
            self.model.train()
