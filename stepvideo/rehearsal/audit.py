"""What a rehearsal records about every op: devices, host syncs, host<->device bytes, stages.

:class:`DeviceAudit` is a ``TorchDispatchMode`` that sits above ``FakeTensorMode`` and sees every
aten op with its (fake) arguments:

* **mixed-device ops**: an op whose tensor inputs sit on more than one device (0-dim CPU
  scalars excepted, as in PyTorch), or a large op (>= ``cpu_op_bytes``) on the CPU while the
  DiT denoises. Each is recorded with the op and the innermost source line of stepvideo that
  called it; the inputs are then moved to the CUDA device so that the run goes on and every such
  op is listed, not only the first;
* **host syncs**: reading a CUDA tensor's value on the host (``item``/``int()``/``tolist``:
  ``_local_scalar_dense``), ``nonzero``, ``equal``, a device-to-host copy, and
  ``synchronize`` (reported by :class:`~stepvideo.rehearsal.fake_cuda.FakeCuda`);
* **bytes** copied host->device and device->host;
* the **stage** (``load``, ``encode``, ``denoise``, ``decode``) and denoising step, from global
  module forward hooks (a DiT forward starts a step).

Everything is attributed to ``(stage, step)``; :meth:`summary` turns it into per-step figures.
"""
from __future__ import annotations

import sys
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ..perf.memory_accounting import GIB
from .fake_cuda import ValueNeeded

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parent
_THIS = Path(__file__).resolve().parent

SYNC_OPS = {"_local_scalar_dense": "value read on the host (item / int() / tolist)",
            "nonzero": "nonzero (output size depends on the values)",
            "equal": "torch.equal", "is_nonzero": "bool() of a tensor",
            "masked_select": "masked_select (output size depends on the values)",
            "unique": "unique", "_unique2": "unique"}
COPY_OPS = {"_to_copy", "copy_", "copy"}
# host value reads (CPU tensors: no device sync) the rehearsal answers, by (file, function):
# the value to assume and why. The text length is answered with the longest context (the DiT
# clamps it to the context width): the memory worst case, as benchmark/bench_memory.py assumes.
# transformers' BERT asks whether the CLIP mask is all ones (to drop it): answered no, the mask is kept.
HOST_READ_ANSWERS = {("stepvideo/models/dit.py", "_context"): (2 ** 31 - 1, "with the full context width"),
                     ("stepvideo/text_encoders/hunyuan_clip.py", "forward"): (0, "no: the CLIP mask is kept")}
# module class name -> the stage its forward belongs to
STAGE_OF_MODULE = {"Step1Model": "encode", "BertModel": "encode", "StepVideoModel": "denoise"}


@dataclass
class Event:
    """One recorded finding."""

    kind: str                 # "mixed" | "sync"
    op: str
    detail: str
    where: str                # innermost stepvideo source line, "path:line (function)"
    stage: str
    step: int


