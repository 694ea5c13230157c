"""Structured log helpers."""

from __future__ import annotations

import json
import logging

import pytest

from growclip_daemon import logs
from growclip_daemon.logs import JsonFormatter, RepeatFilter


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeats_of_a_noisy_logger_pass_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    f = RepeatFilter(("kafka",), interval_s=30.0)
    template = "Connect attempt to %s returned error %s"
    first = record("kafka.conn", template, "broker", 111)
    assert f.filter(first) and not hasattr(first, "suppressed")
    # the same template with other arguments is a repeat; another template or level is not
    assert not any(f.filter(record("kafka.conn", template, "broker", i)) for i in range(5))
    assert f.filter(record("kafka.conn", "Closing connection %s", "broker"))
    assert f.filter(record("kafka.conn", template, "broker", 1, level=logging.WARNING))
    now[0] += 31.0
    later = record("kafka.conn", template, "broker", 111)
    assert f.filter(later) and later.suppressed == 5
    again = record("kafka.conn", template, "broker", 111)
    now[0] += 31.0
    assert f.filter(again) and not hasattr(again, "suppressed")  # nothing was held back since


def test_other_loggers_are_never_held_back() -> None:
    f = RepeatFilter(("kafka",), interval_s=30.0)
    assert all(f.filter(record("growclip_stream.data.kafka_source", "broker unreachable")) for _ in range(10))
    assert all(f.filter(record("kafkaesque", "same")) for _ in range(3))  # a logger name, not a prefix


def test_suppressed_count_appears_in_the_json_line() -> None:
    r = record("kafka.conn", "error %s", 1)
    r.suppressed = 7
    line = json.loads(JsonFormatter().format(r))
    assert line["suppressed"] == 7 and line["logger"] == "kafka.conn" and line["msg"] == "error 1"
