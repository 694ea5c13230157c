"""ShardSource and ShardDeadLetter on real parquet and tar shards (local files and memory://)."""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.kafka_source import Message
from growclip_stream.data.pipeline import Decoder, route
from growclip_stream.data.records import Record, RecordLimits
from growclip_stream.data.shards import (
    DEAD_LETTER_NAME,
    ShardDeadLetter,
    ShardSource,
    dead_letter_url,
    read_dead_letter,
    write_parquet_shards,
    write_tar_shards,
)

DECODER = Decoder(ImageTransform(size=28, channels=1), RecordLimits())


@pytest.fixture(scope="module")
def real_records() -> list[Record]:
    """Real images (Fashion-MNIST test split, PNG) plus a JPEG and a WebP re-encoding of some."""
    recs = list(itertools.islice(iter_records("fashion-mnist", "test", seed=1), 230))
    out = []
    for i, rec in enumerate(recs):
        fmt = ("JPEG", "WEBP", None)[i % 3]
        if fmt is not None:
            buf = io.BytesIO()
            Image.open(io.BytesIO(rec.image)).save(buf, format=fmt)
            rec = Record(rec.id, rec.caption, buf.getvalue())
        out.append(rec)
    return out


@pytest.fixture
def mem_url() -> Iterator[str]:
    url = f"memory://shards-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def drain(src: ShardSource, sizes: Iterator[int] | None = None) -> list[Message]:
    out: list[Message] = []
    while not src.finished:
        out.extend(src.poll(0.01, max_records=next(sizes) if sizes else None))
    return out


def same_records(msgs: list[Message], recs: list[Record]) -> None:
    assert len(msgs) == len(recs)
    for msg, rec in zip(msgs, recs, strict=True):
        sample = DECODER(msg)
        assert (sample.id, sample.caption) == (rec.id, rec.caption)
        assert msg.value == rec.image  # the original bytes, passed through
        assert sample.image.shape == (1, 28, 28)


@pytest.mark.parametrize("kind", ["parquet", "tar"])
def test_reads_every_row_in_order_local(tmp_path: Path, real_records: list[Record], kind: str) -> None:
    if kind == "parquet":
        urls = write_parquet_shards(real_records, str(tmp_path / "s"), per_shard=100, row_group_rows=30)
    else:
        urls = write_tar_shards(real_records, str(tmp_path / "s"), per_shard=100)
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"0000{i}.{kind}" for i in range(3)]
    src = ShardSource(str(tmp_path / "s"))
    assert src.lag() == {0: 230}
    first = src.poll(1.0, max_records=7)
    assert [m.offset for m in first] == list(range(7)) and len({m.topic for m in first}) == 1
    assert first[0].topic == urls[0] and first[0].partition == 0
    msgs = first + drain(src)
    same_records(msgs, real_records)
    assert [m.offset for m in msgs] == [*range(100), *range(100), *range(30)]
    assert [m.topic for m in msgs] == [urls[0]] * 100 + [urls[1]] * 100 + [urls[2]] * 30
    assert src.lag() == {0: 0}
    assert src.state_dict() == {
        "url": str(tmp_path / "s"),
        "completed": [f"0000{i}.{kind}" for i in range(3)],
        "failed": {},
        "shard": None,
        "row": 0,
    }
    assert src.poll(0.05) == []  # finished: waits, returns nothing
    src.commit()  # no-op, part of the interface
    src.close()


def test_memory_url_mixed_formats_nested_and_ignored_names(mem_url: str, real_records: list[Record]) -> None:
    write_tar_shards(real_records[:40], f"{mem_url}/a", per_shard=25)
    write_parquet_shards(real_records[40:90], f"{mem_url}/b", per_shard=50)
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{mem_url}/a/_SUCCESS", b"")
    fs.pipe(f"{mem_url}/b/.00009.parquet.tmp", b"half written")
    fs.pipe(f"{mem_url}/b/notes.txt", b"not a shard")
    with ShardDeadLetter(dead_letter_url(mem_url)) as dlq:
        dlq.send(Message("x", 0, 0, b"", (), -1), "bad_json", "")
    src = ShardSource(mem_url)
    msgs = drain(src, itertools.cycle([13, 1, 64]))
    same_records(msgs, real_records[:90])
    assert src.state_dict()["completed"] == ["a/00000.tar", "a/00001.tar", "b/00000.parquet"]
    assert msgs[0].topic == f"memory:///{mem_url.removeprefix('memory://')}/a/00000.tar"