def source_line() -> str:
    """The innermost frame of the project (not this package, not torch) on the Python stack."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if _THIS in path.parents or path.parent == _THIS:
            continue
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue                # an installed library, also when the venv sits inside the repository
        if REPO_ROOT in path.parents:
            return f"{path.relative_to(REPO_ROOT)}:{frame.lineno} ({frame.name})"
    return "outside the project"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class DeviceAudit(TorchDispatchMode):
    """See the module docstring. ``device``: this rank's CUDA device."""

    device: torch.device = torch.device("cuda", 0)
    total_steps: int = 2
    answer_host_reads: bool = True            # False on a real device: values exist
    cpu_op_bytes: int = 64 * 1024 ** 2
    events: List[Event] = field(default_factory=list)
    stage: str = "load"
    step: int = -1
    stage_order: List[str] = field(default_factory=list)
    h2d: Dict[Tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    d2h: Dict[Tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))
    host_reads: List[str] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()
        self._hooks = []

    # ---- stages ----------------------------------------------------------------------------
    def enter_stage(self, stage: str) -> None:
        if stage == "denoise":
            self.step += 1
        if stage != self.stage or stage == "denoise":
            self.stage = stage
            label = f"denoise step {self.step}" if stage == "denoise" else stage
            if not self.stage_order or self.stage_order[-1] != label:
                self.stage_order.append(label)

    def _forward_pre_hook(self, module, args) -> None:
        name = type(module).__name__
        if name in STAGE_OF_MODULE:
            self.enter_stage(STAGE_OF_MODULE[name])
        elif name in ("Decoder", "VideoDecoder") or (name.endswith("Decoder") and "vae" in type(module).__module__):
            self.enter_stage("decode")
        elif name.endswith("Encoder") and "vae" in type(module).__module__:
            self.enter_stage("encode")

    def _forward_hook(self, module, args, output) -> None:
        if type(module).__name__ == "StepVideoModel" and self.step == self.total_steps - 1:
            self.enter_stage("after the last DiT forward")      # what follows is no per-step cost

    def __enter__(self):
        self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(self._forward_pre_hook),
                       torch.nn.modules.module.register_module_forward_hook(self._forward_hook)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return super().__exit__(*exc)

    # ---- findings --------------------------------------------------------------------------
    def note_sync(self, what: str, detail: str = "") -> None:
        self.events.append(Event("sync", what, detail, source_line(), self.stage, self.step))

    def _note_mixed(self, op: str, detail: str) -> None:
        self.events.append(Event("mixed", op, detail, source_line(), self.stage, self.step))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "prim":                    # metadata queries (prim.device, ...): no data
            return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        cuda = [t for t in tensors if t.device.type == "cuda"]
        if name == "_local_scalar_dense" and not cuda and self.answer_host_reads:
            return self._host_read()
        if name in COPY_OPS:
            self._copy(name, tensors, args, kwargs)
        elif name in SYNC_OPS and cuda:
            self.note_sync(f"aten.{name}", SYNC_OPS[name])
        elif cuda:
            cpu = [t for t in tensors if t.device.type == "cpu" and t.ndim > 0]
            if cpu:
                shapes = ", ".join(f"{t.device}:{list(t.shape)}" for t in tensors)
                self._note_mixed(f"aten.{name}", f"inputs on cuda and cpu ({shapes})")
                target = cuda[0].device
                args, kwargs = tree_map(lambda t: t.to(target) if isinstance(t, torch.Tensor)
                                        and t.device.type == "cpu" and t.ndim > 0 else t, (args, kwargs))
        elif self.stage == "denoise" and tensors and all(t.device.type == "cpu" for t in tensors) \
                and sum(_nbytes(t) for t in tensors) >= self.cpu_op_bytes \
                and name not in ("empty", "empty_strided", "detach", "alias", "view", "_unsafe_view"):
            self._note_mixed(f"aten.{name}", f"{sum(_nbytes(t) for t in tensors) / 1024 ** 2:.0f} MiB "
                                             "computed on the CPU while the DiT denoises")
        return func(*args, **kwargs)

    def answer_cuda_read(self, what: str):
        """A value read of a CUDA tensor (``item``, ``bool()``, ...): a host sync, recorded; then
        answered like :meth:`_host_read`."""
        self.note_sync(what, "value read on the host")
        return self._host_read()

    def _host_read(self) -> int:
        """A value read of a host tensor: no device sync, but a shape-only tensor has no value.
        The reads the rehearsal knows how to answer are listed in :data:`HOST_READ_ANSWERS`;
        any other one stops the run naming its line."""
        where = source_line()
        for (path, function), (value, why) in HOST_READ_ANSWERS.items():
            if where.startswith(path) and where.endswith(f"({function})"):
                self.host_reads.append(f"{where}: answered {why}")
                return value
        raise ValueNeeded(f"{where} reads a host tensor's value; a rehearsal has none (add the read to "
                          "stepvideo/rehearsal/audit.py HOST_READ_ANSWERS with the value to assume, or pass "
                          "the number as a Python value)")

    def _copy(self, name: str, tensors: List[torch.Tensor], args, kwargs) -> None:
        if name == "_to_copy":
            src = args[0]
            dst_device = kwargs.get("device") or src.device
        else:                                               # copy_(dst, src)
            dst_device, src = args[0].device, args[1]
        dst_device = torch.device(dst_device)
        key = (self.stage, self.step)
        if src.device.type == "cpu" and dst_device.type == "cuda":
            self.h2d[key] += _nbytes(src)
        elif src.device.type == "cuda" and dst_device.type == "cpu":
            self.d2h[key] += _nbytes(src)
            if self.stage == "denoise":
                self.note_sync(f"aten.{name} to cpu", f"{_nbytes(src)} bytes copied to the host")

    # ---- summaries -------------------------------------------------------------------------
    def mixed(self) -> List[Event]:
        return [e for e in self.events if e.kind == "mixed"]

    def syncs_in_steps(self) -> Dict[int, List[Event]]:
        """Host syncs of each denoising step. A step runs from one DiT forward to the next; the
        last one ends with its DiT forward (what follows it is not repeated per step)."""
        out: Dict[int, List[Event]] = {step: [] for step in range(self.steps())}
        for e in self.events:
            if e.kind == "sync" and e.stage == "denoise" and e.step in out:
                out[e.step].append(e)
        return out

    def steps(self) -> int:
        return self.step + 1

    def most_syncs_in_a_step(self) -> int:
        """The host syncs of the denoising step with the most (0 without steps)."""
        return max((len(v) for v in self.syncs_in_steps().values()), default=0)

    def bytes_per_step(self, table) -> float:
        """Mean bytes per denoising step (0 without steps)."""
        steps = self.steps()
        if steps <= 0:
            return 0.0
        return sum(v for (stage, _), v in table.items() if stage == "denoise") / steps

    def grouped(self, kind: str) -> List[Tuple[str, int]]:
        """``"op at line (stage)"`` -> count, most frequent first."""
        counter = Counter(f"{e.op} at {e.where} [{e.stage}] {e.detail}" for e in self.events if e.kind == kind)
        return counter.most_common()


def last_line(audit: DeviceAudit, *, on_gpu: bool, ok: bool, peak_bytes: float, budget_gib: float) -> str:
    """The one line a rehearsal (or its ``--on_gpu`` twin, ``gpu:``) ends with, field for field
    the same in ``scripts/gpu_check.sh``'s runs."""
    return (f"{'gpu' if on_gpu else 'rehearsal'}: {'ok' if ok else 'FAIL'} peak_gib={peak_bytes / GIB:.2f} "
            f"budget_gib={budget_gib:g} mixed_device_ops={len(audit.mixed())} "
            f"host_syncs_per_step={audit.most_syncs_in_a_step()} "
            f"h2d_gib_per_step={audit.bytes_per_step(audit.h2d) / GIB:.2f}")


def print_events(audit: DeviceAudit, out=sys.stdout, limit: int = 20) -> None:
    for kind, title in (("mixed", "mixed-device op"), ("sync", "host sync")):
        for text, count in audit.grouped(kind)[:limit]:
            print(f"{title}: {count} x {text}", file=out)
