"""``StageTimer``: wall-clock seconds of each stage of one generation, and its one-line summary.

``VideoGenerator.generate`` fills one per call (every rank keeps its own; rank 0's is the one
that sees decode and write)::

    encoding -> denoising (one entry per step) -> decoding -> writing

The summary line is the same everywhere it appears: printed at the end of a ``run_parallel.py``
run, stored in evaluation manifest records (``timing``) and in a server job (``timings``)::

    timing: encode 0.41 s | denoise 12.80 s (50 steps, 0.256 s/step) | decode 3.02 s | write 0.35 s | total 16.58 s

A ``listener(stage, done, total)`` (the generation server's progress) hears every stage change
and step: ``stage`` is ``"encoding"``, ``"denoising"``, ``"decoding"`` or ``"writing"``; ``done``
and ``total`` count denoising steps.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

# The one stage vocabulary: the timer, the job status (``stage``) and the progress listener use the
# "-ing" names; the timings keys (``encode_s``), the metrics labels and the memory profile's
# placement stages use the short names.
STAGES = ("encoding", "denoising", "decoding", "writing")
SHORT_NAMES = {"encoding": "encode", "denoising": "denoise", "decoding": "decode", "writing": "write"}

Listener = Callable[[str, int, int], None]


class StageTimer:
    """Per-stage and per-step wall times of one generation (``time.perf_counter``)."""

    def __init__(self, listener: Optional[Listener] = None, clock: Callable[[], float] = time.perf_counter):
        self.listener = listener
        self._clock = clock
        self._started: Optional[float] = None
        self._stage: Optional[str] = None
        self._stage_start = 0.0
        self._last_step = 0.0
        self.seconds: Dict[str, float] = {}
        self.step_seconds: List[float] = []
        self.total_steps = 0
        self.total_seconds: Optional[float] = None

    @property
    def stage(self) -> Optional[str]:
        return self._stage

    def begin(self, stage: str, total_steps: int = 0) -> None:
        """Close the current stage (if any) and start ``stage``."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        now = self._clock()
        if self._started is None:
            self._started = now
        self._close(now)
        self._stage, self._stage_start, self._last_step = stage, now, now
        if stage == "denoising":
            self.total_steps = total_steps
        self._notify()

    def step(self, index: int) -> None:
        """Denoising step ``index`` (0-based) just finished."""
        now = self._clock()
        self.step_seconds.append(now - self._last_step)
        self._last_step = now
        self._notify()

    def finish(self) -> None:
        """Close the last stage; :attr:`total_seconds` is set from the first ``begin``."""
        now = self._clock()
        self._close(now)
        self._stage = None
        if self._started is not None:
            self.total_seconds = now - self._started

    def _close(self, now: float) -> None:
        if self._stage is not None:
            key = SHORT_NAMES[self._stage]
            self.seconds[key] = self.seconds.get(key, 0.0) + now - self._stage_start

    def _notify(self) -> None:
        if self.listener is not None and self._stage is not None:
            self.listener(self._stage, len(self.step_seconds), self.total_steps)

    # ------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        """``{"encode_s", "denoise_s", "decode_s", "write_s", "steps_s": [...], "total_s", "summary"}``
        (stages that did not run on this rank are left out)."""
        out = {f"{key}_s": round(value, 4) for key, value in self.seconds.items()}
        out["steps_s"] = [round(s, 4) for s in self.step_seconds]
        if self.total_seconds is not None:
            out["total_s"] = round(self.total_seconds, 4)
        out["summary"] = self.summary()
        return out

    def summary(self) -> str:
        """The one-line timing summary (see the module docstring)."""
        parts = []
        for stage in STAGES:
            key = SHORT_NAMES[stage]
            if key not in self.seconds:
                continue
            text = f"{key} {self.seconds[key]:.2f} s"
            if stage == "denoising" and self.step_seconds:
                n = len(self.step_seconds)
                text += f" ({n} steps, {sum(self.step_seconds) / n:.3f} s/step)"
            parts.append(text)
        if self.total_seconds is not None:
            parts.append(f"total {self.total_seconds:.2f} s")
        return "timing: " + " | ".join(parts)
