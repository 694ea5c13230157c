"""Real image-text datasets, read offline from installed packages, as record iterators.

Each dataset is one loader function ``(directory, split) -> _Split`` registered in ``_DATASETS``
with where its package installs it; everything else (ordering, ids, repetition, captions,
labelled access) is shared. Adding a dataset is adding its loader and its registry entry.

- ``fashion-mnist`` (Debian ``dataset-fashion-mnist``): 60,000 train and 10,000 test 28x28
  grayscale images in 10 classes. Images are PNG-encoded on the fly; captions are drawn (seeded)
  from templates around the class name.
- ``tuxpaint`` (Debian ``tuxpaint-stamps-default``): the 785 PNG stamps that have a description;
  the caption is the stamp's English description (first line of its ``.txt``). SVG-only stamps
  are left out. Class: the stamp's top-level folder (animals, food, ...).
- ``emoji`` (npm ``emoji-datasource-twitter``, 64x64 PNGs): 1,911 emoji; the caption is the
  emoji's name from ``emoji.json`` (all-caps Unicode names lower-cased). Class: its category.
- ``openclipart`` (Debian ``openclipart-png``): clip-art PNGs, deduplicated by content (the
  package files many images under several folders). The caption is the image's embedded title
  when it names this image; when it is a collection's name (shared by many images, such as
  "Lemon SVG theme") the file name and folders are used instead. Images over
  :data:`MAX_SOURCE_PIXELS` (some posters reach 623 megapixels) are left out. Class: top folder.

Images are passed through as their original encoded bytes, except those over the default
record limits (:class:`RecordLimits` pixels, or :data:`PASSTHROUGH_MAX_BYTES` so that a JSON
record stays under the message limit), which are downscaled and re-encoded as PNG.

Splits: Fashion-MNIST has its own train and test files. The other datasets are split by a salted
hash of the record id (:data:`TEST_FRACTION` to test), independent of the held-out hash of
:func:`records.is_held_out`, so the stream's held-out share stays the same on the train split.
Only ``split="train"`` is streamed for training; ``"test"`` is reserved for evaluation.

Locations: each dataset has its package's install location; ``GROWCLIP_DATASETS_DIR`` replaces
them all with ``$GROWCLIP_DATASETS_DIR/<folder>`` (``fashion-mnist``, ``tuxpaint-stamps``,
``emoji-datasource-twitter``, ``openclipart-png``). The npm package is installed project-locally
by ``scripts/install-debian-packages.sh`` under ``.datasets/npm`` (``GROWCLIP_NPM_PREFIX``
overrides it). A missing dataset raises FileNotFoundError naming the package that installs it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, PngImagePlugin

from growclip_stream.data.records import REPEAT_SEPARATOR, Record, RecordLimits

Split = Literal["train", "test"]
STREAM_SPLIT: Split = "train"  # the split the producer streams; the other is for evaluation only

DEFAULT_DATASETS_DIR = "/usr/share/datasets"
DATASETS_DIR_ENV = "GROWCLIP_DATASETS_DIR"
NPM_PREFIX_ENV = "GROWCLIP_NPM_PREFIX"
NPM_PREFIX_DEFAULT = ".datasets/npm"  # relative to the repository root (or the working directory)
EMOJI_NPM_PACKAGE = "emoji-datasource-twitter@16.0.0"

TEST_FRACTION = 0.1  # share of a hash-split dataset reserved for the test split
_SPLIT_SALT = b"growclip-split"  # makes the split hash independent of is_held_out's

_LIMITS = RecordLimits()
PASSTHROUGH_MAX_BYTES = 1_000_000  # base64 in a JSON record: ~1.33 MB, under the 2 MB message limit
MAX_SOURCE_PIXELS = 16_000_000  # larger source images are left out: decoding one takes > 64 MB
RESIZED_MAX_SIDE = 1024  # longest side of an image re-encoded because it was over the limits

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
    item_id: Callable[[int], str] | None = None  # index -> stable id; default f"{id_prefix}-{index:06d}"

    def record_id(self, index: int) -> str:
        return self.item_id(index) if self.item_id is not None else f"{self.id_prefix}-{index:06d}"


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
                id=f"{data.record_id(index)}{suffix}",
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


@dataclass(frozen=True)
class Items:
    """Items of a split for evaluation: encoded images with their caption and class label."""

    images: list[bytes]
    captions: list[str]
    labels: list[int] | None  # None for a dataset without classes
    classes: tuple[str, ...]


def load_items(name: str, split: Split = "test", limit: int | None = None, seed: int = 0) -> Items:
    """``limit`` items of a split (all when None), evenly spread over its file order so that a
    split stored class by class still yields every class; captions are drawn as the producer
    draws them (seeded)."""
    data = _load(name, split)
    rng = random.Random(f"{name}:{split}:{seed}")
    chosen = evenly_spaced(data.size, limit)
    return Items(
        images=[data.encoded_image(i) for i in chosen],
        captions=[data.caption(i, rng) for i in chosen],
        labels=None if data.labels is None else [int(data.labels[i]) for i in chosen],
        classes=data.classes,
    )


def evenly_spaced(size: int, limit: int | None) -> list[int]:
    """``limit`` indices of ``range(size)`` spread evenly from the first (all of them when
    ``limit`` is None or at least ``size``)."""
    if limit is None or limit >= size:
        return list(range(size))
    return [i * size // limit for i in range(limit)]


# ---------------------------------------------------------------------------------------------
# loaders: one function per dataset


def _fashion_mnist(root: Path, split: Split) -> _Split:
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


def _tuxpaint(root: Path, split: Split) -> _Split:
    return _hash_split("tuxpaint", _tuxpaint_index(root), split)


@lru_cache(maxsize=2)
def _tuxpaint_index(root: Path) -> _Index:
    """Stamps with a PNG and a description: ``<folder>/<name>.png`` + ``<name>.txt`` whose first
    line is the English description (the following ``<lang>.utf8=...`` lines are translations)."""
    items = []
    for png in sorted(root.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue  # mirrored variants (``*_mirror.png``) and thumbnails have no description
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = _clean(lines[0]) if lines else ""
        rel = png.relative_to(root)
        if caption and ".utf8=" not in caption:
            items.append((_key(rel), png, caption, rel.parts[0], None))
    return _index(items, keep=_unique_files([item[1] for item in items]))


def _emoji(root: Path, split: Split) -> _Split:
    return _hash_split("emoji", _emoji_index(root), split)


@lru_cache(maxsize=2)
def _emoji_index(root: Path) -> _Index:
    """Every emoji of ``emoji.json`` with a Twitter image in ``img/twitter/64/`` (no skin-tone variants)."""
    images = root / "img" / "twitter" / "64"
    entries = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
    items = []
    for entry in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["image"])):
        png = images / entry["image"]
        name = _clean(entry.get("name") or " ".join(entry.get("short_names") or ()))
        if not entry.get("has_img_twitter", True) or not name or not png.is_file():
            continue
        caption = name.lower() if name.isupper() else name
        key = Path(entry["image"]).stem.lower()
        items.append((key, png, caption, entry.get("category") or "other", None))
    return _index(items, keep=None)


def _openclipart(root: Path, split: Split) -> _Split:
    return _hash_split("openclipart", _openclipart_index(root), split)


_COLLECTION_TITLE_IMAGES = 12  # a title shared by more distinct images names a collection
_CLIPART_BY = re.compile(r"^clipart by .+? - ", re.IGNORECASE)


@lru_cache(maxsize=2)
def _openclipart_index(root: Path) -> _Index:
    """Clip-art PNGs with a caption each: the embedded title, or the file name and folders."""
    found = []
    for png in sorted(root.rglob("*.png")):
        # the plugin class reads the header and text chunks only, and skips Pillow's global
        # pixel limit: some of these posters are over it (they are left out below)
        with PngImagePlugin.PngImageFile(png) as img:
            title = _clean(str(img.info.get("Title") or ""))
            author = str(img.info.get("Author") or "")
            pixels = img.size[0] * img.size[1]
        found.append((png, title, author, pixels))
    unique = _unique_files([png for png, _, _, _ in found])
    images_per_title = Counter(title for png, title, _, _ in found if png in unique)
    items = []
    for png, title, author, pixels in found:
        rel = png.relative_to(root)
        caption = _clip_title(title, author)
        # "Clipart by <author> - <drawing>" names one drawing, yet some authors put it on all
        # their images: such a title is trusted only when no other image carries it
        shared_by = 1 if title.lower().startswith("clipart by ") else _COLLECTION_TITLE_IMAGES
        collection = images_per_title[title] > shared_by or caption.startswith("Part of ")
        if not caption or collection:
            folders = " / ".join(part.replace("_", " ") for part in rel.parts[:-1])
            name = _file_name_words(png.stem, author)
            caption = f"{name} ({folders})" if folders else name
        items.append((_key(rel), png, caption, rel.parts[0], pixels))
    return _index(items, keep=unique)


def _clip_title(title: str, author: str) -> str:
    """``"Clipart by Ann - Ohio"`` -> ``"Ohio"``; underscores as spaces."""
    if title.startswith(f"Clipart by {author} - "):
        title = title[len(f"Clipart by {author} - ") :]
    else:
        title = _CLIPART_BY.sub("", title)
    return _clean(title.replace("_", " "))


def _file_name_words(stem: str, author: str) -> str:
    """The title part of an Open Clip Art file name, whose pattern is ``<title>_<author>`` cut to
    24 characters, then ``_<nn>``: ``esperimento_chimico_arch_01`` -> ``esperimento chimico``.
    Names without the author keep their numbers (``ornamental_d_2`` -> ``ornamental d 2``)."""
    author_slug = re.sub(r"[^a-z0-9]+", "_", author.lower()).strip("_")
    base = re.sub(r"_\d*[a-z]?$", "", stem)
    if author_slug:
        for cut in (i for i, ch in enumerate(base) if ch == "_" and i > 0):
            tail = base[cut + 1 :]
            if len(tail) >= 3 and author_slug.startswith(tail):
                stem = base[:cut]  # the longest tail that starts the author's name
                break
    return _clean(re.sub(r"[_\s]+", " ", stem)) or stem


_LOCATIONS: dict[str, tuple[str, Callable[[], Path], str]] = {
    # name: (folder under GROWCLIP_DATASETS_DIR, install location, what installs it)
    "fashion-mnist": (
        "fashion-mnist",
        lambda: Path(DEFAULT_DATASETS_DIR) / "fashion-mnist",
        "the Debian package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist)",
    ),
    "tuxpaint": (
        "tuxpaint-stamps",
        lambda: Path("/usr/share/tuxpaint/stamps"),
        "the Debian package 'tuxpaint-stamps-default' "
        "(apt-get install --no-install-recommends tuxpaint-stamps-default)",
    ),
    "emoji": (
        "emoji-datasource-twitter",
        lambda: _npm_package_dir("emoji-datasource-twitter"),
        f"the npm package '{EMOJI_NPM_PACKAGE}' (npm install --prefix {NPM_PREFIX_DEFAULT} "
        f"{EMOJI_NPM_PACKAGE}, as scripts/install-debian-packages.sh does)",
    ),
    "openclipart": (
        "openclipart-png",
        lambda: Path("/usr/share/openclipart/png"),
        "the Debian package 'openclipart-png' (apt-get install --no-install-recommends openclipart-png)",
    ),
}
_LOADERS: dict[str, Callable[[Path, Split], _Split]] = {
    "fashion-mnist": _fashion_mnist,
    "tuxpaint": _tuxpaint,
    "emoji": _emoji,
    "openclipart": _openclipart,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def dataset_dir(name: str) -> Path:
    """Where a dataset is read from: its package's location, or under ``GROWCLIP_DATASETS_DIR``."""
    if name not in _LOCATIONS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    folder, installed, _ = _LOCATIONS[name]
    return dataset_root() / folder if os.environ.get(DATASETS_DIR_ENV) else installed()


