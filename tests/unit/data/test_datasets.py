"""Real datasets as record iterators: Fashion-MNIST, Tux Paint stamps and Open Clip Art from their
Debian packages, Twitter emoji from the npm package (scripts/install-debian-packages.sh)."""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
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
    dataset_dir,
    dataset_root,
    dataset_size,
    epoch_order,
    in_test_split,
    iter_records,
    load_labelled,
)
from growclip_stream.data.images import ImageTransform, decode_image
from growclip_stream.data.kafka_source import Message
from growclip_stream.data.pipeline import Decoder
from growclip_stream.data.records import (
    Record,
    RecordLimits,
    decode_json,
    encode_binary,
    encode_json,
    is_held_out,
    sniff_content_type,
)

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
    assert DATASETS == (FMNIST, "tuxpaint", "emoji", "openclipart")
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


# ---------------------------------------------------------------------------------------------
# tuxpaint, emoji, openclipart: file datasets split by a salted hash of the id

TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
FILE_DATASETS = ("tuxpaint", "emoji", "openclipart")


def both_splits(name: str) -> tuple[list[Record], list[Record]]:
    return list(iter_records(name, "train")), list(iter_records(name, "test"))


@pytest.mark.parametrize("name", ["tuxpaint", "emoji"])
def test_small_file_datasets_whole_pass_is_valid(name: str) -> None:
    train, test = both_splits(name)
    ids = [r.id for r in train + test]
    assert len(ids) == len(set(ids))
    assert all(i.startswith(f"{name}-") and "." not in i and "#" not in i for i in ids)
    assert 0.06 < len(test) / len(ids) < 0.14  # ~TEST_FRACTION, reserved
    assert {r.id for r in test} == {i for i in ids if in_test_split(i)}
    limits = RecordLimits()
    for rec in train + test:
        decode_json(encode_json(rec), limits)  # fits a JSON message
        assert decode_image(rec.image, limits).size[0] > 0
        assert rec.caption.strip() == rec.caption and rec.caption
    # the held-out share of the stream does not collapse on a hash split (salted, independent hash)
    held = sum(is_held_out(r.id, 0.1) for r in train)
    assert 0.05 < held / len(train) < 0.15


def test_tuxpaint_captions_are_the_english_descriptions() -> None:
    train, test = both_splits("tuxpaint")
    assert 700 < len(train) + len(test) <= 785  # the PNG stamps with a description, deduplicated
    by_id = {r.id: r for r in train + test}
    crow = by_id["tuxpaint-animals/birds/crow"]
    assert crow.caption == "A crow."
    assert crow.image == (TUXPAINT_DIR / "animals/birds/crow.png").read_bytes()  # passed through
    for rec in itertools.islice(by_id.values(), 0, None, 37):
        stem = TUXPAINT_DIR / rec.id.removeprefix("tuxpaint-")
        first_line = stem.with_suffix(".txt").read_text(encoding="utf-8").splitlines()[0]
        assert rec.caption == " ".join(first_line.split())
        assert rec.image == stem.with_suffix(".png").read_bytes()
    # mirrored variants have no description of their own and are not records
    assert not any(i.endswith("_mirror") for i in by_id)


def test_emoji_captions_are_the_names_from_emoji_json() -> None:
    entries = json.loads((dataset_dir("emoji") / "emoji.json").read_text(encoding="utf-8"))
    names = {Path(e["image"]).stem: e["name"] for e in entries}
    train, test = both_splits("emoji")
    assert len(train) + len(test) == len(entries) == 1911
    by_id = {r.id: r for r in train + test}
    assert by_id["emoji-1f600"].caption == "grinning face"
    assert by_id["emoji-1f1ea-1f1f8"].caption == "Spain Flag"
    for rec in itertools.islice(by_id.values(), 0, None, 29):
        key = rec.id.removeprefix("emoji-")
        assert rec.caption.lower() == names[key].lower()
        assert rec.image == (dataset_dir("emoji") / "img/twitter/64" / f"{key}.png").read_bytes()
        assert Image.open(io.BytesIO(rec.image)).size == (64, 64)


