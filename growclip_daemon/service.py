"""A small service tree: start children in order, stop them in reverse, loop threads that wake on stop.

A background thread that crashes records the error and calls `on_crash`, so the daemon stops
visibly instead of serving a model that no longer trains. :meth:`Service.failure` lets a
watchdog find a child that died without saying so (a server thread gone, a child process
exited): :meth:`ServiceTree.failure` names the first such child.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Service:
    """Something with a clean start and stop. Subclasses override `on_start` / `on_stop`."""

    name = "service"

    def __init__(self) -> None:
        self._started = False

    def on_start(self) -> None:
        pass

    def on_stop(self) -> None:
        pass

    def failure(self) -> str | None:
        """Why this running service no longer does its job, or None while it does (watchdog)."""
        return None

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        log.info("starting", extra={"service": self.name})
        self.on_start()
        self._started = True

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        log.info("stopping", extra={"service": self.name})
        self.on_stop()


class ServiceTree(Service):
    """Starts services in order; stops the started ones in reverse, even when one fails."""

    name = "tree"

    def __init__(self, children: list[Service]) -> None:
        super().__init__()
        self.children = children
        self._running: list[Service] = []

    def on_start(self) -> None:
        try:
            for child in self.children:
                child.start()
                self._running.append(child)
        except BaseException:
            self.on_stop()
            raise

    def failure(self) -> str | None:
        for child in list(self._running):
            why = child.failure()
            if why is not None:
                return f"{child.name}: {why}"
        return None

    def on_stop(self) -> None:
        while self._running:
            child = self._running.pop()
            try:
                child.stop()
            except Exception:
                log.exception("service failed to stop", extra={"service": child.name})


class ThreadService(Service):
    """Runs `run(stop_event)` in a thread; `stop()` sets the event and joins.

    With an ``on_crash`` handler the thread is essential: returning before it was asked to stop
    is a failure the watchdog reports. Without one it is optional (it may end on its own)."""

    def __init__(
        self, on_crash: Callable[[BaseException], None] | None = None, join_timeout_s: float = 60
    ) -> None:
        super().__init__()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self._on_crash = on_crash
        self._join_timeout_s = join_timeout_s
        self._thread: threading.Thread | None = None

    def run(self, stop: threading.Event) -> None:
        raise NotImplementedError

    def _main(self) -> None:
        try:
            self.run(self.stop_event)
        except BaseException as err:
            self.error = err
            log.exception("service crashed", extra={"service": self.name})
            if self._on_crash is not None:
                self._on_crash(err)

    def on_start(self) -> None:
        self.stop_event.clear()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def on_stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(self._join_timeout_s)
            if self._thread.is_alive():
                log.error("service did not stop in time", extra={"service": self.name})

    def failure(self) -> str | None:
        if self._on_crash is None or self._thread is None or self.stop_event.is_set():
            return None
        if self._thread.is_alive():
            return None
        return f"thread crashed: {self.error!r}" if self.error is not None else "thread exited"

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