def npm_prefix() -> Path:
    """The npm prefix holding the npm datasets: ``GROWCLIP_NPM_PREFIX``, else ``.datasets/npm`` in
    the working directory if it is there, else in the repository this package runs from."""
    env = os.environ.get(NPM_PREFIX_ENV)
    if env:
        return Path(env)
    cwd = Path.cwd() / NPM_PREFIX_DEFAULT
    return cwd if cwd.is_dir() else Path(__file__).resolve().parents[2] / NPM_PREFIX_DEFAULT


def _npm_package_dir(package: str) -> Path:
    return npm_prefix() / "node_modules" / package


# ---------------------------------------------------------------------------------------------
# shared helpers


def _load(name: str, split: Split) -> _Split:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = dataset_dir(name)
    _require_dir(directory, _LOCATIONS[name][2])
    return _load_cached(name, split, directory)


@lru_cache(maxsize=8)
def _load_cached(name: str, split: Split, directory: Path) -> _Split:
    return _LOADERS[name](directory, split)


def _require_dir(path: Path, installed_by: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset directory {path} not found: install {installed_by} "
            f"or point {DATASETS_DIR_ENV} at a copy"
        )
    return path


# A file-based dataset: (key, file, caption, class name) per image, keys unique, in a stable order.
_Index = tuple[tuple[str, Path, str, str], ...]


