"""Named memory profiles for one-GPU generation (``--memory_profile``) and the placement they imply.

A profile says, for a card of a given size, how the DiT is stored (bf16 / fp8, how many blocks
stream from host memory), where the text encoders and the VAE run, and when each component is
on the device. :class:`Placement` carries it out for the generator and keeps an event log
(``placement.events``: ``(stage, component, where)``) that the tests read.

==========  ==========  =============================================================================
profile     budget      placement (DiT = 48 blocks of 1.125 GiB bf16 / 0.56 GiB fp8 + 0.7 GiB other)
==========  ==========  =============================================================================
``141g``    139 GiB     bf16; DiT, Step-LLM, CLIP and VAE all stay on the device
``80g``     79 GiB      bf16; encoders run (then leave) before the DiT comes to the device; all 48
                        blocks resident (nothing streams per step); the DiT leaves the device while
                        the VAE decodes
``48g``     44.5 GiB    fp8 DiT weights + the 80g placement, 4 blocks stream (prefetched)
``24g``     23.5 GiB    bf16 DiT, every block streams with prefetch; Step-LLM layers stream the same
                        way; the VAE decodes in 16 x 16 latent tiles
``16g``     15.5 GiB    the 24g placement with fp8 DiT blocks (half the bytes streamed) and
                        token-chunked blocks (:mod:`stepvideo.models.token_chunks`, 8192 tokens)
``none``    -           today's behaviour: the DiT is loaded on the device when the generator is
                        built and stays there; encoders and VAE come and go around it
==========  ==========  =============================================================================

The budgets are the memory a card exposes: 79 GiB of an 80 GB H100, 139 GiB of an H200, 44.5 GiB of
a 48 GB L40S / RTX 6000 Ada (46,068 MiB), 23.5 GiB of a 24 GB RTX 4090 / L4 / A10 (24,564 MiB
less the driver's share), 15.5 GiB of a 16 GB RTX 4080 / 4070 Ti Super / 5070 Ti / A4000 /
T4 (16,376 MiB less the driver's share). Every profile's full-size peak (``benchmark/bench_memory.py``, measured
under FakeTensorMode + MemTracker plus the stated CUDA constants) stays at least 3% under its
budget at 544x992x204 (T2V) and 544x992x102 (TI2V); the numbers are in docs/performance.md.
``auto`` picks the largest profile whose budget fits the device's total memory (``none`` on CPU)
for a one-GPU ``--no_service`` run; rank 0 of a multi-rank ``--no_service`` run gets
:data:`RANK0_PARKS_DIT` on a card under 141g's budget (:func:`run_profile`); other runs ``none``.

Host RAM: :func:`check_host` (pre-flight, before any weight is read) compares the profile's host
peak (:mod:`stepvideo.perf.host_memory`) with the available RAM and refuses in one line, or, with
``auto``, switches a streaming profile to disk streaming (:mod:`stepvideo.perf.disk_stream`);
:meth:`Placement.for_run` asks the same question for the generator.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ..accelerator import accelerator, free_device
from ..fp8_linear import quantize_blocks
from ..models.token_chunks import DEFAULT_TOKEN_CHUNK, set_token_chunk
from ..parallel import parallelize_dit
from . import host_memory
from .disk_stream import load_dit_from_disk
from .host_memory import GIB
from .offload import _move_except, enable_block_offload

logger = logging.getLogger(__name__)

PROFILE_NAMES = ("auto", "141g", "80g", "48g", "24g", "16g", "none")


@dataclass(frozen=True)
class MemoryProfile:
    """How one-GPU generation places its components on a card with ``budget_gib`` usable."""

    name: str
    budget_gib: float                   # usable device memory the profile is sized for (0: no budget)
    dit_fp8: bool = False               # fp8 e4m3 block linears
    dit_streamed_blocks: int = 0        # last N DiT blocks stream from host memory (prefetched)
    dit_on_device_for_encode: bool = True    # False: the DiT comes to the device after the encoders left
    dit_on_device_for_decode: bool = True    # False: the DiT leaves the device while the VAE decodes
    encoders_stay: bool = False         # text encoders / VAE stay on the device between uses
    llm_streamed: bool = False          # Step-LLM layers stream from host memory like the DiT blocks
    vae_tile: Optional[int] = None      # latent tile size of the VAE decode (None: whole 3-latent chunks)
    token_chunk: Optional[int] = None   # DiT blocks run token-chunked (stepvideo.models.token_chunks)

    @property
    def moves_dit(self) -> bool:
        return not (self.dit_on_device_for_encode and self.dit_on_device_for_decode)


PROFILES = {
    "141g": MemoryProfile("141g", 139.0, encoders_stay=True),
    "80g": MemoryProfile("80g", 79.0, dit_on_device_for_encode=False, dit_on_device_for_decode=False),
    "48g": MemoryProfile("48g", 44.5, dit_fp8=True, dit_streamed_blocks=4, dit_on_device_for_encode=False,
                         dit_on_device_for_decode=False),
    "24g": MemoryProfile("24g", 23.5, dit_streamed_blocks=48, llm_streamed=True, vae_tile=16),
    "16g": MemoryProfile("16g", 15.5, dit_fp8=True, dit_streamed_blocks=48, llm_streamed=True, vae_tile=16,
                         token_chunk=DEFAULT_TOKEN_CHUNK),
    "none": MemoryProfile("none", 0.0),
}


def device_memory_gib(device) -> Optional[float]:
    """Total memory of a CUDA ``device`` in GiB, None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or not accelerator().is_available():
        return None
    return accelerator().total_memory(device) / 1024 ** 3


