"""Host (CPU) memory of one-GPU generation under a memory profile, per stage, and the RAM check.

The device side is traced (:mod:`.memory_report`); the host side follows from the same
placement: which weights the profile keeps in host memory in each stage, pinned (page-locked:
the streamed blocks' host copies, never swapped) or pageable (a component parked on the host),
plus the loader's one tensor in flight and the decoded frames. :func:`host_plan` is the one
formula; ``benchmark/bench_memory.py`` feeds it the traced module sizes, pre-flight
(:func:`decide_for_run`) the sizes read from the checkpoint's safetensors headers (no weight
is read). Stages:

``load``     the DiT read from the checkpoint (whole, on the host, when the profile parks or
             streams it; else one tensor at a time), fp8 quantisation and pinning included
``encode``   Step-LLM + CLIP (loaded to the host and streamed under 24g / 16g) beside the DiT's
             host part
``step``     the denoising loop: the streamed blocks' host copies
``decode``   the VAE decode: what the DiT keeps on the host, the decoded video and its uint8 frames
``write``    the mp4 writer: the frames plus one frame in the encoder pipe

Disk streaming (``disk=True``): the DiT blocks are not held; they are read from the
safetensors files as needed (:mod:`.disk_stream`), so the host holds at most
:data:`DISK_BLOCKS_IN_FLIGHT` blocks' bytes and the non-block weights pass through once.

The RAM seam: :func:`available_host_bytes` is the only place the machine's available memory is
read (``MemAvailable`` of ``/proc/meminfo``; ``STEPVIDEO_HOST_RAM_GIB`` overrides it, which is
how the tests simulate a small host).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import PreflightError
from ..loading import checkpoint as ckpt
from ..loading import layout

GIB = 1024 ** 3
HOST_RAM_ENV = "STEPVIDEO_HOST_RAM_GIB"
HOST_MARGIN = 0.9               # plan with at most 90% of the available RAM (the rest: Python, torch, libs)
# disk streaming: the block being read, the prefetched one and the running one (its host copy stays
# referenced until the block is released), plus two of a block's largest tensors (the FFN weights,
# a quarter block each): the mapped pages of the tensor being copied and, on CPU, the GEMM's
# working copy of a weight. Measured: tests/test_host_memory.py, stepvideo.testing.host_rss.
DISK_BLOCKS_IN_FLIGHT = 3.5


@dataclass(frozen=True)
class HostSizes:
    """Bytes of what may sit on the host. ``dit_*`` are as the profile stores them (fp8 or bf16)."""

    dit_loaded: int            # the DiT as read from the checkpoint (bf16), before any fp8 quantisation
    dit_other: int             # DiT weights outside the blocks
    dit_block: int             # one block as stored by the profile
    dit_blocks: int            # all blocks as stored by the profile
    llm: int                   # Step-LLM
    clip: int                  # HunyuanCLIP
    largest_tensor: int        # the loader's one tensor in flight
    frames_peak: int           # decoded video on the host -> uint8 frames (conversion peak)
    frames: int                # the uint8 frames handed to the mp4 writer
    frame: int                 # one uint8 frame (the writer's pipe buffer)


@dataclass
class HostStage:
    stage: str
    pinned: int
    pageable: int
    parts: str = ""

    @property
    def total(self) -> int:
        return self.pinned + self.pageable


@dataclass
class HostPlan:
    profile: str
    disk: bool
    stages: List[HostStage] = field(default_factory=list)
    read_per_step: int = 0     # bytes read from disk per denoising step (disk streaming)

    @property
    def peak(self) -> int:
        return max(s.total for s in self.stages)


def _g(x: float) -> str:
    return f"{x / GIB:.1f}"


def supports_disk(profile) -> bool:
    """Disk streaming needs a profile that streams every block with the DiT on the device (24g, 16g)."""
    return profile.dit_streamed_blocks >= 48 and profile.dit_on_device_for_encode


def host_plan(profile, sizes: HostSizes, *, disk: bool = False) -> HostPlan:
    """Host bytes per stage of ``profile`` (a :class:`~stepvideo.perf.memory_profiles.MemoryProfile`)."""
    s = sizes
    n_blocks = max(1, round(s.dit_blocks / s.dit_block)) if s.dit_block else 0
    streamed = min(profile.dit_streamed_blocks, 48, n_blocks)
    dit_stored = s.dit_other + s.dit_blocks
    parked = not profile.dit_on_device_for_encode or profile.dit_streamed_blocks   # loaded to the host first
    plan = HostPlan(profile.name, disk)

    # load
    if disk:
        in_flight = int(DISK_BLOCKS_IN_FLIGHT * s.dit_block)
        plan.stages.append(HostStage("load", 0, s.dit_other + s.largest_tensor,
                                     f"non-block weights {_g(s.dit_other)} pass through; blocks stay on disk"))
        pinned_dit = 0
        resident_blocks_host = in_flight
    elif parked:
        plan.stages.append(HostStage("load", 0, s.dit_loaded + s.largest_tensor,
                                     f"DiT read to the host {_g(s.dit_loaded)} + one tensor {_g(s.largest_tensor)}"
                                     + (" (then fp8)" if profile.dit_fp8 else "")))
        pinned_dit = streamed * s.dit_block
        resident_blocks_host = 0
    else:
        plan.stages.append(HostStage("load", 0, s.largest_tensor, "one tensor in flight (read to the device)"))
        pinned_dit = 0
        resident_blocks_host = 0
    dit_parked = dit_stored if (not profile.dit_on_device_for_encode and not disk) else 0
    stream_note = (f"disk-streamed DiT blocks in flight {_g(resident_blocks_host)}" if disk
                   else f"pinned DiT blocks {_g(pinned_dit)}")

    # a parked DiT (80g, 48g) is pageable as a whole; its streamed blocks are pinned once it goes to the device
    pinned_at_encode = 0 if dit_parked else pinned_dit
    # encode
    if profile.llm_streamed:
        enc_pinned, enc_pageable = s.llm, s.clip
        enc_note = f"Step-LLM on the host {_g(s.llm)} (layers pinned) + CLIP {_g(s.clip)} before it moves"
    else:
        enc_pinned, enc_pageable = 0, s.largest_tensor
        enc_note = "encoders read to the device, one tensor in flight"
    plan.stages.append(HostStage("encode", pinned_at_encode + enc_pinned,
                                 dit_parked + enc_pageable + resident_blocks_host,
                                 f"pinned DiT blocks {_g(pinned_at_encode)}; DiT parked {_g(dit_parked)}; {enc_note}"
                                 if not disk else f"{stream_note}; {enc_note}"))
    # step
    plan.stages.append(HostStage("step", pinned_dit, resident_blocks_host, stream_note))
    # decode / write
    if profile.dit_on_device_for_decode:
        dit_at_decode = 0
    elif disk:
        dit_at_decode = s.dit_other
    else:
        dit_at_decode = dit_stored - pinned_dit
    plan.stages.append(HostStage("decode", pinned_dit, dit_at_decode + s.largest_tensor + s.frames_peak,
                                 f"{stream_note}; DiT parked {_g(dit_at_decode)}; VAE read to the device; "
                                 f"decoded video -> uint8 frames {_g(s.frames_peak)}"))
    plan.stages.append(HostStage("write", pinned_dit, dit_at_decode + s.frames + s.frame,
                                 f"{stream_note}; frames {_g(s.frames)} + one frame in the writer pipe"))
    if disk:
        plan.read_per_step = n_blocks * s.dit_block
    return plan


def format_host(plan: HostPlan, nvme_gbps=(3.5, 7.0)) -> List[str]:
    lines = [f"host={s.stage:<12} pinned_gib={s.pinned / GIB:7.2f} pageable_gib={s.pageable / GIB:7.2f} "
             f"host_gib={s.total / GIB:7.2f}  [{s.parts}]" for s in plan.stages]
    if plan.disk:
        times = ", ".join(f"NVMe {rate:g} GB/s {plan.read_per_step / 1e9 / rate:.1f} s" for rate in nvme_gbps)
        lines.append(f"disk_read_per_step_gib={plan.read_per_step / GIB:.2f} ({times}; derived: bytes / stated "
                     f"sequential read rate)")
    return lines


# ---------------------------------------------------------------------------------------------
# the RAM seam and the pre-flight check
# ---------------------------------------------------------------------------------------------
def available_host_bytes() -> Optional[int]:
    """RAM this process may plan with: ``$STEPVIDEO_HOST_RAM_GIB`` if set, else ``MemAvailable``
    from ``/proc/meminfo``; None where neither exists (then nothing is checked)."""
    value = os.environ.get(HOST_RAM_ENV)
    if value:
        try:
            return int(float(value) * GIB)
        except ValueError:
            raise ValueError(f"{HOST_RAM_ENV} must be a number of GiB, got {value!r}") from None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class HostChoice:
    profile: object            # the MemoryProfile to run
    disk: bool                 # stream the DiT blocks from disk
    plan: HostPlan
    available: Optional[int]


def choose_for_host(profile, sizes_for, *, auto: bool, disk: Optional[bool] = None,
                    available: Optional[int] = None, fallbacks=()) -> HostChoice:
    """Check ``profile`` against the host's RAM (:func:`available_host_bytes`).

    ``sizes_for(profile)`` gives its :class:`HostSizes`. ``disk``: None = held in RAM, switched to
    disk streaming when ``auto`` and RAM is short; True / False = as asked. A profile that does
    not fit raises ``HostMemoryError`` with one line naming both figures and what would fit
    (the same profile with ``--stream_from_disk``, else the first of ``fallbacks``, smaller
    profiles, that fits), unless ``auto``, which picks disk streaming instead.
    """
    available = available_host_bytes() if available is None else available
    sizes = sizes_for(profile)
    plan = host_plan(profile, sizes, disk=bool(disk))
    if available is None or plan.peak <= HOST_MARGIN * available:
        return HostChoice(profile, bool(disk), plan, available)
    disk_plan = host_plan(profile, sizes, disk=True)
    disk_fits = supports_disk(profile) and disk_plan.peak <= HOST_MARGIN * available
    if auto and disk_fits and disk is not False:
        return HostChoice(profile, True, disk_plan, available)
    hint = "no profile fits this host; free RAM or use a machine with more"
    if disk_fits:
        hint = f"--stream_from_disk fits ({disk_plan.peak / GIB:.1f} GiB host peak)"
    else:
        for other in fallbacks or ():
            other_plan = host_plan(other, sizes_for(other), disk=supports_disk(other))
            if other_plan.peak <= HOST_MARGIN * available:
                hint = (f"--memory_profile {other.name}" + (" --stream_from_disk" if other_plan.disk else "")
                        + f" fits ({other_plan.peak / GIB:.1f} GiB host peak)")
                break
    raise HostMemoryError(f"--memory_profile {profile.name} needs {plan.peak / GIB:.1f} GiB of host RAM "
                          f"({'disk streaming' if disk else 'weights held in RAM'}), this host has "
                          f"{available / GIB:.1f} GiB available ({HOST_MARGIN:.0%} usable: "
                          f"{HOST_MARGIN * available / GIB:.1f} GiB); {hint}")


class HostMemoryError(PreflightError):
    """The chosen profile's host peak exceeds the available RAM (one line, before any weight is read)."""


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def frame_bytes(height: int, width: int, num_frames: int) -> Tuple[int, int, int]:
    """Host bytes of the decoded video of one sample: ``(conversion peak, frames, one frame)``.

    ``N = T * 3 * H * W``: the bf16 VAE output on the host (2N) and its clamped bf16 copy (2N)
    beside the uint8 pixels (N) (:func:`stepvideo.io.frames.to_uint8_frames`) = 5N; then the
    ``[T, H, W, 3]`` uint8 stack and its 540p crop (2N) go to the writer."""
    n = num_frames * 3 * height * width
    return 5 * n, 2 * n, n // max(1, num_frames)


