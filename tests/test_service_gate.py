"""``stepvideo.caption_service.gate.DeviceGate``: one model call per device, a bounded queue, timeouts."""
from __future__ import annotations

import threading
import time

import pytest

from stepvideo.caption_service.gate import DeviceBusy, DeviceGate


def test_device_gate_queue_and_timeout():
    gate = DeviceGate("cpu", queue_size=1, timeout=0.2)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with gate.hold():
            entered.set()
            release.wait(5)

    runner = threading.Thread(target=hold)
    runner.start()
    entered.wait(5)
    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(_try_hold(gate)))
    waiter.start()
    deadline = time.monotonic() + 5
    while gate.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(DeviceBusy, match="queue is full") as info:   # 1 running + 1 waiting = full
        with gate.hold():
            pass
    assert info.value.retry_after >= 1
    waiter.join()
    assert "without getting it" in waiter_result[0]                 # the waiter timed out
    release.set()
    runner.join()
    with gate.hold():                                              # free again
        pass


def _try_hold(gate):
    try:
        with gate.hold():
            return "ok"
    except DeviceBusy as err:
        return str(err)