def resolve_profile(name: str, device) -> MemoryProfile:
    """``name`` (one of :data:`PROFILE_NAMES`) -> a profile; ``auto`` from the device's memory."""
    if name not in PROFILE_NAMES:
        raise ValueError(f"--memory_profile must be one of {', '.join(PROFILE_NAMES)}, got {name!r}")
    if name != "auto":
        return PROFILES[name]
    total = device_memory_gib(device)
    if total is None:
        return PROFILES["none"]
    for candidate in ("141g", "80g", "48g", "24g", "16g"):
        if total >= PROFILES[candidate].budget_gib:
            return PROFILES[candidate]
    logger.warning("device has %.1f GiB, less than the smallest profile (16g, 15.5 GiB); using 16g", total)
    return PROFILES["16g"]


# Rank 0 of a multi-rank ``--no_service`` run encodes and decodes on top of its DiT share. On a card
# under the 141g size its share waits on the host meanwhile, as the 80g profile does for one GPU
# (an SP4 rank 0 on an 80 GB card kept it there: 96.5 GiB while encoding, benchmark/rehearse.py).
# Nothing else of a profile applies (no fp8, no streaming): every rank holds the same DiT.
RANK0_PARKS_DIT = MemoryProfile("auto (rank 0 parks its DiT)", 0.0, dit_on_device_for_encode=False,
                                dit_on_device_for_decode=False)


def run_profile_name(runtime, world_size: int) -> str:
    """The profile a run asks for: ``auto`` applies to one-GPU ``--no_service`` runs only (else ``none``)."""
    name = runtime.memory_profile
    if name == "auto" and not (runtime.local and world_size == 1):
        return "none"
    return name


def run_profile(runtime, world_size: int, rank: int, device) -> MemoryProfile:
    """The profile rank ``rank`` runs: :func:`run_profile_name` resolved on ``device``, except that
    with ``auto`` rank 0 of a multi-rank ``--no_service`` run on a card under 141g's budget gets
    :data:`RANK0_PARKS_DIT`."""
    if runtime.memory_profile == "auto" and runtime.local and world_size > 1 and rank == 0:
        total = device_memory_gib(device)
        if total is not None and total < PROFILES["141g"].budget_gib:
            return RANK0_PARKS_DIT
    return resolve_profile(run_profile_name(runtime, world_size), device)


