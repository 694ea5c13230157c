"""Every Prometheus series the daemon exports, on one injectable registry.

All our names carry the ``growclip_`` prefix (the standard ``process_*`` and ``python_*`` series
of prometheus_client's process, GC and platform collectors sit beside them) and follow the
Prometheus naming conventions: base units in the name (``_seconds``, ``_bytes``), ``_total`` on
counters and only on counters, and a help text on every family, so that ``promtool check metrics``
has nothing to say about them.

``Metrics()`` creates its own ``CollectorRegistry`` (never the process-global default), so two
instances, e.g. two daemons in one test process, never clash. Label values are kept to small,
bounded sets: routes are templates (not raw paths), ingest status is ``trained``, ``held_out`` or
a ``RecordError`` reason, Kafka lag is per assigned partition.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from growclip_stream.growth.controller import PHASES

if TYPE_CHECKING:
    from growclip_stream.evaluation import SuiteResult
    from growclip_stream.serving import ModelSnapshot

NAMESPACE = "growclip"

GROWTH_PHASES = PHASES
"""States of ``growclip_growth_phase`` (the growth controller's phases); the first is the initial state."""

GROWTH_TRIGGERS = ("plateau", "data_volume", "forced")
"""Known growth triggers, pre-created at zero so that ``rate()`` works from the first event."""

GROWTH_FAILURE_OUTCOMES = ("failed", "rolled_back")
"""Label values of ``growclip_growth_failures_total``, pre-created at zero."""

TOWERS = ("image", "text", "shared", "total")
"""Label values of ``growclip_model_parameters``."""

# Buckets, chosen for what each histogram measures on the machines we run on: a CPU training step
# takes tens of milliseconds to seconds, a GPU step a few milliseconds; an HTTP request from a
# sub-millisecond health check to a multi-second batch of 256 images on a busy CPU.
TRAIN_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HTTP_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Queue waits measured on 2 CPU cores (bench/serving.py): ~1-5 ms at low load (the batching window),
# tens to hundreds of ms with 32 clients, seconds only when a request is about to be refused.
QUEUE_WAIT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
MODALITIES = ("text", "image")
DRIFT_AGAINST = ("previous", "oldest")
REJECT_REASONS = ("queue_full", "deadline", "stopping")


class Metrics:
    """The product's metric families. Attributes are the prometheus_client objects themselves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = NAMESPACE

        # --- training ---------------------------------------------------------------------------
        self.train_samples = Counter(
            "train_samples", "Image-text pairs the trainer has trained on.", namespace=ns, registry=r
        )
        self.train_steps = Counter("train_steps", "Optimizer steps taken.", namespace=ns, registry=r)
        self.train_loss = Gauge(
            "train_loss", "Contrastive loss of the last training step.", namespace=ns, registry=r
        )
        self.train_step_seconds = Histogram(
            "train_step_duration_seconds",
            "Wall time of one training step (forward, backward, optimizer), data wait excluded.",
            namespace=ns,
            registry=r,
            buckets=TRAIN_STEP_BUCKETS,
        )
        self.train_throughput = Gauge(
            "train_samples_per_second",
            "Training throughput, smoothed over recent steps.",
            namespace=ns,
            registry=r,
        )
        self.train_data_wait = Histogram(
            "train_data_wait_duration_seconds",
            "Time the trainer waited for each batch, per step (its _sum is the total wait): an input "
            "path that cannot keep an accelerator busy shows here.",
            namespace=ns,
            registry=r,
            buckets=(0.0, *TRAIN_STEP_BUCKETS),
        )
        self.eval_loss = Gauge(
            "eval_holdout_loss",
            "Contrastive loss of the current model on held-out records (never trained on).",
            namespace=ns,
            registry=r,
        )

        # --- evaluation -------------------------------------------------------------------------
        self.eval_zeroshot_top1 = Gauge(
            "eval_zeroshot_top1_ratio",
            "Zero-shot top-1 accuracy of the last evaluated published model, per evaluation suite.",
            ["suite"],
            namespace=ns,
            registry=r,
        )
        self.eval_recall = Gauge(
            "eval_retrieval_recall_ratio",
            "Retrieval recall@k of the last evaluated published model, per suite and direction.",
            ["suite", "direction", "k"],
            namespace=ns,
            registry=r,
        )

        # --- model ------------------------------------------------------------------------------
        self.model_generation = Gauge(
            "model_generation",
            "Architecture generation of the published model (grows by 1 per growth).",
            namespace=ns,
            registry=r,
        )
        self.model_step = Gauge(
            "model_step", "Trainer step of the published model snapshot.", namespace=ns, registry=r
        )
        self.model_published = Gauge(
            "model_published_timestamp_seconds",
            "Unix time the serving snapshot was last published.",
            namespace=ns,
            registry=r,
        )
        self.model_parameters = Gauge(
            "model_parameters",
            "Parameters of the published model, per tower and in total.",
            ["tower"],
            namespace=ns,
            registry=r,
        )
        self.model_flops = Gauge(
            "model_flops_per_sample",
            "Forward FLOPs for one image-text pair through the published model.",
            namespace=ns,
            registry=r,
        )
        for tower in TOWERS:
            self.model_parameters.labels(tower=tower)
        # Unknown until measured: NaN, not a zero loss that a dashboard would believe.
        self.train_loss.set(math.nan)
        self.eval_loss.set(math.nan)

        # --- growth -----------------------------------------------------------------------------
        self.growth_events = Counter(
            "growth_events",
            "Completed architecture growths, by trigger.",
            ["trigger"],
            namespace=ns,
            registry=r,
        )
        for trigger in GROWTH_TRIGGERS:
            self.growth_events.labels(trigger=trigger)
        self.growth_phase = Enum(
            "growth_phase",
            "Phase of the growth controller.",
            namespace=ns,
            registry=r,
            states=list(GROWTH_PHASES),
        )
        self.growth_failures = Counter(
            "growth_failures",
            "Growths that did not complete: failed (an error; the served model is unchanged) or "
            "rolled_back (a grown model was withdrawn and the previous one restored).",
            ["outcome"],
            namespace=ns,
            registry=r,
        )
        for outcome in GROWTH_FAILURE_OUTCOMES:
            self.growth_failures.labels(outcome=outcome)
        self.growth_last_duration = Gauge(
            "growth_last_duration_seconds",
            "Wall time of the last completed growth (selection, supernet, inheriting).",
            namespace=ns,
            registry=r,
        )
        self.growth_declined = Counter(
            "growth_declined",
            "Growth searches that found no candidate beating the base by more than its noise.",
            namespace=ns,
            registry=r,
        )
        self.growth_search_seconds = Gauge(
            "growth_search_seconds",
            "Wall time spent on growth (supernet training, scoring, guard) since the model was born.",
            namespace=ns,
            registry=r,
        )
        self.growth_search_flops = Gauge(
            "growth_search_flops",
            "FLOPs spent on growth (supernet training, scoring, guard) since the model was born.",
            namespace=ns,
            registry=r,
        )
        self.growth_search_fraction = Gauge(
            "growth_search_fraction",
            "Share of all work (training + growth) that went to growth, by wall time or FLOPs; "
            "bounded by growth.search_budget_fraction. Updated at every growth decision.",
            ["basis"],
            namespace=ns,
            registry=r,
        )

        # --- ingest / kafka ---------------------------------------------------------------------
        self.ingest_records = Counter(
            "ingest_records",
            "Records read from a source, by outcome: trained, held_out, or the reason it was rejected.",
            ["source", "status"],
            namespace=ns,
            registry=r,
        )
        self.decode_worker_deaths = Counter(
            "ingest_decode_worker_deaths",
            "Decode worker processes found dead; each rebuilt the decode pipeline (records that "
            "killed a worker are counted under ingest_records as bad_image).",
            namespace=ns,
            registry=r,
        )
        self.decode_stalls = Counter(
            "ingest_decode_stalls",
            "Times the decode workers made no progress for data.decode_stall_timeout_s and were replaced.",
            namespace=ns,
            registry=r,
        )
        self.kafka_lag = Gauge(
            "kafka_consumer_lag_records",
            "Records between the consumer position and the high watermark, per assigned partition "
            "(a revoked partition's series is removed).",
            ["topic", "partition"],
            namespace=ns,
            registry=r,
        )
        self.shard_lag = Gauge(
            "shard_source_lag_records",
            "Rows left to read in the listed shards whose row count is known (shard sources only).",
            ["url"],
            namespace=ns,
            registry=r,
        )
        self.dead_letter_failures = Counter(
            "dead_letter_write_failures",
            "Writes to the dead letter (Kafka <topic>.dlq or the shard dead-letter file) that failed; "
            "each holds the checkpoint and the committed positions back until a retry succeeds.",
            ["source"],
            namespace=ns,
            registry=r,
        )

        # --- checkpoints ------------------------------------------------------------------------
        self.checkpoint_seconds = Histogram(
            "checkpoint_duration_seconds",
            "Wall time to write one checkpoint durably (copy, serialise, write, fsync).",
            namespace=ns,
            registry=r,
            buckets=CHECKPOINT_BUCKETS,
        )
        self.checkpoint_stall = Histogram(
            "checkpoint_stall_seconds",
            "Time the training thread waited for one checkpoint (the copy of its state to CPU).",
            namespace=ns,
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.checkpoint_last_success = Gauge(
            "checkpoint_last_success_timestamp_seconds",
            "Unix time of the last checkpoint that was written durably.",
            namespace=ns,
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "checkpoint_failures", "Checkpoint writes that failed.", namespace=ns, registry=r
        )

        # --- serving ----------------------------------------------------------------------------
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "code"],
            namespace=ns,
            registry=r,
        )
        self.http_latency = Histogram(
            "http_request_duration_seconds",
            "Time from the start of a request to the end of its answer, by route template.",
            ["route"],
            namespace=ns,
            registry=r,
            buckets=HTTP_LATENCY_BUCKETS,
        )
        self.http_in_flight = Gauge(
            "http_requests_in_flight", "HTTP requests being answered now.", namespace=ns, registry=r
        )
        self.serve_batch_size = Histogram(
            "serve_batch_size",
            "Items (texts or images) per forward pass of a serving batcher, across requests.",
            ["modality"],
            namespace=ns,
            registry=r,
            buckets=BATCH_SIZE_BUCKETS,
        )
        self.serve_queue_wait = Histogram(
            "serve_queue_wait_seconds",
            "Time a request's items waited in a batcher's queue before their batch started.",
            ["modality"],
            namespace=ns,
            registry=r,
            buckets=QUEUE_WAIT_BUCKETS,
        )
        self.serve_queue_items = Gauge(
            "serve_queue_items",
            "Items waiting in a batcher's queue now.",
            ["modality"],
            namespace=ns,
            registry=r,
        )
        self.serve_rejected = Counter(
            "serve_rejected_requests",
            "Requests refused for capacity: queue_full (429), deadline (503), stopping (503).",
            ["modality", "reason"],
            namespace=ns,
            registry=r,
        )
        for modality in MODALITIES:
            self.serve_batch_size.labels(modality=modality)
            self.serve_queue_wait.labels(modality=modality)
            self.serve_queue_items.labels(modality=modality)
            for reason in REJECT_REASONS:
                self.serve_rejected.labels(modality=modality, reason=reason)

        # --- embedding drift --------------------------------------------------------------------
        self.drift_cosine = Gauge(
            "embedding_drift_mean_cosine",
            "Mean cosine between the served model's embeddings of the fixed probe set and those of "
            "the previous version (against=previous) or the oldest still-served one (against=oldest); "
            "1 = nothing moved.",
            ["modality", "against"],
            namespace=ns,
            registry=r,
        )
        self.drift_overlap = Gauge(
            "embedding_drift_neighbour_overlap_ratio",
            "Mean share of each probe's 10 nearest probe neighbours that the served model and the "
            "compared version have in common; 1 = same neighbourhoods.",
            ["modality", "against"],
            namespace=ns,
            registry=r,
        )
        self.drift_versions = Gauge(
            "embedding_drift_generations",
            "Generations between the served model and the compared version.",
            ["against"],
            namespace=ns,
            registry=r,
        )
        self.drift_computed = Gauge(
            "embedding_drift_computed_timestamp_seconds",
            "Unix time the drift series were last computed.",
            namespace=ns,
            registry=r,
        )
        self.serve_versions_held = Gauge(
            "serve_versions_held",
            "Model generations held for serving (pinnable as growclip@N), the current one included.",
            namespace=ns,
            registry=r,
        )
        for modality in MODALITIES:
            for against in DRIFT_AGAINST:
                self.drift_cosine.labels(modality=modality, against=against).set(math.nan)
                self.drift_overlap.labels(modality=modality, against=against).set(math.nan)
        for against in DRIFT_AGAINST:
            self.drift_versions.labels(against=against)

        # --- process ----------------------------------------------------------------------------
        # The standard process_*, python_gc_* and python_info series, on this registry.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)

    def set_model(self, snap: ModelSnapshot) -> None:
        """Point the model series at a newly published snapshot."""
        self.model_generation.set(snap.generation)
        self.model_step.set(snap.step)
        self.model_published.set(snap.published_at)
        for tower, count in snap.parameters_by_tower().items():
            self.model_parameters.labels(tower=tower).set(count)
        self.model_flops.set(snap.arch.flops_per_sample())

    def set_evaluation(self, suite: str, result: SuiteResult) -> None:
        """Export one suite's latest evaluation: top-1 (zeroshot) or recall@k per direction (retrieval)."""
        if result.top1 is not None:
            self.eval_zeroshot_top1.labels(suite=suite).set(result.top1)
        for direction, by_k in result.recall.items():
            for k, value in by_k.items():
                self.eval_recall.labels(suite=suite, direction=direction, k=str(k)).set(value)
