"""One dense progress line per interval, for the long parts: tokenizing, generating, training."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("bertstream")


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped lines on stderr; called once by each entry point, never at import time."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(processName)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


class Every:
    """True at most once per `seconds`: `if ticker.due(): log.info(...)` keeps logging off the hot path."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._next = time.monotonic() + seconds

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.seconds
        return True