def check_host(runtime, sampling, parallel=None):
    """Pre-flight: the run's profile against the host's RAM before any weight is read (one-line
    ``HostMemoryError`` naming both figures and what fits; with ``auto`` a short host switches to
    disk streaming, logged). Only one-process ``--no_service`` runs hold the encoders; others are
    checked for the DiT alone the same way. Returns the :class:`~stepvideo.perf.host_memory.HostChoice`."""
    world = parallel.world_size if parallel is not None else 1
    name = run_profile_name(runtime, world)
    profile = run_profile(runtime, world, 0, _run_device())      # rank 0 holds the most
    if getattr(runtime, "stream_from_disk", False) and not host_memory.supports_disk(profile):
        streaming = ", ".join(p.name for p in PROFILES.values() if host_memory.supports_disk(p))
        raise host_memory.HostMemoryError(
            f"--stream_from_disk needs a profile that streams every DiT block ({streaming}); this run uses "
            f"--memory_profile {profile.name}" + (f" (auto: {runtime.memory_profile})" if name != profile.name else ""))
    fallbacks = [PROFILES["none"]] if profile is RANK0_PARKS_DIT else smaller_profiles(profile)
    choice = host_memory.decide_for_run(runtime, profile, sampling.height, sampling.width, sampling.num_frames,
                                        auto=runtime.memory_profile == "auto", fallbacks=fallbacks)
    if choice.disk and not getattr(runtime, "stream_from_disk", False):
        logger.warning("host RAM: %.1f GiB available, profile %s holds more; streaming the DiT blocks from disk "
                       "(host peak %.1f GiB)", choice.available / GIB, profile.name, choice.plan.peak / GIB)
    return choice


def smaller_profiles(profile: MemoryProfile) -> List[MemoryProfile]:
    """Profiles with a smaller device budget (``none``: all), largest first: what fits a host
    short of RAM better (they hold less, or stream from disk)."""
    budget = profile.budget_gib or float("inf")
    return sorted((p for p in PROFILES.values() if 0 < p.budget_gib < budget), key=lambda p: -p.budget_gib)


def _run_device():
    return torch.device("cuda") if accelerator().is_available() else torch.device("cpu")


