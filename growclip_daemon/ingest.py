"""Where records come from: the source, its dead letter and the decode pipeline, built from the config.

The rest of the daemon sees them only through the loop's ``Source`` and ``DeadLetter`` protocols,
so nothing downstream depends on whether the records come from Kafka or from shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from growclip_daemon.config import DaemonConfig
from growclip_stream.data.decode import DecodePipeline
from growclip_stream.data.images import ImageTransform
from growclip_stream.data.kafka_source import KafkaDeadLetter, KafkaSource
from growclip_stream.data.pipeline import Decoder
from growclip_stream.data.produce import ensure_topics
from growclip_stream.data.records import RecordLimits
from growclip_stream.data.shards import ShardDeadLetter, ShardSource, dead_letter_url
from growclip_stream.train.loop import DeadLetter, Source

log = logging.getLogger(__name__)


@dataclass
class Ingest:
    """The source, its dead letter and the decode pipeline; closed together, pipeline first."""

    source: Source
    dead_letter: DeadLetter
    pipeline: DecodePipeline[Any]
    kind: str  # "kafka" or "shards": a metrics label
    name: str  # the topic or the shard URL, for the status
    lag_topic: str | None  # the topic Kafka lag is labelled with; None for shards

    def close(self) -> None:
        """Stops decoding, then sends what the dead letter still holds, then closes the source."""
        try:
            self.pipeline.close()
        finally:
            try:
                self.dead_letter.close()
            finally:
                self.source.close()


def open_ingest(cfg: DaemonConfig, bootstrap: str) -> Ingest:
    """Opens the configured source and dead letter and starts the decode pipeline."""
    source, dead_letter = _open_source(cfg, bootstrap)
    try:
        arch = cfg.model
        pipeline: DecodePipeline[Any] = DecodePipeline(
            Decoder(
                ImageTransform(arch.image_size, arch.channels),
                RecordLimits(
                    max_message_bytes=cfg.data.max_message_bytes,
                    max_caption_chars=cfg.data.max_caption_chars,
                    max_image_pixels=cfg.data.max_image_pixels,
                ),
            ),
            cfg.loop.holdout_fraction,
            num_workers=cfg.data.decode_workers,
            method=cfg.data.decode_method,
            max_in_flight=4 * cfg.train.batch_size,
            stall_timeout_s=cfg.data.decode_stall_timeout_s,
        )
        pipeline.start()
    except BaseException:
        dead_letter.close()
        source.close()
        raise
    if cfg.source == "shards":
        return Ingest(source, dead_letter, pipeline, "shards", str(cfg.shards.url), None)
    return Ingest(source, dead_letter, pipeline, "kafka", cfg.kafka.topic, cfg.kafka.topic)


def _open_source(cfg: DaemonConfig, bootstrap: str) -> tuple[Source, DeadLetter]:
    if cfg.source == "shards":
        shards = cfg.shards
        if shards.url is None:
            raise ValueError("source is 'shards' but shards.url is not set")
        source = ShardSource(
            shards.url,
            watch=shards.watch,
            poll_interval_s=shards.poll_interval_s,
            storage_options=shards.storage_options,
        )
        dlq_url = shards.dead_letter or dead_letter_url(shards.url)
        return source, ShardDeadLetter(dlq_url, storage_options=shards.storage_options)
    kafka = cfg.kafka.source_config(bootstrap)  # the embedded broker's address, if any
    ensure_topics(
        bootstrap,
        [kafka.topic, f"{kafka.topic}.dlq"],
        partitions=cfg.kafka.topic_partitions,
        security=kafka.security,
    )
    return KafkaSource(kafka), KafkaDeadLetter(bootstrap, kafka.topic, security=kafka.security)
