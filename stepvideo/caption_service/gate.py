"""``DeviceGate``: one model call at a time per device, with a bounded, timed wait queue.

Many HTTP threads may hold requests at once (decoding bodies and encoding responses runs in
parallel); only the model call itself goes through the gate of its device. A request that finds
``queue_size`` others already waiting, or waits longer than ``timeout``, gets
:class:`DeviceBusy`, which the server turns into ``503`` with ``Retry-After``.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator


class DeviceBusy(RuntimeError):
    """The device's queue is full or the wait timed out; ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeviceGate:
    """Serialises the model calls of one device.

    Args:
        device: name used in messages.
        queue_size: how many requests may wait while one runs (0: fail at once when busy).
        timeout: seconds a request waits before giving up.
    """

    def __init__(self, device: str, queue_size: int, timeout: float):
        self.device = device
        self.queue_size = queue_size
        self.timeout = timeout
        self._run = threading.Lock()        # held by the request using the device
        self._state = threading.Lock()      # guards the counters
        self._waiting = 0
        self._last_seconds = 1.0            # duration of the last call, for Retry-After

    @property
    def waiting(self) -> int:
        return self._waiting

    def retry_after(self) -> int:
        """Seconds until a new request could expect the device: the last call's duration times
        the calls ahead of it (at least 1)."""
        return max(1, int(self._last_seconds * (self._waiting + 1) + 0.999))

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Run the body with the device to itself; raise :class:`DeviceBusy` if that cannot happen."""
        if not self._run.acquire(blocking=False):
            with self._state:
                if self._waiting >= self.queue_size:
                    raise DeviceBusy(f"device {self.device} is busy and its wait queue is full "
                                     f"({self._waiting} waiting, queue_size {self.queue_size}); retry later",
                                     self.retry_after())
                self._waiting += 1
            try:
                acquired = self._run.acquire(timeout=self.timeout)
            finally:
                with self._state:
                    self._waiting -= 1
            if not acquired:
                raise DeviceBusy(f"waited {self.timeout:g} s for device {self.device} without getting it "
                                 "(queue_timeout); retry later", self.retry_after())
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_seconds = time.perf_counter() - start
            self._run.release()
