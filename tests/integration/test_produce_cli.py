"""`growclip-daemon produce` against the real broker: datasets and shards (local and memory://) into
Kafka, read back with our KafkaSource and decoded through the pipeline."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from growclip_daemon.cli import app
from growclip_stream.data.datasets import in_test_split, iter_records
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.pipeline import Decoder
from growclip_stream.data.records import Record, RecordLimits
from growclip_stream.data.shards import write_parquet_shards, write_tar_shards
from tests.helpers import consume_topic

DECODER = Decoder(ImageTransform(size=32, channels=3), RecordLimits())
RUNNER = CliRunner()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "growclip_daemon.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_produce_shards_from_a_local_folder(broker: str, topic: str, tmp_path: Path) -> None:
    records = list(itertools.islice(iter_records("tuxpaint", seed=5), 30))
    write_parquet_shards(records[:20], str(tmp_path), per_shard=8, row_group_rows=3)
    write_tar_shards(records[20:], str(tmp_path / "more"), per_shard=10)
    # rows that are not records: no caption, bytes that are not an image
    bad = {"key": ["bad-1", "bad-2"], "caption": [None, "noise"], "png": [records[0].image, b"noise"]}
    pq.write_table(pa.table(bad), tmp_path / "zz-bad.parquet")

    proc = cli(
        "produce", "--bootstrap", broker, "--topic", topic, "--shards", str(tmp_path), "--format", "binary"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "topic": topic,
        "records": 30,
        "skipped": {"missing_field": 1, "not_an_image": 1},
        "failed_shards": {},
    }
    samples = [DECODER(m) for m in consume_topic(broker, topic, 30)]
    # shard order: 00000..00002.parquet, more/00000.tar, zz-bad.parquet
    assert [(s.id, s.caption) for s in samples] == [(r.id, r.caption) for r in records]


def test_produce_shards_from_memory_with_limit(broker: str, topic: str) -> None:
    records = list(itertools.islice(iter_records("emoji", seed=1), 40))
    url = f"memory://produce-cli-{topic}"
    write_tar_shards(records, url, per_shard=16)
    result = RUNNER.invoke(
        app, ["produce", "--bootstrap", broker, "--topic", topic, "--shards", url, "--limit", "25"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["records"] == 25
    msgs = consume_topic(broker, topic, 25)
    assert all(not any(k == "content-type" for k, _ in m.headers) for m in msgs)  # the JSON format
    assert [DECODER(m).id for m in msgs] == [r.id for r in records[:25]]


def test_produce_shards_reports_unreadable_shards(broker: str, topic: str, tmp_path: Path) -> None:
    records = list(itertools.islice(iter_records("fashion-mnist", seed=2), 5))
    write_parquet_shards(records, str(tmp_path), per_shard=5)
    (tmp_path / "00001.parquet").write_bytes(b"not parquet at all")
    result = RUNNER.invoke(
        app, ["produce", "--bootstrap", broker, "--topic", topic, "--shards", str(tmp_path)]
    )
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["records"] == 5 and list(out["failed_shards"]) == ["00001.parquet"]
    assert len(consume_topic(broker, topic, 5)) == 5


@pytest.mark.parametrize(
    ("dataset", "fmt"), [("tuxpaint", "json"), ("emoji", "binary"), ("openclipart", "json")]
)
def test_produce_new_datasets(broker: str, topic: str, dataset: str, fmt: str) -> None:
    result = RUNNER.invoke(
        app,
        [
            "produce",
            "--bootstrap",
            broker,
            "--topic",
            topic,
            "--dataset",
            dataset,
            "--limit",
            "40",
            "--format",
            fmt,
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"topic": topic, "records": 40}
    expected: list[Record] = list(itertools.islice(iter_records(dataset), 40))
    samples = [DECODER(m) for m in consume_topic(broker, topic, 40)]
    assert [(s.id, s.caption) for s in samples] == [(r.id, r.caption) for r in expected]
    assert not any(in_test_split(s.id) for s in samples)  # the train split: test stays reserved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --dataset and --shards"),
        (["--dataset", "emoji", "--shards", "/tmp"], "exactly one of --dataset and --shards"),
        (["--dataset", "no-such"], "unknown dataset"),
        (["--shards", "/tmp", "--split", "test"], "apply to --dataset"),
        (["--shards", "/tmp", "--seed", "3"], "apply to --dataset"),
        (["--dataset", "emoji", "--format", "avro"], "--format must be json or binary"),
        (["--shards", "/nonexistent/shards"], "no .parquet or .tar shards"),
    ],
)
def test_produce_rejects_bad_arguments(args: list[str], message: str) -> None:
    # no broker is contacted: the arguments are checked first
    result = RUNNER.invoke(app, ["produce", "--bootstrap", "127.0.0.1:1", "--topic", "t", *args])
    assert result.exit_code == 2
    assert message in result.stderr
