"""A daemon thread calling `read()` every `interval_s` between `start()` and `stop()`, and
once more at `stop()` (a window shorter than the interval still gets a reading): what the
memory and GPU-utilisation trackers share."""
from __future__ import annotations

import threading
from typing import Callable


class PeriodicSampler:
    def __init__(self, read: Callable[[], None], interval_s: float, name: str):
        self.read, self.interval_s, self.name = read, interval_s, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """End the window with a last reading; False when it was not running."""
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.read()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.read()