def _index(items: Sequence[tuple[str, Path, str, str, int | None]], keep: set[Path] | None) -> _Index:
    """The items whose file is in ``keep`` (when given: the first of byte-identical files, so that
    one image cannot land in both splits) and has at most :data:`MAX_SOURCE_PIXELS` (``None``:
    read from the file's header). Keys must be unique."""
    out = []
    seen: set[str] = set()
    for key, path, caption, cls, pixels in items:
        if keep is not None and path not in keep:
            continue
        if key in seen:
            raise ValueError(f"duplicate dataset key {key!r} ({path})")
        seen.add(key)
        if pixels is None:
            with Image.open(path) as img:
                pixels = img.size[0] * img.size[1]
        if pixels <= MAX_SOURCE_PIXELS:
            out.append((key, path, caption, cls))
    return tuple(out)


def _unique_files(paths: Sequence[Path]) -> set[Path]:
    """The first of every group of byte-identical files (sizes compared first, then hashes)."""
    by_size: dict[int, list[Path]] = {}
    for path in paths:
        by_size.setdefault(path.stat().st_size, []).append(path)
    keep: set[Path] = set()
    for same_size in by_size.values():
        if len(same_size) == 1:
            keep.add(same_size[0])
            continue
        seen: set[bytes] = set()
        for path in same_size:
            digest = hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                keep.add(path)
    return keep


