"""``FlowMatchDiscreteScheduler``: time-shifted flow-matching schedule with Euler steps.

With the default ``reverse=False`` the sigmas run from exactly 0 (pure noise) to exactly 1
(clean data): ``sigma = 1 - s*u / (1 + (s-1)*u)`` on ``u = linspace(1, 0, N+1)`` (fp32).
The DiT receives ``timesteps = sigmas[:N]`` unchanged (it multiplies by 1000 itself), and
``step`` integrates ``x <- x + v * (sigma[i+1] - sigma[i])`` in fp32.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..loading import checkpoint as ckpt
from ..loading import layout


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's ``scheduler_config.json`` fields."""

    num_train_timesteps: int = 1000
    reverse: bool = False
    solver: str = "euler"


class FlowMatchDiscreteScheduler:
    """Flow-matching Euler scheduler; construction arguments are the reference's."""

    order = 1

    def __init__(self, num_train_timesteps: int = 1000, reverse: bool = False, solver: str = "euler",
                 device: Optional[Union[str, torch.device]] = None):
        if solver != "euler":
            raise ValueError(f"solver {solver!r} is not supported; only 'euler' exists")
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        self.config = SchedulerConfig(num_train_timesteps=num_train_timesteps, reverse=bool(reverse), solver=solver)
        self.device = device
        self.num_inference_steps: Optional[int] = None
        self.sigmas: Optional[torch.Tensor] = None
        self.timesteps: Optional[torch.Tensor] = None
        self._host_copy: tuple = (None, None)
        self._step_index: Optional[int] = None

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "FlowMatchDiscreteScheduler":
        return cls(**ckpt.constructor_kwargs(cls, config))

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], subfolder: Optional[str] = None) -> "FlowMatchDiscreteScheduler":
        """Load ``scheduler/scheduler_config.json`` from a model dir or the scheduler folder itself."""
        folder = Path(path)
        if subfolder:
            folder = folder / subfolder
        elif not (folder / layout.SCHEDULER_CONFIG).is_file() and (folder / layout.SCHEDULER_DIR).is_dir():
            folder = folder / layout.SCHEDULER_DIR
        return cls.from_config(ckpt.read_json(folder / layout.SCHEDULER_CONFIG))

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    # ------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, time_shift: float = 13.0,
                      device: Optional[Union[str, torch.device]] = None) -> None:
        """Compute ``sigmas`` (N+1 values) and ``timesteps`` (the first N) and reset the step index."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if not time_shift > 0:
            raise ValueError(f"time_shift must be > 0, got {time_shift!r}")
        u = torch.linspace(1, 0, num_inference_steps + 1, dtype=torch.float32)
        shifted = (time_shift * u) / (1 + (time_shift - 1) * u)
        sigmas = shifted if self.config.reverse else 1 - shifted
        device = device if device is not None else self.device
        self.sigmas = sigmas.to(device) if device is not None else sigmas
        self.timesteps = self.sigmas[:-1].clone()
        self._host_copy = (self.timesteps, sigmas[:-1].clone())   # the step lookup compares here: no device read
        self.num_inference_steps = num_inference_steps
        self._step_index = None

    def index_for_timestep(self, timestep: torch.Tensor) -> int:
        """Position of ``timestep`` in ``timesteps`` by exact equality (second match if repeated).

        A ``timestep`` that is an element of the timesteps ``set_timesteps`` made (what iterating
        over them yields) is located by its storage offset: those timesteps strictly decrease
        (``time_shift > 0``), so its position is its only match, and the usual loop reads no device
        value (on CUDA a read is a host sync). Other values are compared on the host copy."""
        of_timesteps, host = self._host_copy
        if of_timesteps is not self.timesteps:         # replaced by hand since set_timesteps
            host = self.timesteps.cpu()
        else:
            position = self._element_position(timestep)
            if position is not None:
                return position
        matches = (host == timestep.to("cpu", host.dtype)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of the scheduler's timesteps; pass the "
                             "values of `scheduler.timesteps`")
        return int(matches[1 if len(matches) > 1 else 0])

    def _element_position(self, timestep: torch.Tensor) -> Optional[int]:
        """Index of ``timestep`` when it is a 0-dim view of an element of ``self.timesteps``, else None."""
        base = self.timesteps
        if timestep.dim() != 0 or timestep._base is not base or base.dim() != 1 or base.stride(0) != 1:
            return None
        offset = timestep.storage_offset() - base.storage_offset()
        return offset if 0 <= offset < base.shape[0] else None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor], sample: torch.Tensor,
             return_dict: bool = False):
        """One Euler step: ``sample + model_output * (sigma[i+1] - sigma[i])`` in fp32.

        ``timestep`` must be a value of ``self.timesteps`` (not an index): on the first call the
        step index is found by exact equality, then it advances by one per call.
        """
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps(num_inference_steps, time_shift) before step()")
        if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("integer timesteps are not supported: pass one of `scheduler.timesteps` "
                             "(a float), not an index from enumerate()")
        if self._step_index is None:
            t = timestep if torch.is_tensor(timestep) else torch.tensor(float(timestep), dtype=torch.float32)
            self._step_index = self.index_for_timestep(t.reshape(()))
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(f"step() called {self._step_index + 1} times for {len(self.timesteps)} timesteps")
        sigmas = self.sigmas.to(sample.device)
        dt = sigmas[self._step_index + 1] - sigmas[self._step_index]
        prev_sample = sample.float() + model_output.float() * dt
        self._step_index += 1
        if return_dict:
            return {"prev_sample": prev_sample}
        return prev_sample

    def __repr__(self) -> str:
        return f"FlowMatchDiscreteScheduler({asdict(self.config)})"
