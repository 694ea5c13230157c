"""The daemon's checkpoints: a failing periodic save never stops training, the next one succeeds
once the store is back, and a restart resumes the reservoirs under a new version string."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from growclip_stream.data.datasets import iter_records
from growclip_stream.data.shards import write_parquet_shards
from tests.helpers import Daemon


def metric(daemon: Daemon, name: str) -> float:
    try:
        text = daemon.client.get("/metrics").text
    except httpx.HTTPError:  # not serving yet
        return 0.0
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def training(daemon: Daemon) -> dict | None:
    status = daemon.get("/v1/model")
    return status["training"] if status and "step" in status.get("training", {}) else None


def start(tmp: Path, shards: Path, root: Path) -> Daemon:
    return Daemon(
        tmp,
        "source=shards",
        f"shards.url={shards}",
        "shards.watch=true",  # keeps running once the shards are read
        "shards.poll_interval_s=0.5",
        "growth.enabled=false",
        "train.batch_size=16",
        "loop.replay_capacity=300",
        "loop.holdout_fraction=0.05",
        "checkpoint.every_s=1",
        f"checkpoint.root={root}",
    )


@pytest.mark.slow
def test_failing_periodic_checkpoints_never_stop_training_and_a_restart_resumes_the_reservoirs(
    tmp_path: Path,
) -> None:
    shards = tmp_path / "shards"
    write_parquet_shards(itertools.islice(iter_records("fashion-mnist", seed=3), 300), str(shards), 300)
    store, away = tmp_path / "store", tmp_path / "store.away"
    root = store / "ckpt"
    root.mkdir(parents=True)

    daemon = start(tmp_path, shards, root)
    try:
        daemon.wait_for(lambda: training(daemon), 180, "training to start")
        store.rename(away)  # the store goes away: a file where its folder was makes every write fail
        store.write_text("not a folder")
        daemon.wait_for(lambda: metric(daemon, "growclip_checkpoint_failures_total") >= 1, 180, "a failure")
        step = training(daemon)["step"]  # type: ignore[index]
        # new data only now, so "training goes on" cannot be the first shard's last steps (on a slow
        # machine the first failure is counted after the first shard is trained); renamed into the
        # watched folder whole, so the source never reads it half-written
        write_parquet_shards(
            itertools.islice(iter_records("fashion-mnist", seed=4), 300), str(tmp_path / "more"), 300,
            first_index=1,
        )  # fmt: skip
        (tmp_path / "more" / "00001.parquet").rename(shards / "00001.parquet")
        daemon.wait_for(lambda: (t := training(daemon)) and t["step"] >= step + 5, 180, "training to go on")
        assert training(daemon)["state"] == "running"  # type: ignore[index]

        store.unlink()  # the store is back: the next periodic save succeeds
        away.rename(store)
        back = time.time()
        daemon.wait_for(
            lambda: metric(daemon, "growclip_checkpoint_last_success_timestamp_seconds") > back,
            120,
            "a periodic checkpoint after the store came back",
        )
        daemon.wait_for(
            lambda: (s := daemon.get("/v1/model")) and len(s["source"]["positions"]["completed"]) == 2,
            180,
            "every shard read",
        )
        first_version = daemon.get("/v1/model")["version"]
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    log = daemon.log_path.read_text()
    assert "checkpoint failed; training goes on and the next save tries again" in log
    assert '"reason": "periodic"' in log and "checkpoint committed" in log
    latest = (root / "LATEST").read_text().strip()
    manifest = json.loads((root / latest / "manifest.json").read_text())
    assert manifest["run"]["reason"] == "shutdown"
    saved = load_file(str(root / latest / "loop.safetensors"))
    replay_saved, holdout_saved = len(saved["replay/images"]), len(saved["holdout/images"])
    recent_saved = len(saved["recent/images"])
    assert replay_saved > 0 and holdout_saved > 0 and recent_saved > 0

    # restart on the same root: every shard was read, so the reservoirs can only come from the checkpoint
    daemon = start(tmp_path, shards, root)
    try:
        resumed = daemon.wait_for(
            lambda: (s := daemon.get("/v1/model")) and s.get("training", {}).get("step") is not None and s,
            180,
            "the resumed model",
        )
        assert resumed["training"]["step"] == manifest["step"]
        assert resumed["training"]["replay_samples"] == replay_saved
        assert resumed["training"]["held_out_records"] == holdout_saved
        assert resumed["training"]["recent_samples"] == recent_saved  # a search right away has data
        generation, step, run = resumed["version"].split(".")
        assert (int(generation), int(step)) == (0, manifest["step"])
        assert resumed["version"] != first_version and run != manifest["run"]["id"]
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