def test_openclipart_titles_dedupe_and_large_images() -> None:
    train, test = both_splits("openclipart")
    assert 6000 < len(train) + len(test) < 7000
    by_id = {r.id: r for r in train + test}
    assert len(by_id) == len(train) + len(test)
    # one record per distinct image, although the package files many under several folders
    assert len({hashlib.blake2b(r.image, digest_size=16).digest() for r in by_id.values()}) == len(by_id)
    assert by_id["openclipart-animals/bugs/zanzara_architetto_franc_01"].caption == "Zanzara"
    # a collection's title ("Lemon SVG theme") is not a caption: the file name and folders are
    icon = by_id["openclipart-computer/icons/lemon-theme/actions/2uparrow"]
    assert icon.caption == "2uparrow (computer / icons / lemon-theme / actions)"
    # 8.7 megapixels: over the record limits, so downscaled and re-encoded as PNG
    phone = by_id["openclipart-office/telephone/mobile_phone_01"]
    with Image.open(io.BytesIO(phone.image)) as img:
        assert img.format == "PNG" and max(img.size) == 1024
    # 623 megapixels: left out rather than decoded
    assert not any("stop_sign_miguel" in i for i in by_id)
    limits = RecordLimits()
    for rec in random.Random(0).sample(list(by_id.values()), 150):
        decode_json(encode_json(rec), limits)
        decode_image(rec.image, limits)
        assert "Clipart by" not in rec.caption and "Part of the" not in rec.caption


def test_file_datasets_in_the_pipeline_and_labelled() -> None:
    decoder = Decoder(ImageTransform(size=32, channels=3), RecordLimits())
    for name in FILE_DATASETS:
        for rec in itertools.islice(iter_records(name, seed=2), 20):
            value, headers = encode_binary(rec, sniff_content_type(rec.image))
            msg = Message("t", 0, 0, value, tuple(headers), -1)
            sample = decoder(msg)
            assert (sample.id, sample.caption, sample.image.shape) == (rec.id, rec.caption, (3, 32, 32))
        images, labels, classes = load_labelled(name, "test")
        assert len(images) == len(labels) == dataset_size(name, "test")
        assert len(set(labels)) > 3 and max(labels) < len(classes)
    _, labels, classes = load_labelled("tuxpaint", "test")
    assert "animals" in classes


def test_file_datasets_repeat_with_unique_ids() -> None:
    n = dataset_size("emoji", "test")
    records = list(itertools.islice(iter_records("emoji", "test", seed=4, repeat=True), 2 * n))
    assert len({r.id for r in records}) == 2 * n
    assert [r.id.removesuffix("#e1") for r in records[n:]] != [r.id for r in records[:n]]
    assert {r.id.removesuffix("#e1") for r in records[n:]} == {r.id for r in records[:n]}
    assert all(in_test_split(r.id) for r in records)  # the suffix does not move a record


@pytest.mark.parametrize(
    ("name", "package"),
    [
        ("tuxpaint", "tuxpaint-stamps-default"),
        ("emoji", "emoji-datasource-twitter"),
        ("openclipart", "openclipart-png"),
    ],
)
def test_missing_file_dataset_names_its_package(
    name: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GROWCLIP_DATASETS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=package):
        iter_records(name)


def test_file_datasets_read_a_copy_under_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "tuxpaint-stamps" / "animals" / "birds"
    copy.mkdir(parents=True)
    for stem in ("crow", "duck", "owl"):
        for ext in (".png", ".txt"):
            (copy / f"{stem}{ext}").symlink_to(TUXPAINT_DIR / "animals" / "birds" / f"{stem}{ext}")
    emoji = tmp_path / "emoji-datasource-twitter"
    (emoji / "img/twitter/64").mkdir(parents=True)
    source = dataset_dir("emoji")
    entries = json.loads((source / "emoji.json").read_text(encoding="utf-8"))[:12]
    (emoji / "emoji.json").write_text(json.dumps(entries))
    for e in entries:
        (emoji / "img/twitter/64" / e["image"]).symlink_to(source / "img/twitter/64" / e["image"])
    monkeypatch.setenv("GROWCLIP_DATASETS_DIR", str(tmp_path))
    assert dataset_dir("tuxpaint") == tmp_path / "tuxpaint-stamps"
    tux = [r for split in ("train", "test") for r in iter_records("tuxpaint", split)]
    assert sorted(r.caption for r in tux) == ["A crow.", "A duck.", "An owl."]
    assert dataset_size("emoji", "train") + dataset_size("emoji", "test") == 12
