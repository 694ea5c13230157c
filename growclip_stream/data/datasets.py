"""Real image-text datasets, read offline from Debian's dataset packages, as record iterators.

Each dataset is one loader function ``(root, split) -> _Split`` registered in ``_LOADERS``; everything
else (ordering, ids, repetition, captions, labelled access) is shared. Adding a dataset is adding
its loader.

Fashion-MNIST (Debian ``dataset-fashion-mnist``): 60,000 train and 10,000 test 28x28 grayscale
images in 10 classes. Images are PNG-encoded on the fly; captions are drawn (seeded) from
templates around the class name. Only ``split="train"`` is streamed for training; ``"test"`` is
reserved for evaluation.
"""

from __future__ import annotations

import gzip
import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from growclip_stream.data.records import REPEAT_SEPARATOR, Record

Split = Literal["train", "test"]
STREAM_SPLIT: Split = "train"  # the split the producer streams; the other is for evaluation only

DEFAULT_DATASETS_DIR = "/usr/share/datasets"
DATASETS_DIR_ENV = "GROWCLIP_DATASETS_DIR"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# Caption templates for class-labelled datasets; "{a}" is the class name with its article.
CLASS_CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a}",
    "a product photo of {a}",
    "a black and white picture of {a}",
    "a grey {c} on a black background",
    "a small grayscale image of {a}",
    "a low resolution photo of {a}",
    "a catalogue picture of {a}",
    "{a}, seen from the front",
    "a fashion item: {a}",
    "a thumbnail of {a}",
)


@dataclass(frozen=True)
class _Split:
    """One split of one dataset, with random access to its items."""

    id_prefix: str  # record ids are f"{id_prefix}-{index:06d}"
    size: int
    encoded_image: Callable[[int], bytes]  # index -> PNG/JPEG/WebP bytes
    caption: Callable[[int, random.Random], str]  # index, seeded rng -> caption
    labels: Sequence[int] | None  # class index per item, for datasets with classes
    classes: tuple[str, ...]


def dataset_root() -> Path:
    """Where Debian's dataset packages live; the environment variable overrides it."""
    return Path(os.environ.get(DATASETS_DIR_ENV) or DEFAULT_DATASETS_DIR)


def iter_records(
    name: str, split: Split = STREAM_SPLIT, seed: int = 0, repeat: bool = False
) -> Iterator[Record]:
    """The dataset's records in a seeded random order, once or (``repeat=True``) forever.

    Ids are ``"<prefix>-<index>"`` in the first pass and ``"<prefix>-<index>#e<epoch>"`` in later
    passes, so they stay unique and :func:`records.is_held_out` treats every pass alike. Each pass
    has its own order and caption draws; the same (seed, epoch) always gives the same records.
    A missing dataset raises here, not at the first ``next()``.
    """
    return _iterate(name, split, _load(name, split), seed, repeat)


def _iterate(name: str, split: Split, data: _Split, seed: int, repeat: bool) -> Iterator[Record]:
    epoch = 0
    while True:
        rng = random.Random(f"{name}:{split}:{seed}:{epoch}")
        suffix = f"{REPEAT_SEPARATOR}e{epoch}" if epoch else ""
        for index in epoch_order(data.size, rng):
            yield Record(
                id=f"{data.id_prefix}-{index:06d}{suffix}",
                caption=data.caption(index, rng),
                image=data.encoded_image(index),
            )
        if not repeat:
            return
        epoch += 1


def epoch_order(size: int, rng: random.Random) -> list[int]:
    """A seeded permutation of ``range(size)``."""
    order = list(range(size))
    rng.shuffle(order)
    return order


def dataset_size(name: str, split: Split = STREAM_SPLIT) -> int:
    """Number of records in one pass over a split (from file headers; cheap)."""
    return _load(name, split).size


def load_labelled(name: str, split: str) -> tuple[list[bytes], list[int], tuple[str, ...]]:
    """Encoded images, class labels and class names of a split, in file order (zero-shot evaluation)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = _load(name, split)  # type: ignore[arg-type]
    if data.labels is None:
        raise ValueError(f"dataset {name!r} has no class labels")
    images = [data.encoded_image(i) for i in range(data.size)]
    return images, [int(x) for x in data.labels], data.classes


# ---------------------------------------------------------------------------------------------
# loaders: one function per dataset


def _fashion_mnist(root: Path, split: Split) -> _Split:
    root = _require_dir(root / "fashion-mnist", "dataset-fashion-mnist")
    stem = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{stem}-images-idx3-ubyte.gz", expected_dims=3)  # (N, 28, 28) uint8
    labels = _read_idx(root / f"{stem}-labels-idx1-ubyte.gz", expected_dims=1)  # (N,) uint8
    if len(images) != len(labels):
        raise ValueError(f"fashion-mnist {split}: {len(images)} images but {len(labels)} labels")
    classes = FASHION_MNIST_CLASSES
    label_list = labels.tolist()

    def caption(index: int, rng: random.Random) -> str:
        return class_caption(classes[label_list[index]], rng)

    return _Split(
        id_prefix=f"fmnist-{split}",
        size=len(images),
        encoded_image=lambda index: encode_png(images[index]),
        caption=caption,
        labels=label_list,
        classes=classes,
    )


_LOADERS: dict[str, Callable[[Path, Split], _Split]] = {
    "fashion-mnist": _fashion_mnist,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


# ---------------------------------------------------------------------------------------------
# shared helpers


def _load(name: str, split: Split) -> _Split:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _load_cached(name, split, dataset_root())


@lru_cache(maxsize=4)
def _load_cached(name: str, split: Split, root: Path) -> _Split:
    return _LOADERS[name](root, split)


def _require_dir(path: Path, debian_package: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset directory {path} not found: install the Debian package {debian_package!r} "
            f"(apt-get install {debian_package}) or point {DATASETS_DIR_ENV} at a copy"
        )
    return path


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Reads a gzip'd IDX file (the MNIST format) of unsigned bytes."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    if ndim != expected_dims:
        raise ValueError(f"{path} has {ndim} dimensions, expected {expected_dims}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape))
    if len(raw) - offset != count:
        raise ValueError(f"{path} holds {len(raw) - offset} bytes of data, header says {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, 3) array (fast compression: 28x28 is ~0.5 KB anyway)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def class_caption(class_name: str, rng: random.Random) -> str:
    template = rng.choice(CLASS_CAPTION_TEMPLATES)
    return template.format(a=f"{_article(class_name)} {class_name}", c=class_name)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
