"""The daemon on fsspec shards, local and on S3 (moto's server): trains them, dead-letters bad
rows beside them, resumes at (shard, row), picks up new shards under a watched prefix."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.records import Record, is_held_out
from growclip_stream.data.shards import read_dead_letter, write_parquet_shards, write_tar_shards
from tests.helpers import Daemon, create_bucket, s3_options

HOLDOUT = 0.05


def start(tmp: Path, shards: str, options: dict[str, Any]) -> Daemon:
    settings = [f"shards.storage_options.{k}={v}" for k, v in options.items() if k != "client_kwargs"]
    settings += [
        f"shards.storage_options.client_kwargs.{k}={v}" for k, v in options.get("client_kwargs", {}).items()
    ]
    return Daemon(
        tmp,
        "source=shards",
        f"shards.url={shards}",
        "shards.watch=true",
        "shards.poll_interval_s=0.5",
        *settings,
        "growth.enabled=false",
        "train.batch_size=32",
        f"loop.holdout_fraction={HOLDOUT}",
    )


def wait_completed(daemon: Daemon, shards: int) -> None:
    def done() -> bool:
        status = daemon.get("/v1/model")
        return bool(status) and len(status["source"]["positions"].get("completed", [])) >= shards

    daemon.wait_for(done, 120, f"{shards} shards read")


@pytest.mark.slow
@pytest.mark.parametrize("store", ["local", "s3"])
def test_shards_train_dead_letter_and_resume(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    if store == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        shards, options = f"s3://{create_bucket(endpoint, 'shards')}/train", s3_options(endpoint)
    else:
        shards, options = str(tmp_path / "shards"), {}
    dead_letter = f"{shards}/_dead_letter.jsonl"
    good = list(itertools.islice(iter_records("fashion-mnist", seed=5), 400))
    bad = [Record(id="bad-image", caption="a broken picture", image=b"not an image at all")]
    # 2 parquet shards, one bad row
    write_parquet_shards(good[:200] + bad, shards, per_shard=101, storage_options=options)
    daemon = start(tmp_path, shards, options)
    try:
        wait_completed(daemon, 2)
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    first = daemon.manifest()
    trained_first = sum(not is_held_out(r.id, HOLDOUT) for r in good[:200])
    assert first["samples"] in (trained_first, trained_first - 1)
    dead = read_dead_letter(dead_letter, storage_options=options)
    assert [(d["key"], d["reason"]) for d in dead] == [("bad-image", "not_an_image")]

    # Restart: nothing is read twice; a new tar shard under the watched prefix is picked up.
    daemon = start(tmp_path, shards, options)
    try:
        write_tar_shards(good[200:], shards, per_shard=200, first_index=10, storage_options=options)
        wait_completed(daemon, 3)
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    second = daemon.manifest()
    trained_all = sum(not is_held_out(r.id, HOLDOUT) for r in good)
    assert second["samples"] in (trained_all, trained_all - 1, trained_all - 2)
    assert len(read_dead_letter(dead_letter, storage_options=options)) == 1
