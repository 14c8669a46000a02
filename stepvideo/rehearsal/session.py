"""One rank's fake CUDA device for the length of a ``with``, with the audit and the memory meter on.

:class:`DeviceSession` is what every rehearsal runs its real code inside
(:func:`~.run.rehearse` for a generation rank, :func:`~.service.rehearse_service` for the
caption/VAE service): this process as rank ``rank`` of ``nproc`` (the ``fake`` process group),
the GPU seam swapped for :class:`~.fake_cuda.FakeCuda` cards, ``FakeTensorMode``, the Python
answers of :class:`~.fake_cuda.CudaTensorPython`, the :class:`~.audit.DeviceAudit` and a
MemTracker over every storage. Each stage's own peak on this rank's device is kept in
:attr:`DeviceSession.stage_peaks` (bytes, without the stated CUDA constants). ``on_gpu``: none
of the fakes, only the audit and the meter, on the host's real CUDA device.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import process
from ..accelerator import using
from ..perf import memory_accounting as acc
from ..perf.memory_accounting import GIB
from ..perf.host_memory import HOST_RAM_ENV
from .audit import DeviceAudit
from .fake_cuda import CudaTensorPython, FakeCuda, cuda_generators_on_host, module_to_in_place
from .fake_group import fake_process_group


@contextlib.contextmanager
def _environment(values: Dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` (torchrun's rank variables, the host's RAM), restored afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RankExit(RuntimeError):
    """A rehearsed rank left the way a failed multi-rank run leaves (``process.exit_now``)."""


@contextlib.contextmanager
def _exits_raise() -> Iterator[None]:
    """A failed multi-rank run prints its line and leaves the process at once
    (:func:`stepvideo.process.exit_now`: a broken NCCL group must not be torn down). A rehearsal's
    ``fake`` group cannot break, and the rehearsal must report the failure, not end the caller's
    process: here the exit raises :class:`RankExit` from the failure being handled."""
    original = process.exit_now

    def exit_raises(code: int) -> None:
        failure = sys.exc_info()[1]
        raise RankExit(f"{type(failure).__name__}: {failure}" if failure is not None else f"exit code {code}")

    process.exit_now = exit_raises
    try:
        yield
    finally:
        process.exit_now = original


DEFAULT_CARD_GIB = 79.0          # an 80 GB card: a rank's budget when no profile states one, and the service's


def _device_bytes(snapshot: dict, device: torch.device) -> int:
    return sum(v.get("Total", 0) for k, v in snapshot.items() if torch.device(k) == device)


class DeviceSession:
    """See the module docstring.

    Args:
        rank, nproc: the rank this process plays and the ranks in its layout.
        budget_gib: memory of each fake card.
        steps: denoising steps the audit expects (0 for the service).
        recording: the file of rank 0's object broadcasts (:mod:`.fake_group`), for ``nproc > 1``.
        on_gpu: run on the host's real CUDA device instead (no fakes).
        host_ram_gib: the host RAM the run's pre-flight plans with (``STEPVIDEO_HOST_RAM_GIB``);
            None: this machine's.
    """

    def __init__(self, rank: int, nproc: int, budget_gib: float, steps: int, *,
                 recording: Optional[Path] = None, on_gpu: bool = False, host_ram_gib: Optional[float] = None):
        self.rank, self.nproc, self.on_gpu, self.recording = rank, nproc, on_gpu, recording
        self.env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc)}
        if host_ram_gib is not None:          # the host the run plans its RAM for (fake weights take none)
            self.env[HOST_RAM_ENV] = f"{host_ram_gib:g}"
        self.device = torch.device("cuda", rank)
        self.audit = DeviceAudit(device=self.device, total_steps=steps, answer_host_reads=not on_gpu)
        self.tracker = acc._StorageTracker()
        self.fake_cuda = FakeCuda(nproc, int(budget_gib * GIB), on_sync=self.audit.note_sync,
                                  used_bytes=lambda index: self.used_bytes(torch.device("cuda", index)))
        self.stage_peaks: Dict[str, int] = {}
        self.window_peaks: Dict[str, int] = {}         # :meth:`window`: bytes, whatever the stages inside
        self.window_starts: Dict[str, int] = {}        # bytes alive on the device when the window opened
        self._window = 0
        audit_enter = self.audit.enter_stage

        def enter_and_measure(stage: str) -> None:          # every stage change closes the last one
            self.close_stage()
            audit_enter(stage)

        self.audit.enter_stage = enter_and_measure

    def used_bytes(self, device: torch.device) -> int:
        """Bytes of the storages alive on ``device`` now."""
        return _device_bytes(self.tracker.get_tracker_snapshot("current"), device)

    def close_stage(self) -> None:
        """Keep the current stage's own peak, then start measuring afresh."""
        audit = self.audit
        label = audit.stage_order[-1] if audit.stage_order else "load"
        tracker = self.tracker
        peak = tracker._peak_mem.get(self.device, 0)
        self.stage_peaks[label] = max(self.stage_peaks.get(label, 0), peak)
        self._window = max(self._window, peak)
        current = tracker.get_tracker_snapshot("current")
        tracker._peak_mem = {d: snap.get("Total", 0) for d, snap in current.items()}
        tracker._peak_mem_snap = current

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[None]:
        """Keep the device peak of the code inside as ``window_peaks[name]`` and the bytes alive
        before it as ``window_starts[name]``."""
        self.close_stage()
        self._window = 0
        self.window_starts[name] = self.used_bytes(self.device)
        try:
            yield
        finally:
            self.close_stage()
            self.window_peaks[name] = self._window

    @property
    def allocated_peak(self) -> int:
        """The most bytes alive on this rank's device in any stage so far."""
        return max(self.stage_peaks.values(), default=0)

    @contextlib.contextmanager
    def running(self) -> Iterator["DeviceSession"]:
        """Everything of the module docstring, entered in order and left in reverse."""
        with _environment(self.env), _exits_raise(), contextlib.ExitStack() as stack:
            if not self.on_gpu:
                for mode in (fake_process_group(self.rank, self.nproc, self.recording), using(self.fake_cuda),
                             module_to_in_place(), cuda_generators_on_host(),
                             FakeTensorMode(allow_non_fake_inputs=True), acc._ShapeOnlyScaledMM()):
                    stack.enter_context(mode)
            stack.enter_context(self.tracker)
            if not self.on_gpu:
                stack.enter_context(CudaTensorPython(self.audit.answer_cuda_read))
            stack.enter_context(self.audit)
            stack.enter_context(torch.no_grad())
            try:
                yield self
            finally:
                self.close_stage()
