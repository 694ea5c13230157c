"""`growclip-daemon eval` on a checkpoint written by the library's Checkpointer (real files)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from growclip_daemon.cli import app
from growclip_daemon.config import load_config
from growclip_stream.checkpoint import Checkpointer
from growclip_stream.data.records import RecordLimits
from growclip_stream.evaluation import decode_suite, evaluate, read_suite
from tests.helpers import DAEMON, random_model

SETTINGS = [
    "--set",
    "evaluation.suites.fashion-mnist.limit=80",
    "--set",
    "evaluation.suites.emoji.limit=40",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint root holding two steps of a model grown once (per its growth history)."""
    root = tmp_path_factory.mktemp("ckpt")
    saver = Checkpointer(str(root))
    arch = load_config().model
    growth = {"history": [{"trigger": "forced"}]}
    saver.save(random_model(arch, seed=1), None, step=40, samples=4000, growth=growth, source={})
    saver.save(random_model(arch, seed=2), None, step=90, samples=9000, growth=growth, source={})
    return root


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed command line, in its own process."""
    return subprocess.run([*DAEMON, "eval", *args], capture_output=True, text=True, timeout=300, check=False)


def invoke(*args: str) -> tuple[int, str, str]:
    """The same command in this process (torch is already imported): exit code, stdout, stderr."""
    result = CliRunner().invoke(app, ["eval", *args])
    return result.exit_code, result.stdout, result.stderr


def test_eval_prints_the_metrics_of_the_stored_model(checkpoint: Path) -> None:
    done = run("--checkpoint", str(checkpoint), "--suite", "fashion-mnist", "--suite", "emoji", *SETTINGS)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["checkpoint"].endswith("00000002-g1-s000000000090")  # a root means its newest checkpoint
    assert answer["model"] == "growclip@1.90" and answer["step"] == 90
    assert set(answer["suites"]) == {"fashion-mnist", "emoji"} and "errors" not in answer

    # the same numbers as the library computes on the loaded model
    ckpt = Checkpointer(str(checkpoint)).load()
    cfg = load_config(None, [s for s in SETTINGS if s != "--set"])
    for name, result in answer["suites"].items():
        suite = cfg.evaluation.suites[name]
        data = decode_suite(read_suite(suite), 28, 1, RecordLimits())
        expected = evaluate(ckpt.model.eval(), suite, data).to_dict()
        tolerance = 1.5 / expected["samples"]  # one near-tied image may flip under another thread count
        assert result["samples"] == expected["samples"] and result["task"] == suite.task
        if suite.task == "zeroshot":
            assert result["top1"] == pytest.approx(expected["top1"], abs=tolerance)
        else:
            for direction, by_k in expected["recall"].items():
                assert by_k.keys() == {"1", "5", "10"}
                for k, value in by_k.items():
                    assert result["recall"][direction][k] == pytest.approx(value, abs=tolerance)


def test_eval_of_a_step_folder_and_its_errors(checkpoint: Path, tmp_path: Path) -> None:
    code, out, err = invoke(
        "--checkpoint", str(checkpoint / "00000001-g1-s000000000040"), "--suite", "fashion-mnist", *SETTINGS
    )
    assert code == 0, err
    assert json.loads(out)["model"] == "growclip@1.40"

    code, _, err = invoke("--checkpoint", str(checkpoint), "--suite", "imagenet")
    assert code == 2 and "unknown suite imagenet" in err
    code, _, err = invoke("--checkpoint", str(tmp_path / "none"))
    assert code == 2 and "no checkpoint" in err

    # an operator's suite whose folder is missing: reported, exit 1, the other suite still evaluated
    code, out, _ = invoke(
        "--checkpoint",
        str(checkpoint),
        "--set",
        "evaluation.suites.mine.task=retrieval",
        "--set",
        f"evaluation.suites.mine.folder={tmp_path / 'missing'}",
        "--suite",
        "mine",
        "--suite",
        "fashion-mnist",
        *SETTINGS,
    )
    assert code == 1
    answer = json.loads(out)
    assert "not found" in answer["errors"]["mine"] and set(answer["suites"]) == {"fashion-mnist"}
