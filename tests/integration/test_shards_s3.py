"""Shards and their dead letter on S3 (moto's server), through fsspec and s3fs."""

from __future__ import annotations

import itertools
import json

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.kafka_source import Message
from growclip_stream.data.shards import (
    ShardDeadLetter,
    ShardSource,
    read_dead_letter,
    write_parquet_shards,
    write_tar_shards,
)
from tests.helpers import create_bucket, s3_options


def test_s3_shards_resume_exactly_once(s3_endpoint: str) -> None:
    options = s3_options(s3_endpoint)
    url = f"s3://{create_bucket(s3_endpoint, 'shards')}/data"
    records = list(itertools.islice(iter_records("fashion-mnist", "test", seed=2), 90))
    write_parquet_shards(records[:50], url, per_shard=25, row_group_rows=10, storage_options=options)
    write_tar_shards(records[50:], url, per_shard=40, first_index=2, storage_options=options)
    src = ShardSource(url, storage_options=options)
    first: list[Message] = []
    while len(first) < 37:  # stop inside the second parquet shard
        first += src.poll(0.5, max_records=37 - len(first))
    state = json.loads(json.dumps(src.state_dict()))  # as a checkpoint manifest stores it
    src.close()
    resumed = ShardSource(url, storage_options=options)
    resumed.load_state_dict(state)
    rest: list[Message] = []
    while not resumed.finished:
        rest += resumed.poll(0.5)
    resumed.close()
    assert [m.value for m in first + rest] == [r.image for r in records]  # each row once, in order
    assert all(m.topic.startswith("s3://") for m in rest)


def test_s3_dead_letter_appends_across_flushes_and_instances(s3_endpoint: str) -> None:
    options = s3_options(s3_endpoint)
    url = f"s3://{create_bucket(s3_endpoint, 'dlq')}/bad/_dead_letter.jsonl"
    msg = Message("s3://b/00000.tar", 0, 5, b"\x00\x01", (("id", b"k"), ("caption", b"c")), -1)
    dlq = ShardDeadLetter(url, flush_every=1000, flush_interval_s=3600, storage_options=options)
    dlq.send(msg, "bad_image", "d")
    dlq.flush()
    dlq.send(msg, "too_large", "x")
    dlq.close()
    with ShardDeadLetter(url, storage_options=options) as again:
        again.send(msg, "bad_json", "y")
    entries = read_dead_letter(url, storage_options=options)
    assert [e["reason"] for e in entries] == ["bad_image", "too_large", "bad_json"]
    assert entries[0]["value_base64"] == "AAE=" and entries[2]["row"] == 5
