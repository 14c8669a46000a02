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
``none``    -           today's behaviour: the DiT is loaded on the device when the generator is
                        built and stays there; encoders and VAE come and go around it
==========  ==========  =============================================================================

The budgets are the memory a card exposes: 79 GiB of an 80 GB H100, 139 GiB of an H200, 44.5 GiB of
a 48 GB L40S / RTX 6000 Ada (46,068 MiB), 23.5 GiB of a 24 GB RTX 4090 / L4 / A10 (24,564 MiB
less the driver's share). Every profile's full-size peak (``benchmark/bench_memory.py``, measured
under FakeTensorMode + MemTracker plus the stated CUDA constants) stays at least 3% under its
budget at 544x992x204 (T2V) and 544x992x102 (TI2V); the numbers are in docs/performance.md.
``auto`` picks the largest profile whose budget fits the device's total memory (``none`` on CPU).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .accelerator import accelerator

logger = logging.getLogger(__name__)

PROFILE_NAMES = ("auto", "141g", "80g", "48g", "24g", "none")


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

    @property
    def moves_dit(self) -> bool:
        return not (self.dit_on_device_for_encode and self.dit_on_device_for_decode)


PROFILES = {
    "141g": MemoryProfile("141g", 139.0, encoders_stay=True),
    "80g": MemoryProfile("80g", 79.0, dit_on_device_for_encode=False, dit_on_device_for_decode=False),
    "48g": MemoryProfile("48g", 44.5, dit_fp8=True, dit_streamed_blocks=4, dit_on_device_for_encode=False,
                         dit_on_device_for_decode=False),
    "24g": MemoryProfile("24g", 23.5, dit_streamed_blocks=48, llm_streamed=True, vae_tile=16),
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
    for candidate in ("141g", "80g", "48g", "24g"):
        if total >= PROFILES[candidate].budget_gib:
            return PROFILES[candidate]
    logger.warning("device has %.1f GiB, less than the smallest profile (24g, 23.5 GiB); using 24g", total)
    return PROFILES["24g"]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        accelerator().empty_cache()


class Placement:
    """Carries out a profile for one process: where the DiT loads, when it moves, how the
    encoders and the VAE are prepared. Every move is logged in :attr:`events`."""

    def __init__(self, profile: MemoryProfile, device):
        self.profile = profile
        self.device = torch.device(device)
        self.events: List[Tuple[str, str, str]] = []
        self._dit_where: Optional[str] = None

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

    def prepare_dit(self, dit) -> None:
        """After loading: fp8 and the block streaming the profile asks for; log where it is."""
        if self.profile.dit_fp8:
            from .perf.fp8 import quantize_blocks
            quantize_blocks(dit)
        where = "device" if self.profile.dit_on_device_for_encode else "host"
        if where == "device" and self.profile.dit_streamed_blocks:
            self._stream_dit(dit)
        self._dit_where = where
        self.log("load", "dit", where)

    def _stream_dit(self, dit) -> None:
        from .perf.offload import enable_block_offload

        blocks = len(dit.transformer_blocks)
        resident = max(0, blocks - self.profile.dit_streamed_blocks)
        if getattr(dit, "_block_streamer", None) is None and not getattr(dit, "_offload_handles", None):
            enable_block_offload(dit, self.device, blocks=dit.transformer_blocks, resident=resident)
        else:                                   # already streaming: only the resident part moves
            for block in list(dit.transformer_blocks)[:resident]:
                block.to(self.device)
            from .perf.offload import _move_except
            _move_except(dit, self.device, {id(b) for b in list(dit.transformer_blocks)[resident:]})

    def dit_to(self, dit, stage: str, where: str) -> None:
        if where == self._dit_where:
            return
        streamer = getattr(dit, "_block_streamer", None)
        if where == "device":
            if streamer is not None:            # streamed (by the profile or --use-cpu-offload): the rest moves
                from .perf.offload import _move_except
                _move_except(dit, self.device, {id(b) for b in streamer.blocks})
            elif self.profile.dit_streamed_blocks:
                self._stream_dit(dit)
            else:
                dit.to(self.device)
        else:
            skip = set() if streamer is None else {id(b) for b in streamer.blocks}
            if streamer is not None:
                streamer.release_all()          # also the block prefetched for the next step
            from .perf.offload import _move_except
            _move_except(dit, torch.device("cpu"), skip)
            _free(self.device)
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
            from .perf.offload import enable_block_offload

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
        _free(self.device)
        self.log(stage, component, "released")

    def prepare_vae(self, vae, stage: str) -> None:
        if self.profile.vae_tile is not None and hasattr(vae, "enable_tiling"):
            vae.enable_tiling(self.profile.vae_tile, min(8, self.profile.vae_tile // 2))
        self.log(stage, "vae", "device" if self.profile.vae_tile is None else f"device, tiles {self.profile.vae_tile}")
