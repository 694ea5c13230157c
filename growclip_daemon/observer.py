"""What the training thread reports, turned into Prometheus series and the status the API shows."""

from __future__ import annotations

import time
from typing import Any

from growclip_daemon.metrics import Metrics
from growclip_stream.data.decode import DecodePipeline
from growclip_stream.growth.controller import GrowthEvent
from growclip_stream.train.loop import Source
from growclip_stream.train.trainer import StepStats


class MetricsObserver:
    """Turns the loop's reports into Prometheus series (the loop's ``LoopObserver``)."""

    def __init__(self, metrics: Metrics, source_label: str) -> None:
        self.metrics = metrics
        self.source_label = source_label
        self.samples_per_s = 0.0
        self.first_loss: float | None = None
        self.loss_ema: float | None = None  # smoothed training loss, the trend a person watches
        self.phase = "idle"  # the growth controller's phase

    def on_records(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            self.metrics.ingest_records.labels(source=self.source_label, status=status).inc(n)

    def on_step(self, stats: StepStats, data_wait_s: float) -> None:
        m = self.metrics
        m.train_steps.inc()
        m.train_samples.inc(stats.fresh)
        m.train_loss.set(stats.loss)
        m.train_step_seconds.observe(stats.seconds)
        m.train_data_wait.observe(data_wait_s)
        self.samples_per_s = stats.batch_size / max(stats.seconds + data_wait_s, 1e-9)
        m.train_throughput.set(self.samples_per_s)
        if self.first_loss is None:
            self.first_loss = stats.loss
        self.loss_ema = stats.loss if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * stats.loss

    def on_growth(self, event: GrowthEvent) -> None:
        m = self.metrics
        if event.outcome == "grown":
            m.growth_events.labels(trigger=event.trigger).inc()
            m.growth_last_duration.set(event.duration_s)
        elif event.outcome == "declined":
            m.growth_declined.inc()
        else:
            m.growth_failures.labels(outcome="rolled_back").inc()
        if event.work:
            m.growth_search_seconds.set(event.work["growth_seconds"])
            m.growth_search_flops.set(event.work["growth_flops"])
            for basis, share in event.work["fractions"].items():
                m.growth_search_fraction.labels(basis=basis).set(share)

    def on_eval(self, loss: float) -> None:
        self.metrics.eval_loss.set(loss)

    def on_phase(self, phase: str) -> None:
        self.phase = phase
        self.metrics.growth_phase.state(phase)


class IngestMetrics:
    """Lag per partition and the decode pipeline's worker deaths and stalls, refreshed at most
    every ``interval_s`` (lag asks the client, the counters are cumulative in the pipeline)."""

    def __init__(
        self,
        metrics: Metrics,
        source: Source,
        pipeline: DecodePipeline[Any],
        topic: str | None,
        interval_s: float = 2.0,
        shard_url: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.source = source
        self.pipeline = pipeline
        self.topic = topic  # Kafka lag is labelled by topic; None for shard sources
        self.shard_url = shard_url  # shard lag is labelled by the shards' URL
        self.interval_s = interval_s
        self.lag: dict[int, int] = {}
        self._last = 0.0
        self._worker_deaths = self._stalls = 0  # already in the metrics

    def update(self) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        deaths, stalls = self.pipeline.worker_deaths, self.pipeline.stalls
        self.metrics.decode_worker_deaths.inc(deaths - self._worker_deaths)
        self.metrics.decode_stalls.inc(stalls - self._stalls)
        self._worker_deaths, self._stalls = deaths, stalls
        previous, self.lag = self.lag, self.source.lag()
        if self.topic is not None:
            for partition, lag in self.lag.items():
                self.metrics.kafka_lag.labels(topic=self.topic, partition=str(partition)).set(lag)
            for partition in previous.keys() - self.lag.keys():  # revoked: its series goes too
                self.metrics.kafka_lag.remove(self.topic, str(partition))
        else:
            self.metrics.shard_lag.labels(url=str(self.shard_url)).set(sum(self.lag.values()))
