"""Fault injection for the chaos tests: the daemon SIGKILLs itself at a named point.

``GROWCLIP_FAULTS="point:n[,point:n...]"`` kills the process at the n-th time it reaches
``point`` (counted in this process). Points: ``checkpoint`` (a checkpoint write is under way: the
kill lands a random few milliseconds after it starts, inside the write), ``dead_letter`` (records
were dead-lettered since the last checkpoint: the kill lands within milliseconds of the flush
that precedes the next one),
``search`` (between the steps of a growth search). Unset, every call is a dictionary lookup.
Never set it in production: it exists so that tests can kill at moments a timer rarely hits.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections import Counter

log = logging.getLogger(__name__)

ENV = "GROWCLIP_FAULTS"


def _parse(raw: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        point, _, n = item.partition(":")
        out[point] = int(n or 1)
    return out


_PLAN = _parse(os.environ.get(ENV, ""))
_hits: Counter[str] = Counter()


def _die(point: str) -> None:
    log.warning("fault injection: killing the process", extra={"point": point, "hit": _hits[point]})
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, *, within_s: float = 0.0) -> None:
    """Reached ``name``: die now (or within ``within_s``, on a timer) if the plan says so."""
    if name not in _PLAN:
        return
    _hits[name] += 1
    if _hits[name] != _PLAN[name]:
        return
    if within_s <= 0:
        _die(name)
    timer = threading.Timer(random.uniform(0.0, within_s), _die, args=(name,))
    timer.daemon = True
    timer.start()
