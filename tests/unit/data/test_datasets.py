"""Real datasets as record iterators (Fashion-MNIST from Debian's dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import io
import itertools
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from growclip_stream.data.datasets import (
    CLASS_CAPTION_TEMPLATES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    STREAM_SPLIT,
    dataset_root,
    dataset_size,
    epoch_order,
    iter_records,
    load_labelled,
)
from growclip_stream.data.images import decode_image
from growclip_stream.data.records import RecordLimits

FMNIST = "fashion-mnist"
ID_RE = re.compile(r"^fmnist-(train|test)-(\d{6})(#e\d+)?$")


def read_idx(path: Path) -> np.ndarray:
    """An independent IDX reader, to check the library against the raw files."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="module")
def raw_train() -> tuple[np.ndarray, np.ndarray]:
    root = dataset_root() / "fashion-mnist"
    return read_idx(root / "train-images-idx3-ubyte.gz"), read_idx(root / "train-labels-idx1-ubyte.gz")


def caption_class(caption: str) -> str:
    """The class a caption names: the longest class name found as whole words ("t-shirt" beats "shirt")."""
    found = [c for c in FASHION_MNIST_CLASSES if re.search(rf"(?<![\w-]){re.escape(c)}\b", caption)]
    assert len(found) == 1, (caption, found)
    return found[0]


def test_registry_and_classes() -> None:
    assert FMNIST in DATASETS
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "ankle boot"
    assert len(CLASS_CAPTION_TEMPLATES) >= 8
    with pytest.raises(ValueError, match="unknown dataset"):
        iter_records("no-such-dataset")


def test_sizes_from_the_files() -> None:
    assert dataset_size(FMNIST, "train") == 60_000
    assert dataset_size(FMNIST, "test") == 10_000


def test_train_records_are_real_labelled_images(raw_train: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = raw_train
    limits = RecordLimits()
    records = list(itertools.islice(iter_records(FMNIST, "train", seed=0), 3000))
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids)
    templates_used = set()
    for rec in records:
        m = ID_RE.match(rec.id)
        assert m is not None and m.group(1) == "train" and m.group(3) is None, rec.id
        index = int(m.group(2))
        img = decode_image(rec.image, limits)
        assert img.size == (28, 28) and img.mode == "L"
        assert np.array_equal(np.asarray(img), images[index])  # the exact pixels of the idx file
        assert caption_class(rec.caption) == FASHION_MNIST_CLASSES[labels[index]], rec
        templates_used.add(rec.caption.replace(FASHION_MNIST_CLASSES[labels[index]], "{}"))
    assert len(templates_used) >= 8  # captions really vary
    assert all(r.ts is None for r in records)


def test_one_pass_covers_every_index_once() -> None:
    order = epoch_order(60_000, random.Random("x"))
    assert sorted(order) == list(range(60_000))
    assert order[:100] != list(range(100))  # shuffled


def test_order_and_captions_are_seeded() -> None:
    def head(seed: int) -> list[tuple[str, str]]:
        return [(r.id, r.caption) for r in itertools.islice(iter_records(FMNIST, seed=seed), 50)]

    assert head(0) == head(0)
    assert head(0) != head(1)


def test_repeat_continues_with_unique_ids() -> None:
    n = dataset_size(FMNIST, "test")
    records = list(itertools.islice(iter_records(FMNIST, "test", seed=3, repeat=True), n + 500))
    first, second = records[:n], records[n:]
    assert len({r.id for r in first}) == n
    assert all(r.id.endswith("#e1") for r in second)
    assert not {r.id for r in first} & {r.id for r in second}
    base = {r.id.removesuffix("#e1") for r in second}
    assert base <= {r.id for r in first}  # the same samples again, in a new order
    assert [r.id.removesuffix("#e1") for r in second] != [r.id for r in first[:500]]
    # without repeat the iterator ends after one pass
    assert sum(1 for _ in iter_records(FMNIST, "test")) == n


def test_test_split_is_disjoint_and_reserved(raw_train: tuple[np.ndarray, np.ndarray]) -> None:
    assert STREAM_SPLIT == "train"
    default = next(iter_records(FMNIST))
    assert default.id.startswith("fmnist-train-")  # the stream defaults to train
    test_ids = {r.id for r in itertools.islice(iter_records(FMNIST, "test"), 2000)}
    assert all(i.startswith("fmnist-test-") for i in test_ids)
    train_ids = {r.id for r in itertools.islice(iter_records(FMNIST, "train"), 2000)}
    assert not test_ids & train_ids
    # different files: the test images are not the train images
    test_first = decode_image(load_labelled(FMNIST, "test")[0][0], RecordLimits())
    assert not np.array_equal(np.asarray(test_first), raw_train[0][0])


def test_load_labelled_for_zero_shot() -> None:
    images, labels, classes = load_labelled(FMNIST, "test")
    raw_labels = read_idx(dataset_root() / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz")
    assert classes == FASHION_MNIST_CLASSES
    assert len(images) == len(labels) == 10_000
    assert labels == raw_labels.tolist()
    assert set(labels) == set(range(10))
    assert Image.open(io.BytesIO(images[123])).size == (28, 28)


def test_missing_dataset_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROWCLIP_DATASETS_DIR", str(tmp_path))
    assert dataset_root() == tmp_path
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        iter_records(FMNIST)  # at the call, not at the first record
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_labelled(FMNIST, "test")


def test_datasets_dir_override_reads_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = dataset_root() / "fashion-mnist"
    copy = tmp_path / "fashion-mnist"
    copy.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (copy / name).symlink_to(src / name)
    monkeypatch.setenv("GROWCLIP_DATASETS_DIR", str(tmp_path))
    assert dataset_size(FMNIST, "test") == 10_000
    with pytest.raises(FileNotFoundError):
        dataset_size(FMNIST, "train")  # not in the copy