def in_test_split(record_id: str) -> bool:
    """Whether a record of a hash-split dataset belongs to its test split (repetition suffix ignored)."""
    base_id = record_id.split(REPEAT_SEPARATOR, 1)[0]
    digest = hashlib.blake2b(base_id.encode("utf-8"), digest_size=8, person=_SPLIT_SALT).digest()
    return int.from_bytes(digest, "big") < TEST_FRACTION * 2**64


def _hash_split(id_prefix: str, index: _Index, split: Split) -> _Split:
    chosen = [item for item in index if in_test_split(f"{id_prefix}-{item[0]}") == (split == "test")]
    classes = tuple(sorted({cls for _, _, _, cls in index}))
    class_of = {cls: i for i, cls in enumerate(classes)}
    return _Split(
        id_prefix=id_prefix,
        size=len(chosen),
        encoded_image=lambda i: encoded_file(chosen[i][1]),
        caption=lambda i, rng: chosen[i][2],
        labels=[class_of[cls] for _, _, _, cls in chosen],
        classes=tuple(cls.replace("_", " ") for cls in classes),
        item_id=lambda i: f"{id_prefix}-{chosen[i][0]}",
    )


def encoded_file(path: Path) -> bytes:
    """The file's bytes when they are PNG/JPEG/WebP within the default limits; else a downscaled PNG."""
    data = path.read_bytes()
    if data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or data[8:12] == b"WEBP":
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        fits = width * height <= _LIMITS.max_image_pixels and max(width, height) <= _LIMITS.max_image_side
        if fits and len(data) <= PASSTHROUGH_MAX_BYTES:
            return data
    return _reencoded(path)


@lru_cache(maxsize=64)
def _reencoded(path: Path) -> bytes:
    with Image.open(path) as img:
        img.load()
        img.thumbnail((RESIZED_MAX_SIDE, RESIZED_MAX_SIDE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _key(rel: Path) -> str:
    """A record-id-safe key from a relative path: no suffix, no repetition separator, and no dot
    (a webdataset key ends at the first dot of a file name)."""
    return re.sub(rf"[.{REPEAT_SEPARATOR}]", "_", rel.with_suffix("").as_posix())


def _clean(text: str) -> str:
    return " ".join(text.split())


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
    return fill_template(template, class_name)


def fill_template(template: str, class_name: str) -> str:
    """A caption template filled with a class name: ``{a}`` is the name with its indefinite
    article, ``{c}`` the bare name. The training captions and the evaluation prompts both come
    from here, so a model is never evaluated on wording it was not trained on ("a ankle boot")."""
    return template.format(a=with_article(class_name), c=class_name)


def with_article(name: str) -> str:
    """``"ankle boot"`` -> ``"an ankle boot"``, ``"bag"`` -> ``"a bag"`` (by the first letter)."""
    return f"{'an' if name[:1].lower() in tuple('aeiou') else 'a'} {name}"
