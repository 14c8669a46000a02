"""Per-stage device peaks of one-GPU generation under a memory profile, and the layout table.

Built from the traced measurements of :mod:`stepvideo.perf.memory_accounting` (each a real
module run at full size under FakeTensorMode + MemTracker); what this module adds is which
components are on the device in each stage (the profile's placement) and the stated CUDA
constants. Stages:

``encode``   Step-LLM + CLIP on the prompt pair (+ the TI2V image encode), with whatever else the
             profile keeps on the device then
``step``     one CFG denoising step of the DiT (the same every step)
``decode``   the Video-VAE decode of the whole latent (preallocated video + one chunk / tile)
``write``    frames to mp4 on the host; the device holds only what the profile keeps
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..config import DiTConfig
from . import host_memory
from . import memory_accounting as acc

LAYERS = DiTConfig().num_layers          # DiT blocks of the released model
PCIE_GBPS = {"PCIe 4 x16": 25.0, "PCIe 5 x16": 50.0}     # achievable host->device GB/s (stated)


@dataclass
class StagePeak:
    stage: str
    allocated: float          # bytes allocated by PyTorch at the stage's peak
    parts: str = ""

    @property
    def total(self) -> float:
        return self.allocated + acc.overhead_bytes(self.allocated)


@dataclass
class ProfileReport:
    profile: "MemoryProfile"          # stepvideo.perf.memory_profiles (which imports perf: not imported here)
    video: acc.VideoShape
    ti2v: bool
    stages: List[StagePeak] = field(default_factory=list)
    moved_per_step: float = 0.0       # bytes copied host -> device per denoising step
    moved_per_video: float = 0.0      # bytes moved once per video (DiT on and off the device)

    @property
    def peak(self) -> float:
        return max(s.total for s in self.stages)

    @property
    def budget(self) -> float:
        return self.profile.budget_gib * acc.GIB

    @property
    def fits(self) -> bool:
        """At least 3% under the budget (no budget: 'none' always 'fits' nothing)."""
        return self.budget > 0 and self.peak <= 0.97 * self.budget


def dit_resident(step: acc.StepMeasurement, streamed: int, layers: int = LAYERS) -> float:
    """DiT bytes on the device during a step with ``streamed`` blocks streaming (two in flight)."""
    streamed = min(streamed, layers)
    return step.weights - streamed * step.block + min(2, streamed) * step.block


def profile_report(profile: "MemoryProfile", video: acc.VideoShape = acc.VideoShape(), *, ti2v: bool = False,
                   step: Optional[acc.StepMeasurement] = None, encode: Optional[acc.EncodeMeasurement] = None,
                   decode: Optional[acc.DecodeMeasurement] = None, image_encode: Optional[int] = None
                   ) -> ProfileReport:
    """Trace what is missing (bf16 / fp8 step, encoders, decode at the profile's tiling) and
    combine them by the profile's placement."""
    step = step or acc.measure_step(video, fp8=profile.dit_fp8, ti2v=ti2v, token_chunk=profile.token_chunk)
    encode = encode or acc.measure_encode()
    decode = decode or acc.measure_decode(video, tile=profile.vae_tile, chunks=1)
    if ti2v and image_encode is None:
        image_encode = acc.measure_encode_video(acc.VideoShape(video.height, video.width, 1))
    gib = acc.gib

    dit_step = dit_resident(step, profile.dit_streamed_blocks)
    if profile.dit_streamed_blocks >= LAYERS:
        dit_idle = dit_resident(step, LAYERS) - step.block      # between steps: one prefetched block
    else:
        dit_idle = dit_step
    encoders = encode.llm_weights + encode.clip_weights
    keep = encoders if profile.encoders_stay else 0.0

    if profile.llm_streamed:
        llm = encode.llm_other + 2 * encode.llm_layer + (encode.llm_peak - encode.llm_weights)
    else:
        llm = encode.llm_peak
    clip_act = max(0, encode.clip_peak - encode.clip_weights)
    dit_at_encode = dit_idle if profile.dit_on_device_for_encode else 0.0
    text = llm + encode.clip_weights + clip_act
    stages = [StagePeak("encode", dit_at_encode + text,
                        f"DiT {gib(dit_at_encode):.1f} + Step-LLM {gib(llm):.1f} + CLIP {gib(encode.clip_weights):.1f}")]
    if ti2v:
        stages.append(StagePeak("encode-image", dit_at_encode + keep + image_encode,
                                f"DiT {gib(dit_at_encode):.1f} + VAE encode {gib(image_encode):.1f}"))
    act = step.peak - step.weights
    stages.append(StagePeak("step", keep + dit_step + act,
                            f"DiT {gib(dit_step):.1f} + activations {gib(act):.1f}"
                            + (f" + encoders {gib(keep):.1f}" if keep else "")))
    dit_at_decode = dit_idle if profile.dit_on_device_for_decode else 0.0
    stages.append(StagePeak("decode", keep + dit_at_decode + decode.peak,
                            f"DiT {gib(dit_at_decode):.1f} + VAE {gib(decode.weights):.1f} + decode "
                            f"{gib(decode.peak - decode.weights):.1f}"
                            + (f" (tiles {profile.vae_tile})" if profile.vae_tile else "")
                            + (f" + encoders {gib(keep):.1f}" if keep else "")))
    stages.append(StagePeak("write", keep + dit_at_decode, "host-side mp4 writing; device keeps the resident models"))

    moved_step = min(profile.dit_streamed_blocks, LAYERS) * step.block
    moved_video = 0.0
    if profile.moves_dit:
        moved_video += 2 * dit_step                                  # on before the loop, off before decode
    if profile.llm_streamed:
        moved_video += encode.llm_weights
    return ProfileReport(profile, video, ti2v, stages, moved_step, moved_video)


def format_profile(report: ProfileReport) -> List[str]:
    lines = []
    for s in report.stages:
        lines.append(f"stage={s.stage:<12} allocated_gib={acc.gib(s.allocated):7.2f} "
                     f"device_gib={acc.gib(s.total):7.2f}  [{s.parts}]")
    if report.moved_per_step or report.moved_per_video:
        times = ", ".join(f"{name} {report.moved_per_step / 1e9 / rate:.2f} s" for name, rate in PCIE_GBPS.items())
        lines.append(f"moved_per_step_gib={acc.gib(report.moved_per_step):.2f} ({times}); "
                     f"moved_per_video_gib={acc.gib(report.moved_per_video):.2f}")
    return lines


def layout_rows(video: acc.VideoShape = acc.VideoShape(), layouts=None, *, ti2v: bool = False) -> List[Dict]:
    """Step peak per rank for each layout: bf16, fp8, and bf16 / fp8 with every block streamed."""
    layouts = layouts or [acc.DiTLayout(sp, tp, cfg) for cfg in (False, True) for tp in (1, 2)
                          for sp in (1, 2, 4, 8) if sp * tp * (2 if cfg else 1) <= 8]
    rows = []
    for layout in layouts:
        bf16 = acc.measure_step(video, layout, ti2v=ti2v)
        fp8 = acc.measure_step(video, layout, fp8=True, ti2v=ti2v)
        row = {"layout": str(layout), "world": layout.world_size, "sp": layout.sp, "tp": layout.tp,
               "cfg": layout.batch == 1}
        for name, m in (("bf16", bf16), ("fp8", fp8)):
            row[name] = m.peak
            row[name + "_weights"] = m.weights
            row[name + "_offload"] = m.peak - m.weights + dit_resident(m, LAYERS)
        row["total"] = {k: row[k] + acc.overhead_bytes(row[k], layout.world_size)
                        for k in ("bf16", "fp8", "bf16_offload", "fp8_offload")}
        rows.append(row)
    return rows


def host_sizes(profile: "MemoryProfile", video: acc.VideoShape, encode: acc.EncodeMeasurement,
               dit: acc.DiTWeights) -> host_memory.HostSizes:
    """:class:`~stepvideo.perf.host_memory.HostSizes` from the traced module sizes (the Step-LLM
    embedding and the largest DiT tensor bound the loader's one tensor in flight)."""
    block = dit.block_fp8 if profile.dit_fp8 else dit.block_bf16
    peak, frames, frame = host_memory.frame_bytes(video.height, video.width, video.num_frames)
    return host_memory.HostSizes(
        dit_loaded=dit.total_bf16, dit_other=dit.other, dit_block=block, dit_blocks=dit.layers * block,
        llm=encode.llm_weights, clip=encode.clip_weights,
        largest_tensor=max(dit.largest, encode.llm_other), frames_peak=peak, frames=frames, frame=frame)

