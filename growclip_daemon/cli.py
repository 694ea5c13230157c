"""`growclip-daemon`: start, stop, status, produce, eval, export."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from growclip_daemon.config import ConfigError, DaemonConfig, check_runtime, load_config

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Online, self-growing CLIP training and serving."
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: key.path=value (repeatable).")
]


def _config(config: Path | None, overrides: list[str] | None) -> DaemonConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


@app.command()
def start(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT, then stop cleanly."""
    from growclip_daemon.engine import Daemon
    from growclip_daemon.logs import setup_logging

    cfg = _config(config, set_)
    try:
        check_runtime(cfg)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    setup_logging(cfg.log_level, cfg.log_format)
    raise typer.Exit(Daemon(cfg).run())


@app.command()
def stop(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean exit.")] = 120.0,
) -> None:
    """Signal a running daemon (through its pidfile) and wait for its clean exit."""
    cfg = _config(config, set_)
    try:
        pid = int(cfg.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        typer.echo(f"no running daemon (no pidfile at {cfg.pidfile})", err=True)
        raise typer.Exit(1) from None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        typer.echo(f"daemon {pid} is not running; removing stale pidfile", err=True)
        cfg.pidfile.unlink(missing_ok=True)
        raise typer.Exit(1) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            typer.echo(f"daemon {pid} stopped")
            return
        time.sleep(0.2)
    typer.echo(f"daemon {pid} did not stop within {timeout:.0f}s", err=True)
    raise typer.Exit(1)


def serve_url(cfg: DaemonConfig) -> str:
    """The base URL a daemon started with ``cfg`` answers status on: its control listener where it
    has one (it answers while the main port is flooded), else the HTTP API's port."""
    host = cfg.serve.host
    if host in ("0.0.0.0", "", "::"):  # listening everywhere: ask it on loopback
        host = "127.0.0.1" if host != "::" else "::1"
    if ":" in host:
        host = f"[{host}]"
    port = cfg.serve.control_port if cfg.serve.control_port is not None else cfg.serve.port
    return f"http://{host}:{port}"


@app.command()
def status(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    url: Annotated[
        str | None,
        typer.Option(
            help=(
                "Base URL of the daemon's HTTP API (default: serve.host and serve.control_port, "
                "else serve.port, of the config)."
            )
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print GET /v1/model as JSON.")] = False,
) -> None:
    """Print the daemon's state: model, training, source lag, growth history, serving, drift, evaluation."""
    from growclip_daemon.status_text import render_status

    base = url or serve_url(_config(config, set_))
    try:
        resp = httpx.get(f"{base.rstrip('/')}/v1/model", timeout=10)
    except httpx.HTTPError as err:
        typer.echo(f"error: cannot reach {base}: {err}", err=True)
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        typer.echo(f"error: {base} answered {resp.status_code}: {resp.text}", err=True)
        raise typer.Exit(1)
    if as_json:
        json.dump(resp.json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        typer.echo(render_status(resp.json()))


@app.command("eval")
def eval_(
    checkpoint: Annotated[
        str,
        typer.Option(
            help="A checkpoint: its step folder, or a checkpoint root (its LATEST), on any fsspec URL."
        ),
    ],
    suite: Annotated[
        list[str] | None,
        typer.Option(
            help="Evaluate this suite of evaluation.suites (repeatable; default: every enabled one)."
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a stored model on the evaluation suites; prints JSON metrics.

    Exit code 1 when a suite could not be evaluated (its error is in the JSON), 2 for bad arguments.
    """
    from growclip_stream.checkpoint import CheckpointError, load_checkpoint
    from growclip_stream.data.records import RecordLimits
    from growclip_stream.evaluation import decode_suite, evaluate, read_suite

    cfg = _config(config, set_)
    suites = cfg.evaluation.suites
    unknown = [name for name in suite or () if name not in suites]
    if unknown:
        typer.echo(f"error: unknown suite {', '.join(unknown)}; configured: {', '.join(suites)}", err=True)
        raise typer.Exit(2)
    chosen = suite or [name for name, s in suites.items() if s.enabled]
    try:
        ckpt = load_checkpoint(checkpoint)
    except (CheckpointError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    model, arch = ckpt.model.eval(), ckpt.model.arch
    generation = ckpt.generation
    results: dict[str, object] = {}
    errors: dict[str, str] = {}
    limits = RecordLimits(max_image_pixels=cfg.data.max_image_pixels)
    for name in chosen:
        try:
            data = decode_suite(read_suite(suites[name]), arch.image_size, arch.channels, limits)
            results[name] = evaluate(model, suites[name], data, cfg.evaluation.batch_size).to_dict()
        except Exception as err:  # one suite's missing data must not hide the others' results
            errors[name] = f"{type(err).__name__}: {err}"
    answer = {
        "checkpoint": ckpt.path,
        "model": f"growclip@{generation}.{ckpt.step}" + (f".{run}" if (run := ckpt.run_id) else ""),
        "step": ckpt.step,
        "generation": generation,
        "suites": results,
    }
    if errors:
        answer["errors"] = errors
    typer.echo(json.dumps(answer, indent=2))
    if errors:
        raise typer.Exit(1)


@app.command()
def produce(
    bootstrap: Annotated[str, typer.Option(help="Kafka bootstrap HOST:PORT.")],
    topic: Annotated[str, typer.Option(help="Topic to publish to (created if missing).")],
    dataset: Annotated[
        str | None,
        typer.Option(help="Dataset to publish: fashion-mnist, tuxpaint, emoji or openclipart."),
    ] = None,
    shards: Annotated[
        str | None,
        typer.Option(
            help="Publish the rows of parquet/tar shards at this fsspec URL (a shard, folder or glob)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
    rate: Annotated[
        float | None, typer.Option(help="Records per second (default: as fast as possible).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="json or binary.")] = "json",
    split: Annotated[
        str | None,
        typer.Option(help="Dataset split (default train); the test split is reserved for evaluation."),
    ] = None,
    repeat: Annotated[bool, typer.Option(help="Loop over the dataset forever (ids stay unique).")] = False,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the order and caption choice (default 0).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Daemon config whose kafka.security (TLS/SASL) to connect with."),
    ] = None,
) -> None:
    """Publish image-text records to Kafka (demos, tests, backfills): a dataset, or the rows of shards.

    Prints JSON: the topic and the records sent.

    With --shards also the rows skipped by reason (e.g. no caption) and unreadable shards (exit 1).
    """
    from growclip_stream.data.datasets import DATASETS

    def fail(message: str) -> NoReturn:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    if (dataset is None) == (shards is None):
        fail("give exactly one of --dataset and --shards")
    if format not in ("json", "binary"):
        fail(f"--format must be json or binary, not {format!r}")
    if dataset is not None and dataset not in DATASETS:
        fail(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if split is not None and split not in ("train", "test"):
        fail(f"--split must be train or test, not {split!r}")
    if shards is not None and (split is not None or repeat or seed is not None):
        fail("--split, --repeat and --seed apply to --dataset, not to --shards")
    try:
        security = _config(config, None).kafka.client_security() if config is not None else {}
    except ValueError as err:  # a secret's environment variable is not set
        fail(str(err))
    if dataset is not None:
        _produce_dataset(
            bootstrap, topic, dataset, split or "train", seed or 0, repeat, limit, rate, format, security
        )
    else:
        _produce_shards(bootstrap, topic, str(shards), limit, rate, format, security)


def _produce_dataset(
    bootstrap: str,
    topic: str,
    dataset: str,
    split: str,
    seed: int,
    repeat: bool,
    limit: int | None,
    rate: float | None,
    fmt: str,
    security: dict[str, Any],
) -> None:
    from growclip_stream.data.datasets import iter_records
    from growclip_stream.data.produce import ensure_topics
    from growclip_stream.data.produce import produce as produce_records

    try:
        records = iter_records(dataset, split=split, seed=seed, repeat=repeat)  # type: ignore[arg-type]
    except FileNotFoundError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    ensure_topics(bootstrap, [topic, f"{topic}.dlq"], security=security)
    sent = produce_records(bootstrap, topic, records, fmt=fmt, rate=rate, limit=limit, security=security)  # type: ignore[arg-type]
    typer.echo(json.dumps({"topic": topic, "records": sent}))


def _produce_shards(
    bootstrap: str,
    topic: str,
    url: str,
    limit: int | None,
    rate: float | None,
    fmt: str,
    security: dict[str, Any],
) -> None:
    from collections import Counter

    from growclip_stream.data.produce import ensure_topics
    from growclip_stream.data.produce import produce as produce_records
    from growclip_stream.data.shards import ShardSource, iter_shard_records

    try:
        source = ShardSource(url)
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    skipped: Counter[str] = Counter()
    with source:
        ensure_topics(bootstrap, [topic, f"{topic}.dlq"], security=security)
        records = iter_shard_records(source, skipped)
        sent = produce_records(bootstrap, topic, records, fmt=fmt, rate=rate, limit=limit, security=security)  # type: ignore[arg-type]
        failed = source.state_dict()["failed"]
    typer.echo(
        json.dumps(
            {
                "topic": topic,
                "records": sent,
                "skipped": dict(sorted(skipped.items())),
                "failed_shards": failed,
            }
        )
    )
    if failed:
        raise typer.Exit(1)


@app.command()
def export(
    checkpoint: Annotated[
        str,
        typer.Option(
            help="Checkpoint root (its newest checkpoint) or one checkpoint folder; any fsspec URL."
        ),
    ],
    format: Annotated[str, typer.Option("--format", help="safetensors, onnx or open_clip.")],
    out: Annotated[
        Path, typer.Option(help="Where to write: a .safetensors file, or a folder (onnx, open_clip).")
    ],
) -> None:
    """Export a checkpoint for other tools; prints JSON: format, step, the files written.

    safetensors reloads with growclip_stream.export.load_exported; onnx writes the image and text
    encoders (dynamic batch); open_clip writes what OpenCLIP's create_model("local-dir:OUT") loads,
    and refuses, with the reason, architectures OpenCLIP cannot express.
    """
    from growclip_stream.checkpoint import CheckpointError
    from growclip_stream.export import ExportError, export_checkpoint

    try:
        summary = export_checkpoint(checkpoint, format, out)
    except (ExportError, CheckpointError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(summary))


if __name__ == "__main__":
    app()
