"""A configured device that is not present stops `growclip-daemon start` with one clear line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from growclip_daemon.config import ConfigError, check_runtime, load_config
from tests.helpers import DAEMON


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_start_on_a_missing_gpu_fails_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *DAEMON,
            "start",
            "--set",
            "train.device=cuda",
            "--set",
            f"pidfile={tmp_path / 'pid'}",
            "--set",
            f"checkpoint.root={tmp_path / 'ckpt'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "train.device" in proc.stderr and "no CUDA device is present" in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not (tmp_path / "pid").exists()  # stopped before anything started


def test_check_runtime() -> None:
    check_runtime(load_config(None, ["train.device=cpu"]))
    cfg = load_config(None, ["train.device=cuda:0"])  # validates anywhere: the device is checked at start
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train\.device"):
            check_runtime(cfg)
    with pytest.raises(ConfigError, match="not a torch device"):
        load_config(None, ["train.device=gpu"])