class Placement:
    """Carries out a profile for one process: where the DiT loads, when it moves, how the
    encoders and the VAE are prepared. Every move is logged in :attr:`events`."""

    def __init__(self, profile: MemoryProfile, device, *, disk: bool = False):
        self.profile = profile
        self.device = torch.device(device)
        self.disk = disk and host_memory.supports_disk(profile)     # streamed blocks read from the files
        self._disk_source = None
        self.events: List[Tuple[str, str, str]] = []
        self._dit_where: Optional[str] = None

    @classmethod
    def for_run(cls, profile: MemoryProfile, device, runtime, *, auto: bool = False) -> "Placement":
        """The placement of a run: disk streaming when asked (``--stream_from_disk``) or when
        ``auto`` finds the host short of RAM (the same decision as pre-flight's)."""
        disk = bool(getattr(runtime, "stream_from_disk", False))
        if not disk and host_memory.supports_disk(profile):
            disk = host_memory.decide_for_run(runtime, profile, auto=auto, fallbacks=smaller_profiles(profile)).disk
        return cls(profile, device, disk=disk)

    def log(self, stage: str, component: str, where: str) -> None:
        self.events.append((stage, component, where))
        logger.debug("memory profile %s: %s: %s -> %s", self.profile.name, stage, component, where)

    # ---- the DiT ------------------------------------------------------------------------
    def dit_load_device(self) -> torch.device:
        """Where the DiT's weights are read to: the host when it must wait for the encoders or
        stream blocks, else the device."""
        if self.profile.dit_on_device_for_encode and not self.profile.dit_streamed_blocks:
            return self.device
        return torch.device("cpu")

    def dit_loader(self, default: Callable) -> Callable:
        """The DiT loader for this placement: ``default`` (``load_parallel_dit``), or, for disk
        streaming, one that reads only the non-block weights (:mod:`stepvideo.perf.disk_stream`)."""
        if not self.disk:
            return default

        def load(transformer_dir, state, *, torch_dtype, device=None, attention_backend="auto"):
            model, self._disk_source = load_dit_from_disk(transformer_dir, torch_dtype=torch_dtype,
                                                          device=self.device, fp8=self.profile.dit_fp8,
                                                          attention_backend=attention_backend)
            return parallelize_dit(model, state, shard_weights=False)
        return load

    def prepare_dit(self, dit) -> None:
        """After loading: fp8 and the block streaming the profile asks for; log where it is."""
        if self.profile.dit_fp8 and not self.disk:             # disk: quantised when built, per block when read
            quantize_blocks(dit)
        if self.profile.token_chunk:
            set_token_chunk(dit, self.profile.token_chunk)
        where = "device" if self.profile.dit_on_device_for_encode else "host"
        if where == "device" and self.profile.dit_streamed_blocks:     # always so with disk (supports_disk)
            self._stream_dit(dit)
        self._dit_where = where
        self.log("load", "dit", where)

    def _stream_dit(self, dit) -> None:
        """Stream the profile's blocks (from the files with disk streaming, where every block streams)."""
        blocks = len(dit.transformer_blocks)
        resident = max(0, blocks - self.profile.dit_streamed_blocks)
        if getattr(dit, "_block_streamer", None) is None and not getattr(dit, "_offload_handles", None):
            enable_block_offload(dit, self.device, blocks=dit.transformer_blocks, resident=resident,
                                 source=self._disk_source)
            if self.disk:
                self.log("load", "dit_blocks", "disk")
        else:                                   # already streaming: only the resident part moves
            for block in list(dit.transformer_blocks)[:resident]:
                block.to(self.device)
            _move_except(dit, self.device, {id(b) for b in list(dit.transformer_blocks)[resident:]})

    def dit_to(self, dit, stage: str, where: str) -> None:
        if where == self._dit_where:
            return
        streamer = getattr(dit, "_block_streamer", None)
        if where == "device":
            if streamer is not None:            # streamed (by the profile or --use-cpu-offload): the rest moves
                _move_except(dit, self.device, {id(b) for b in streamer.blocks})
            elif self.profile.dit_streamed_blocks:
                self._stream_dit(dit)
            else:
                dit.to(self.device)
        else:
            skip = set() if streamer is None else {id(b) for b in streamer.blocks}
            if streamer is not None:
                streamer.release_all()          # also the block prefetched for the next step
            _move_except(dit, torch.device("cpu"), skip)
            free_device(self.device)
        self._dit_where = where
        self.log(stage, "dit", where)

    def enter(self, stage: str, dit) -> None:
        """Stage ``encode`` / ``denoise`` / ``decode`` is about to start: move the DiT as needed."""
        if stage == "encode" and not self.profile.dit_on_device_for_encode:
            self.dit_to(dit, stage, "host")
        elif stage == "denoise":
            self.dit_to(dit, stage, "device")
        elif stage == "decode" and not self.profile.dit_on_device_for_decode:
            self.dit_to(dit, stage, "host")

    # ---- encoders and VAE ---------------------------------------------------------------
    def encoder_load_device(self) -> torch.device:
        return torch.device("cpu") if self.profile.llm_streamed else self.device

    def prepare_caption_encoder(self, encoder) -> None:
        """Stream the Step-LLM layers (24g) with CLIP and the embedding on the device."""
        if self.profile.llm_streamed:
            llm = encoder.text_encoder.text_encoder               # STEP1TextEncoder -> Step1Model
            enable_block_offload(llm, self.device, blocks=llm.transformer.layers)
            clip = getattr(encoder.clip, "text_encoder", None)
            if clip is not None:
                clip.to(self.device)
            self.log("encode", "step_llm", "streamed")
        else:
            self.log("encode", "step_llm", "device")
        self.log("encode", "clip", "device")

    def release(self, stage: str, component: str) -> None:
        free_device(self.device)
        self.log(stage, component, "released")

    def prepare_vae(self, vae, stage: str) -> None:
        if self.profile.vae_tile is not None and hasattr(vae, "enable_tiling"):
            vae.enable_tiling(self.profile.vae_tile, min(8, self.profile.vae_tile // 2))
        self.log(stage, "vae", "device" if self.profile.vae_tile is None else f"device, tiles {self.profile.vae_tile}")
