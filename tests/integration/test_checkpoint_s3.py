"""Checkpoints on a real S3-compatible server (moto's): new folder per save, LATEST last, fallback,
retention, and a fresh client (no listing cache, as after a restart) reading what the first wrote."""

from __future__ import annotations

import pytest
import torch

from growclip_stream.checkpoint import CheckpointStore
from growclip_stream.model import GrowCLIP
from tests.helpers import create_bucket, s3_options, tiny_arch


@pytest.mark.slow
def test_checkpoints_on_s3_never_rewrite_fall_back_and_prune(s3_endpoint: str) -> None:
    url = f"s3://{create_bucket(s3_endpoint, 'ckpt')}/growclip"
    options = s3_options(s3_endpoint)
    store = CheckpointStore(url, keep=2, storage_options=options)
    assert store.load_latest() is None
    torch.manual_seed(0)
    model = GrowCLIP(tiny_arch())
    paths = [
        store.save(model, None, step=step, samples=step, growth={"history": []}, source={"row": step})
        for step in (5, 5, 6)  # two saves at one step: two folders
    ]
    assert len(set(paths)) == 3 and store.latest() == paths[-1]
    names = [e.name for e in store.entries()]
    assert names == ["00000002-g0-s000000000005", "00000003-g0-s000000000006"]  # keep=2 pruned the first

    store.fs.rm(f"{paths[-1]}/model.safetensors")  # the newest is damaged (a killed upload)
    fresh = CheckpointStore(url, keep=2, storage_options={**options, "skip_instance_cache": True})
    loaded = fresh.load()
    assert loaded.path == paths[1] and loaded.manifest["source"] == {"row": 5}
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                  model.state_dict().values(), strict=True))  # fmt: skip
    again = fresh.save(model, None, step=7, samples=7, growth={"history": []}, source={"row": 7})
    assert again.endswith("00000004-g0-s000000000007")
    assert CheckpointStore(url, storage_options=options).load().path == again
