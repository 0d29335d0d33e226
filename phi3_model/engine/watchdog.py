"""Progress watchdog: an engine that holds requests and completes no step for too long is declared stalled.

Without it a hung engine (a stuck kernel, a deadlock, a step that never returns) looks like a slow one: a queue
worker would heartbeat its entries forever and a Ray actor hold its shard forever. The limit is the configured
`stall_timeout_s` or 20x the longest step seen so far, whichever is larger, so a machine whose steps are
legitimately slow is not mistaken for a hung one.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)
STEP_FACTOR = 20


class Watchdog:
    def __init__(self, timeout_s: float | None, busy: Callable[[], int], on_stall: Callable[[str], None]):
        """busy() -> requests waiting on the engine; on_stall(why) is called once, from the watchdog's thread."""
        self.timeout_s = timeout_s
        self.busy, self.on_stall = busy, on_stall
        self.last = time.monotonic()
        self.longest_step_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def limit_s(self) -> float:
        return max(self.timeout_s or 0.0, STEP_FACTOR * self.longest_step_s)

    def progress(self, longest_step_s: float | None = None) -> None:
        """A step completed (or work arrived at an idle engine: the clock starts then)."""
        self.last = time.monotonic()
        if longest_step_s is not None and longest_step_s > self.longest_step_s:
            self.longest_step_s = longest_step_s

    def start(self) -> None:
        if self.timeout_s is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="phi3-engine-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            waiting = self.busy()
            idle = time.monotonic() - self.last
            if waiting and idle > self.limit_s:
                why = (f"no engine step completed in {idle:.1f} s while {waiting} request(s) waited "
                       f"(stall_timeout_s={self.timeout_s:g}, longest step seen {self.longest_step_s:.2f} s)")
                log.error("engine stalled: %s", why)
                self.on_stall(why)
                return
