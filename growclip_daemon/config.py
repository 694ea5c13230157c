"""The daemon's one configuration schema: each component's config composed, validated at start.

Loaded from YAML, then `--set key.path=value` overrides (values parsed as YAML scalars). Unknown
keys are rejected and every error names the offending field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from growclip_stream.data.kafka_security import check_security, client_options
from growclip_stream.data.kafka_source import KafkaSourceConfig
from growclip_stream.evaluation import DEFAULT_SUITES, SuiteConfig
from growclip_stream.growth.config import GrowthConfig
from growclip_stream.model import ArchConfig, TowerConfig
from growclip_stream.train.config import TrainConfig
from growclip_stream.train.loop import LoopConfig
from growclip_stream.train.step import DeviceUnavailable, check_device


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class KafkaSettings(KafkaSourceConfig):
    """The Kafka source's settings (``KafkaSourceConfig``, defaults there) and the daemon's own keys.

    ``security`` here holds kafka-python's TLS/SASL keys as written in the config: secrets only by
    environment variable name (``sasl_plain_password_env``, ``ssl_password_env``);
    :meth:`client_security` resolves them for the clients (consumer, producers, admin)."""

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by the config validation

    # ``bootstrap`` is ignored when embedded: the embedded broker's address is used
    embedded: bool = False  # start the bundled Tansu broker on loopback as a child process
    embedded_port: int = 0  # 0 = a free port
    topic_partitions: int = 1  # used when the daemon creates the topic (and its dead letter)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.embedded_port <= 65535:
            raise ValueError(f"embedded_port must be in [0, 65535], got {self.embedded_port}")
        if self.topic_partitions < 1:
            raise ValueError(f"topic_partitions must be >= 1, got {self.topic_partitions}")
        if self.session_timeout_ms < 1000 or self.heartbeat_interval_ms < 100 or self.max_poll_records < 1:
            raise ValueError(
                "need session_timeout_ms >= 1000, heartbeat_interval_ms >= 100 and max_poll_records >= 1"
            )
        try:
            check_security(self.security)
        except ValueError as err:  # pydantic reports the whole section; name the field
            raise ValueError(f"kafka.security: {err}") from None

    def client_security(self) -> dict[str, Any]:
        """kafka-python keyword arguments, secrets read from the environment (raises if one is unset)."""
        return client_options(self.security)

    def source_config(self, bootstrap: str) -> KafkaSourceConfig:
        """The source's own settings, with the broker's actual address and resolved security."""
        own = {f.name: getattr(self, f.name) for f in fields(KafkaSourceConfig)}
        return KafkaSourceConfig(**{**own, "bootstrap": bootstrap, "security": self.client_security()})


class ShardSettings(Strict):
    """Shards through fsspec (img2dataset-style parquet, webdataset tar) instead of Kafka."""

    url: str | None = None  # a shard, a prefix/folder of shards or a glob, on any fsspec URL
    watch: bool = False  # keep listing the prefix for new shards
    poll_interval_s: float = Field(10.0, gt=0)  # how often a watched prefix is listed again
    dead_letter: str | None = (
        None  # JSON-lines file for bad rows; default: _dead_letter.jsonl beside the shards
    )
    # fsspec storage options for the shards and the dead letter, e.g. {"endpoint_url": ...} for an
    # S3-compatible store; credentials usually come from the environment (AWS_* variables)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class DataSettings(Strict):
    decode_workers: int = Field(2, ge=0)  # parallel decode workers (0: decode in the pipeline's own thread)
    decode_method: Literal["process", "thread"] = "process"  # processes scale on CPU; threads share the GIL
    # process workers with records in flight and nothing decoded for this long are replaced; a record
    # that alone takes longer is dead-lettered (bad_image)
    decode_stall_timeout_s: float = Field(60.0, gt=0)
    max_message_bytes: int = Field(2_000_000, ge=1024)
    max_caption_chars: int = Field(1000, ge=1)
    max_image_pixels: int = Field(4_000_000, ge=64)


class ServeSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0 = a free port (tests)
    # A second listener with its own event loop thread for the control routes (health, readiness,
    # metrics, /v1/model, /v1/models, admin), so probes never queue behind embedding requests on the
    # main port's loop; None = the main port serves them alone. Point probes and scrapes at it.
    control_port: int | None = Field(None, ge=0, le=65535)
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_items: int = Field(256, ge=1)
    max_text_chars: int = Field(4096, ge=1)
    admin_token_env: str = "GROWCLIP_ADMIN_TOKEN"  # admin routes are disabled when this variable is unset
    # images: the per-image limits are data.max_image_pixels (and the 4096 side), as for ingest;
    # all images of one request together may claim at most this many pixels
    max_request_pixels: int = Field(16_000_000, ge=1)
    # dynamic batching: requests share forward passes of up to batch_max_items items: whatever
    # queued while the previous pass ran. batch_max_wait_ms > 0 makes a first request wait that
    # long for company (bigger batches, but a lone request pays the wait: at 1 client on 2 cores
    # 5 ms cut an idle daemon's throughput about 2.5x); false = one forward pass per request
    batching: bool = True
    batch_max_items: int = Field(64, ge=1)
    batch_max_wait_ms: float = Field(0.0, ge=0)
    queue_max_items: int = Field(1024, ge=1)  # items queued per modality; past that, 429
    queue_timeout_s: float = Field(10.0, gt=0)  # a request that would wait longer gets 503
    batch_threads: int = Field(1, ge=1)  # intra-op threads of each batcher (text, image)
    # How long a thread may hold the GIL before another that waits for it gets a turn (Python's
    # sys.setswitchinterval, 5 ms by default). The trainer holds the GIL between its kernels and the
    # HTTP loop needs it several times per request; on 2 cores 1 and 0.5 ms measured no gain
    # (bench/README.md, "GIL switch interval"), so None (Python's) is the default.
    gil_switch_interval_ms: float | None = Field(None, gt=0)
    keep_versions: int = Field(2, ge=1)  # model generations held for pinning (growclip@N), current included
    # embedding drift: this many reserved test images and captions of drift_probe_dataset are
    # embedded by every measured version (0 = off)
    drift_probe_size: int = Field(256, ge=0)
    drift_probe_dataset: str = "fashion-mnist"
    drift_interval_s: float = Field(30.0, ge=0)  # between drift measurements within a generation


class ProducerSettings(Strict):
    """An in-process producer streaming a real dataset into the topic (the demo's data firehose)."""

    enabled: bool = False
    dataset: str = "fashion-mnist"
    rate: float = Field(200.0, gt=0)  # records per second
    limit: int | None = Field(None, ge=1)
    format: Literal["json", "binary"] = "json"


class CheckpointSettings(Strict):
    root: str = ".state/checkpoints"  # any fsspec URL; resumed from at start when it holds one
    keep: int = Field(3, ge=1)  # newest checkpoints kept (plus the last one before each growth)
    every_s: float = Field(300, ge=0)  # save in the background this often while training moves; 0 = off
    every_steps: int = Field(0, ge=0)  # and/or every this many trainer steps; 0 = off


SUITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Suite names: they become metric label values, JSON keys and `--set` path parts (no dots)."""


class EvaluationSettings(Strict):
    """Evaluation of the published model in its own thread (zero-shot top-1, retrieval recall@k)."""

    enabled: bool = True
    every_steps: int = Field(200, ge=1)  # at most this often (trainer steps); also after every growth
    torch_threads: int = Field(1, ge=1)  # intra-op threads of the evaluator's thread only
    batch_size: int = Field(256, ge=1)  # images or texts per forward pass
    # suite name -> suite; merged key by key with the defaults (fashion-mnist, tuxpaint, emoji), so a
    # config adds a suite by naming it and turns a default off with `enabled: false`
    suites: dict[str, SuiteConfig] = Field(default_factory=lambda: dict(DEFAULT_SUITES))

    @field_validator("suites")
    @classmethod
    def _names(cls, suites: dict[str, SuiteConfig]) -> dict[str, SuiteConfig]:
        bad = [name for name in suites if not SUITE_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"suite names must match {SUITE_NAME.pattern}: {', '.join(map(repr, bad))}")
        return suites


def _default_arch() -> ArchConfig:
    return ArchConfig(
        image=TowerConfig(width=32, depth=1, mlp_hidden=64),
        text=TowerConfig(width=32, depth=1, mlp_hidden=64),
        shared=TowerConfig(width=32, depth=0, mlp_hidden=64),
    )


class DaemonConfig(Strict):
    model: ArchConfig = Field(default_factory=_default_arch)  # the initial architecture (a checkpoint's wins)
    train: TrainConfig = TrainConfig()
    loop: LoopConfig = LoopConfig()
    growth: GrowthConfig = GrowthConfig()
    data: DataSettings = DataSettings()
    source: Literal["kafka", "shards"] = "kafka"  # where the records come from
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    shards: ShardSettings = ShardSettings()
    serve: ServeSettings = ServeSettings()
    producer: ProducerSettings = ProducerSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    pidfile: Path = Path(".state/growclip-daemon.pid")  # its folder also holds locks and the broker log
    # a per-record audit trail (a local JSON-lines file), durable together with each checkpoint;
    # for tests and investigations (growclip_daemon/audit.py)
    audit_log: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _consistent(self) -> DaemonConfig:
        if self.source == "shards" and not self.shards.url:
            raise ValueError("source is 'shards' but shards.url is not set")
        if self.source == "shards" and self.producer.enabled:
            raise ValueError("producer.enabled streams into Kafka; it does not apply with source 'shards'")
        if self.kafka.embedded and self.kafka.security:
            raise ValueError("kafka.security is for an external cluster; the embedded broker is plaintext")
        if self.kafka.heartbeat_interval_ms * 3 > self.kafka.session_timeout_ms:
            raise ValueError(
                "kafka.heartbeat_interval_ms must be at most a third of kafka.session_timeout_ms"
            )
        return self


class ConfigError(ValueError):
    """A config that cannot be used; the message names every bad field."""


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key.path=value, got {item!r}")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {item!r}")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: sections merge key by key, anything else in `top` replaces what `base` had."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def check_runtime(cfg: DaemonConfig) -> None:
    """What a config can only be checked against on the machine that runs it: the training device.

    `load_config` validates a file anywhere (a GPU config validates on a laptop); the daemon calls
    this at start, so a missing device is one clear error instead of a failure deep in start-up.
    """
    try:
        check_device(cfg.train.device)
    except DeviceUnavailable as err:
        raise ConfigError(f"train.device: {err}") from None


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DaemonConfig:
    """Defaults, deep-merged with the YAML file, then with each `--set` override, validated as a whole."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = loaded or {}
    for item in overrides:
        _set_path(tree, *parse_override(item))
    try:
        return DaemonConfig.model_validate(_merge(DaemonConfig().model_dump(), tree))
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"{loc}: {e['msg']}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
