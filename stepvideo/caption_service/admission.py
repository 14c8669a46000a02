"""``Admission``: a bound on the model requests the service holds at once.

A model request is admitted the moment a worker thread picks it up, before its body is read.
At most ``limit`` are held (running, or waiting for their device's gate); the next one gets
:class:`~stepvideo.caption_service.gate.DeviceBusy` at once (503 + ``Retry-After``) instead of waiting,
unbounded, for a worker thread. Because the HTTP host runs ``limit`` + a few more threads,
those spare threads always serve ``/health``, ``/ready`` and the refusals quickly.
"""
from __future__ import annotations

import threading
from typing import Callable

from .gate import DeviceBusy


class Admission:
    """Counts held model requests.

    Args:
        limit: most requests held at once (the service's ``threads``).
        retry_after: called for the ``Retry-After`` hint (seconds) when refusing.
    """

    def __init__(self, limit: int, retry_after: Callable[[], int]):
        self.limit = limit
        self._retry_after = retry_after
        self._lock = threading.Lock()
        self._held = 0
        self.refused = 0

    @property
    def held(self) -> int:
        return self._held

    def enter(self) -> Callable[[], None]:
        """Admit one request or raise :class:`DeviceBusy`; returns the (idempotent) release."""
        with self._lock:
            if self._held >= self.limit:
                self.refused += 1
                raise DeviceBusy(f"the service is busy: {self._held} model requests are already running or "
                                 f"queued (limit {self.limit}, --threads); retry later", self._retry_after())
            self._held += 1
        released = []

        def release() -> None:
            with self._lock:
                if not released:
                    released.append(True)
                    self._held -= 1

        return release
