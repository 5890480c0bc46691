"""A rate limit on rows per second, shared by the workers of one job."""

from __future__ import annotations

import threading
import time

from ..errors import ConfigurationError

__all__ = ["RateLimiter"]


class RateLimiter:
    """Spaces out work so that on average at most ``rate`` rows per second pass.

    Workers call :meth:`acquire` after each batch with the rows it handled,
    and sleep for as long as the job is ahead of the allowed pace.
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ConfigurationError(
                f"invalid rate {rate!r}: give a positive number of rows per second"
            )
        self.rate = rate
        self._lock = threading.Lock()
        self._next_free = time.monotonic()

    def acquire(self, rows: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_free)
            self._next_free = start + rows / self.rate
            delay = start - now
        if delay > 0:
            time.sleep(delay)