def is_block_linear_weight(key: str, shape) -> bool:
    """A block linear's weight (fp8-quantised by ``--fp8`` / the 48g and 16g profiles)."""
    return key.endswith(".weight") and len(shape) == 2 and "scale_shift_table" not in key


def _tensor_table(files) -> Dict[str, Tuple[str, list]]:
    """key -> (dtype, shape) of every tensor in ``files`` (headers only)."""
    table = {}
    for f in files:
        for key, info in ckpt.check_safetensors_file(f).items():
            if key != "__metadata__":
                table[key] = (info["dtype"], info["shape"])
    return table


def _stored_bytes(dtype: str, shape) -> int:
    """Bytes of a safetensors entry (an unknown dtype counts 4 bytes an element)."""
    known = ckpt.SAFETENSORS_DTYPES.get(dtype)
    return math.prod(shape) * (known.itemsize if known is not None else 4)


def _files(folder: Path, pattern: str) -> List[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def sizes_from_checkpoint(model_dir, profile, height: int, width: int, num_frames: int) -> HostSizes:
    """:class:`HostSizes` from the safetensors headers of ``model_dir`` (no weight is read): the
    DiT in bf16 (as loaded), its blocks as the profile stores them, Step-LLM in bf16, CLIP as
    stored (a ``.bin`` CLIP counts its file size). The VAE is read to the device, one tensor at
    a time (``largest_tensor`` bounds it)."""
    root = Path(model_dir)
    dit = _tensor_table(_files(root / layout.TRANSFORMER_DIR, "*.safetensors"))
    llm = _tensor_table(_files(root / layout.LLM_DIR, "*.safetensors"))
    blocks: Dict[str, int] = {}
    other = loaded = largest = 0
    for key, (dtype, shape) in dit.items():
        bf16 = 2 * math.prod(shape)
        loaded += bf16
        largest = max(largest, bf16)
        if key.startswith("transformer_blocks."):
            index = key.split(".")[1]
            stored = (math.prod(shape) + 4 * shape[0]) if profile.dit_fp8 and is_block_linear_weight(key, shape) else bf16
            blocks[index] = blocks.get(index, 0) + stored
        else:
            other += bf16
    llm_bytes = sum(2 * math.prod(shape) for _, shape in llm.values())
    largest = max([largest] + [2 * math.prod(shape) for _, shape in llm.values()])
    clip_folder = root / layout.CLIP_DIR / layout.CLIP_ENCODER_SUBDIR
    clip = sum(_stored_bytes(d, s) for d, s in _tensor_table(_files(clip_folder, "*.safetensors")).values())
    clip = clip or sum(f.stat().st_size for f in _files(clip_folder, "*.bin"))
    block = max(blocks.values(), default=0)
    peak, frames, frame = frame_bytes(height, width, num_frames)
    return HostSizes(dit_loaded=loaded, dit_other=other, dit_block=block, dit_blocks=sum(blocks.values()),
                     llm=llm_bytes, clip=clip, largest_tensor=largest, frames_peak=peak, frames=frames,
                     frame=frame)


# ---------------------------------------------------------------------------------------------
# the run's decision (pre-flight and the generator ask the same question)
# ---------------------------------------------------------------------------------------------
def decide_for_run(runtime, profile, height: int = 544, width: int = 992, num_frames: int = 204,
                   *, auto: bool = False, fallbacks=()) -> HostChoice:
    """Host check of a one-process run: ``profile`` (resolved) against the available RAM, sizes
    from the checkpoint headers of ``runtime.model_dir``; ``runtime.stream_from_disk`` asks for disk
    streaming, ``auto`` (``--memory_profile auto``) lets a short host switch to it; ``fallbacks``:
    the profiles a refusal may name instead."""
    disk = True if getattr(runtime, "stream_from_disk", False) else None
    return choose_for_host(profile, lambda p: sizes_from_checkpoint(runtime.model_dir, p, height, width, num_frames),
                           auto=auto, disk=disk, fallbacks=fallbacks)