def test_single_shard_url_and_glob(tmp_path: Path, real_records: list[Record]) -> None:
    urls = write_parquet_shards(real_records[:60], str(tmp_path), per_shard=20)
    one = ShardSource(str(tmp_path / "00001.parquet"))
    same_records(drain(one), real_records[20:40])
    assert one.state_dict()["completed"] == ["00001.parquet"]
    glob = ShardSource(str(tmp_path / "0000[02].parquet"))
    same_records(drain(glob), real_records[:20] + real_records[40:60])
    assert dead_letter_url(urls[1]) == f"file://{tmp_path}/{DEAD_LETTER_NAME}"
    with pytest.raises(FileNotFoundError, match=r"no \.parquet or \.tar shards"):
        ShardSource(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("kind", ["parquet", "tar"])
def test_resume_from_state_yields_each_row_exactly_once(
    mem_url: str, real_records: list[Record], kind: str
) -> None:
    if kind == "parquet":
        write_parquet_shards(real_records, mem_url, per_shard=70, row_group_rows=16)
    else:
        write_tar_shards(real_records, mem_url, per_shard=70)
    rng = random.Random(0)
    for trial in range(6):
        seen: list[tuple[str, int]] = []
        src = ShardSource(mem_url)
        stop_after = rng.randrange(1, 230) if trial else 70  # trial 0: exactly at a shard boundary
        while len(seen) < stop_after:
            seen += [(m.topic, m.offset) for m in src.poll(0.01, max_records=rng.randint(1, 40))]
        state = json.loads(json.dumps(src.state_dict()))  # as stored in a checkpoint manifest
        src.close()
        resumed = ShardSource(mem_url)
        resumed.load_state_dict(state)
        lag = resumed.lag()[0]
        rest = drain(resumed, iter(lambda: rng.randint(1, 50), None))
        assert lag == len(rest)
        seen += [(m.topic, m.offset) for m in rest]
        assert len(seen) == len(set(seen)) == 230, (trial, stop_after, state)
        assert [m.value for m in rest] == [r.image for r in real_records[len(seen) - len(rest) :]]


def test_bad_rows_come_out_and_are_dead_lettered(tmp_path: Path, real_records: list[Record]) -> None:
    good = real_records[0].image
    png = next(r.image for r in real_records if r.image.startswith(b"\x89PNG"))
    table = pa.table(
        {
            "key": ["ok-1", "no-caption", None, "garbage", "truncated", "empty", "null-image", "ok-2"],
            "caption": ["a shirt", None, "no key", "x", "y", "   ", "z", "a bag"],
            "jpg": [good, png, good, b"definitely not an image", png[: len(png) // 2], good, None, good],
            "url": ["http://example.invalid/1"] * 8,  # img2dataset writes more columns; ignored
            "status": ["success"] * 8,
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        for name, data in [
            ("t/no-text.png", png),
            ("t/no-image.txt", b"a caption but no image"),
            ("t/no-image.json", b"{}"),
            ("t/bad-utf8.png", png),
            ("t/bad-utf8.txt", b"\xff\xfe caption"),
            ("t/ok-3.webp", good),  # wrong extension for JPEG bytes: the content decides
            ("t/ok-3.txt", b"  a trouser \n"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    src = ShardSource(str(tmp_path))
    assert src.lag() == {0: 12}
    msgs = drain(src)
    assert len(msgs) == 12  # nothing dropped
    dlq_path = dead_letter_url(str(tmp_path))
    outcomes = []
    with ShardDeadLetter(dlq_path, flush_every=3) as dlq:
        for msg in msgs:
            status, result = route(DECODER, msg, holdout_fraction=0.0)
            outcomes.append(status)
            if status not in ("trained", "held_out"):
                dlq.send(msg, status, str(result))
    assert outcomes == [
        "trained",
        "missing_field",
        "missing_field",
        "not_an_image",
        "truncated_image",
        "empty_caption",
        "not_an_image",
        "trained",
        "missing_field",
        "bad_content_type",
        "bad_utf8",
        "trained",
    ]
    entries = read_dead_letter(dlq_path)
    assert [e["reason"] for e in entries] == [o for o in outcomes if o != "trained"]
    garbage = entries[2]
    assert garbage["key"] == "garbage" and garbage["row"] == 3
    assert garbage["shard"] == f"file://{tmp_path}/00000.parquet"
    assert garbage["value_base64"] == "ZGVmaW5pdGVseSBub3QgYW4gaW1hZ2U="
    assert entries[1]["key"] is None and entries[1]["caption"] == "no key"
    no_image = entries[7]
    assert (no_image["key"], no_image["row"], no_image["value_base64"]) == ("t/no-image", 1, "")
    # the dead-letter file sits next to the shards and is not mistaken for one
    assert ShardSource(str(tmp_path)).lag() == {0: 12}


def test_dead_letter_appends_across_flushes_and_instances(mem_url: str) -> None:
    url = f"{mem_url}/dlq/{DEAD_LETTER_NAME}"
    msg = Message("memory:///s/00000.tar", 0, 5, b"\x00\x01", (("id", b"k"), ("caption", b"c")), -1)
    dlq = ShardDeadLetter(url, flush_every=1000, flush_interval_s=3600)
    dlq.send(msg, "bad_image", "d" * 5000)
    assert read_dead_letter(url) == []  # buffered
    dlq.flush()
    dlq.send(msg, "too_large", "x")
    dlq.close()
    with ShardDeadLetter(url) as again:
        again.send(msg, "bad_json", "y")
    entries = read_dead_letter(url)
    assert [e["reason"] for e in entries] == ["bad_image", "too_large", "bad_json"]
    assert len(entries[0]["detail"]) == 1000
    assert entries[0]["value_base64"] == "AAE=" and entries[0]["caption"] == "c"


def test_watch_picks_up_new_shards(mem_url: str, real_records: list[Record]) -> None:
    write_parquet_shards(real_records[:30], mem_url, per_shard=30, first_index=5)
    src = ShardSource(mem_url, watch=True, poll_interval_s=0.05)
    got = src.poll(1.0)
    assert len(got) == 30
    assert src.poll(0.1) == [] and not src.finished
    write_tar_shards(real_records[30:50], mem_url, per_shard=20, first_index=6)
    write_parquet_shards(real_records[50:60], mem_url, per_shard=10, first_index=1)  # sorts first
    for _ in range(50):
        got += src.poll(0.1)
        if len(got) == 60:
            break
    same_records(got, real_records[:30] + real_records[50:60] + real_records[30:50])
    assert src.state_dict()["completed"] == ["00001.parquet", "00005.parquet", "00006.tar"]
    src.close()


def test_watch_on_an_empty_prefix(mem_url: str, real_records: list[Record]) -> None:
    with ShardSource(f"{mem_url}/later", watch=True, poll_interval_s=0.05) as src:
        assert src.poll(0.1) == [] and src.lag() == {0: 0}
        write_tar_shards(real_records[:5], f"{mem_url}/later", per_shard=5)
        got: list[Message] = []
        for _ in range(50):
            got += src.poll(0.1)
            if got:
                break
        same_records(got, real_records[:5])


def test_broken_shards_are_skipped_and_recorded(tmp_path: Path, real_records: list[Record]) -> None:
    write_parquet_shards(real_records[:10], str(tmp_path), per_shard=10, first_index=0)
    (tmp_path / "00001.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"other": [1, 2]}), tmp_path / "00002.parquet")
    whole = write_tar_shards(real_records[10:20], str(tmp_path), per_shard=10, first_index=3)[0]
    data = Path(whole.removeprefix("file://")).read_bytes()
    (tmp_path / "00003.tar").write_bytes(data[: len(data) // 2])  # truncated mid-shard
    write_tar_shards(real_records[20:25], str(tmp_path), per_shard=5, first_index=4)

    src = ShardSource(str(tmp_path), poll_interval_s=0.01, max_read_attempts=2)
    msgs = []
    for _ in range(200):
        msgs += src.poll(0.01)
        if src.finished:
            break
    state = src.state_dict()
    assert set(state["failed"]) == {"00001.parquet", "00002.parquet", "00003.tar"}
    assert "key, caption" in state["failed"]["00002.parquet"]
    assert state["completed"] == ["00000.parquet", "00004.tar"]
    ids = [DECODER(m).id for m in msgs]
    # the truncated tar gave its complete samples once (retries resume where they stopped)
    assert len(ids) == len(set(ids))
    assert ids[:10] == [r.id for r in real_records[:10]] and ids[-5:] == [r.id for r in real_records[20:25]]
    assert 0 < len(ids) - 15 < 10


def test_load_state_rejects_bad_state_and_survives_a_vanished_shard(
    tmp_path: Path, real_records: list[Record]
) -> None:
    write_tar_shards(real_records[:20], str(tmp_path), per_shard=10)
    src = ShardSource(str(tmp_path))
    with pytest.raises(ValueError, match="row"):
        src.load_state_dict({"completed": [], "shard": "00000.tar", "row": -1})
    with pytest.raises(ValueError, match="completed"):
        src.load_state_dict({"completed": "00000.tar"})
    src.load_state_dict({"url": str(tmp_path), "completed": [], "shard": "gone.tar", "row": 3})
    assert "gone.tar" in src.state_dict()["failed"]
    same_records(drain(src), real_records[:20])


def test_positions_saved_for_another_url_are_refused(tmp_path: Path, real_records: list[Record]) -> None:
    """Shard names are relative to their URL: positions from other shards of the same names must
    not make this source skip its own."""
    write_tar_shards(real_records[:20], str(tmp_path / "a"), per_shard=10)
    write_tar_shards(real_records[20:40], str(tmp_path / "b"), per_shard=10)
    first = ShardSource(str(tmp_path / "a"))
    first.poll(1.0, max_records=15)
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved["completed"] == ["00000.tar"] and saved["row"] == 5
    other = ShardSource(str(tmp_path / "b"))
    assert other.load_state_dict(saved) is False
    same_records(drain(other), real_records[20:40])  # from its first shard: nothing skipped
    again = ShardSource(str(tmp_path / "a"))
    assert again.load_state_dict(saved) is True
    same_records(drain(again), real_records[15:20])


def test_write_tar_rejects_dotted_ids(mem_url: str, real_records: list[Record]) -> None:
    with pytest.raises(ValueError, match=r"contains '\.'"):
        write_tar_shards([Record("a.b", "c", real_records[0].image)], mem_url, per_shard=1)


def test_corrupt_row_group_gives_the_rows_before_it_once(tmp_path: Path, real_records: list[Record]) -> None:
    write_parquet_shards(real_records[:30], str(tmp_path), per_shard=30, row_group_rows=10)
    path = tmp_path / "00000.parquet"
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(2)  # the png column of rows 10..19
    data = bytearray(path.read_bytes())
    for i in range(chunk.data_page_offset + 40, chunk.data_page_offset + chunk.total_compressed_size - 10):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    src = ShardSource(str(tmp_path), poll_interval_s=0.01, max_read_attempts=3, batch_rows=4)
    msgs = []
    for _ in range(200):
        msgs += src.poll(0.01, max_records=6)
        if src.finished:
            break
    assert [m.offset for m in msgs] == list(range(10))  # row group 0 whole, once, despite retries
    assert list(src.state_dict()["failed"]) == ["00000.parquet"]


def test_a_failed_dead_letter_write_keeps_its_lines_and_says_so(tmp_path: Path) -> None:
    """A flush that cannot write returns False and keeps every line; the next one writes each once."""
    path = tmp_path / "dlq.jsonl"
    path.mkdir()  # a folder where the file should be: every append fails, even as root
    msg = Message("shard-a", 0, 7, b"junk", (("id", b"r7"),), -1)
    dlq = ShardDeadLetter(str(path), flush_every=1000)
    dlq.send(msg, "not_an_image", "x")
    dlq.send(Message("shard-a", 0, 8, b"junk", (("id", b"r8"),), -1), "not_an_image", "y")
    assert dlq.flush() is False
    assert dlq.flush() is False
    assert dlq.pending == 2 and dlq.failures == 2
    path.rmdir()
    assert dlq.flush() is True and dlq.pending == 0
    assert [(e["key"], e["row"]) for e in read_dead_letter(str(path))] == [("r7", 7), ("r8", 8)]
