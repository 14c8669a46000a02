"""Which speed options change the video, and by how much: one prompt, one seed, every option.

:func:`run_table` generates the same prompt with the same seed once with the baseline (the
``--dtype`` / ``--attention_backend`` given) and once per option, and compares each video's
frames with the baseline's (PSNR, max |diff|, identical) and its final latents (relative L2).
The text embeddings are computed once and shared; the VAE is loaded once.

Options (those that apply on this device; :func:`applicable_options`):

* ``fp8``: FP8 weights for the DiT block linears (``stepvideo.fp8_linear``);
* ``compile``: ``torch.compile`` of the DiT blocks (``stepvideo.perf.compile``);
* ``attention=<backend>``: each other attention backend available here (CUDA: the SDPA
  kernels, flash-attn when installed; on CPU the SDPA kernel choice has no effect);
* ``vae_tiling``: spatially tiled VAE decode (local VAE only);
* ``offload``: DiT blocks kept in CPU memory and streamed per block;
* ``sp<N>`` / ``tp2`` / ``cfg2`` / ``sp2+cfg2`` ...: parallel layouts on N ranks (CPU: spawned gloo
  ranks, up to ``max_ranks``). On CUDA the layouts are not run by this tool yet: compare a
  ``torchrun`` run with ``benchmark/compare.py``.

Peak memory is the allocator's ``max_memory_allocated`` on CUDA (reset before each option's DiT is
loaded); on CPU it is not measured (``-``).
"""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch

from .. import geometry
from ..accelerator import accelerator
from ..caption_service.client import RemoteCaptionEncoder, RemoteVAE
from ..config import SamplingConfig
from ..loading import checkpoint as ckpt
from ..loading import fp8_checkpoint, layout
from ..loading.hub import resolve_model_dir
from ..models.attention import FLASH_MODULES, SDPA_KERNELS, flash_available, resolve_backend
from ..models.vae import AutoencoderKL
from ..parallel import load_parallel_dit
from ..parallel.launch import run_on_cpu_ranks
from ..parallel.state import ParallelConfig, ParallelState
from ..perf.speed import apply_speed_options
from ..pipelines.pipeline import StepVideoPipeline
from ..schedulers.flow_match_euler import FlowMatchDiscreteScheduler
from ..text_encoders.caption import CaptionEncoder
from ..vae.codec import latents_to_frames
from .metrics import compare_videos, relative_l2

if TYPE_CHECKING:
    from ..runtime.generator import RuntimeConfig

logger = logging.getLogger(__name__)

DEFAULT_SEED = 42
DEFAULT_PROMPT = "一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光"


@dataclass(frozen=True)
class SpeedOption:
    """One row of the table: what differs from the baseline."""

    name: str
    fp8: bool = False
    compile: bool = False
    attention_backend: Optional[str] = None
    vae_tiling: bool = False
    offload: bool = False
    layout: Optional[Dict[str, object]] = None          # ParallelConfig kwargs; None = one process

    @property
    def world_size(self) -> int:
        if not self.layout:
            return 1
        return (int(self.layout.get("ulysses_degree", 1)) * int(self.layout.get("tensor_parallel_degree", 1))
                * (2 if self.layout.get("cfg_parallel") else 1))


@dataclass(frozen=True)
class LosslessSetup:
    """Model, sampling and where the parts run (built by the entry point from its flags).

    ``runtime``: the baseline's model dir, ``dtype``, ``attention_backend`` and where the text
    encoders and the VAE run (``local``, ``vae_url``, ``caption_url``, ``service_token``); its
    speed options are not read (the table measures each option on its own).
    """

    runtime: RuntimeConfig
    sampling: SamplingConfig
    prompt: str = DEFAULT_PROMPT
    max_ranks: int = 2


@dataclass
class OptionResult:
    option: str
    seconds: Optional[float] = None
    peak_memory_gib: Optional[float] = None
    psnr: Optional[float] = None
    ssim: Optional[float] = None
    max_abs_diff: Optional[int] = None
    identical: Optional[bool] = None
    latents_rel_l2: Optional[float] = None
    note: str = ""
    frames: Optional[object] = field(default=None, repr=False)
    latents: Optional[torch.Tensor] = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("frames", "latents")}


LAYOUTS = {          # name -> (ParallelConfig kwargs); run when the world size fits
    "sp2": {"ulysses_degree": 2}, "tp2": {"ulysses_degree": 1, "tensor_parallel_degree": 2},
    "cfg2": {"ulysses_degree": 1, "cfg_parallel": True}, "sp4": {"ulysses_degree": 4},
    "sp2+tp2": {"ulysses_degree": 2, "tensor_parallel_degree": 2},
    "sp2+cfg2": {"ulysses_degree": 2, "cfg_parallel": True},
}


def applicable_options(device: torch.device, max_ranks: int, local_vae: bool = True,
                       baseline_backend: str = "sdpa") -> List[SpeedOption]:
    """Every option that can run here (see the module docstring)."""

    options = [SpeedOption("fp8", fp8=True), SpeedOption("compile", compile=True)]
    if device.type == "cuda":
        backends = ["sdpa", *SDPA_KERNELS] + [b for b in FLASH_MODULES if b != "flash" and flash_available(b)]
        options += [SpeedOption(f"attention={b}", attention_backend=b) for b in backends if b != baseline_backend]
    if local_vae:
        options.append(SpeedOption("vae_tiling", vae_tiling=True))
    options.append(SpeedOption("offload", offload=True))
    if device.type == "cpu":
        for name, ranks_layout in LAYOUTS.items():
            option = SpeedOption(name, layout=ranks_layout)
            if option.world_size <= max_ranks:
                options.append(option)
    return options


def select_options(available: Sequence[SpeedOption], names: Optional[Sequence[str]]) -> List[SpeedOption]:
    if not names:
        return list(available)
    by_name = {o.name: o for o in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"--options: {', '.join(unknown)} not applicable here; available: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def tiling_for(height: int, width: int):
    """``(tile, overlap)`` in latent pixels: the VAE default (32, 8), or for frames whose latent
    side is at most 32 (tiny test sizes) a tile one smaller than the side, so tiling really happens."""
    side = min(height, width) // geometry.SPATIAL_COMPRESSION
    if side > 32:
        return 32, 8
    tile = max(2, side - 1)
    return tile, max(1, tile // 4)


# ------------------------------------------------------------------------------ one option
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        accelerator().synchronize(device)


def _denoise(dit, root, sampling: SamplingConfig, embeds: dict, rank: int = 0) -> torch.Tensor:
    pipe = StepVideoPipeline(dit, FlowMatchDiscreteScheduler.from_pretrained(root), rank=rank)
    out = pipe(prompt="-", height=sampling.height, width=sampling.width, num_frames=sampling.num_frames,
               num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
               time_shift=sampling.time_shift, seed=sampling.seed, prompt_embeds=embeds, output_type="latent",
               progress=False)
    return out.latents.float().cpu()


def _load_dit(setup: LosslessSetup, root, state, option: SpeedOption):
    backend = option.attention_backend or setup.runtime.attention_backend
    dit = load_parallel_dit(root / layout.TRANSFORMER_DIR, state, torch_dtype=setup.runtime.dtype,
                            device="cpu" if option.offload else state.device, attention_backend=backend)
    apply_speed_options(getattr(dit, "module", dit), state.device, fp8=option.fp8, offload=option.offload,
                        compile=option.compile)
    return dit


def _layout_worker(setup: LosslessSetup, root, option: SpeedOption, embeds: dict) -> dict:
    """Runs on every spawned rank: load the DiT for the layout, denoise, return rank 0's latents."""

    state = ParallelState.from_env(ParallelConfig(**option.layout))
    dit = _load_dit(setup, root, state, option)
    start = time.perf_counter()
    latents = _denoise(dit, root, setup.sampling, embeds, rank=state.rank)
    return {"latents": latents if state.is_main else None, "seconds": time.perf_counter() - start}


class LosslessRunner:
    """Holds what all options share: the resolved model dir, the text embeddings, the VAE."""

    def __init__(self, setup: LosslessSetup):
        self.setup = setup
        patterns = layout.DIT_PATTERNS + (layout.SERVICE_PATTERNS if setup.runtime.local else [])
        self.root = resolve_model_dir(setup.runtime.model_dir, allow_patterns=patterns)
        transformer = self.root / layout.TRANSFORMER_DIR
        fp8_checkpoint.refuse(ckpt.read_json(transformer / layout.TRANSFORMER_CONFIG), transformer,
                              "benchmark/lossless.py (its baseline is the bf16 model)",
                              "its fp8 row quantises the bf16 folder at load time")
        self.state = ParallelState.from_env(ParallelConfig())
        self.device = self.state.device
        sampling = setup.sampling
        prompts = [setup.prompt + sampling.pos_magic, sampling.neg_magic]
        if setup.runtime.local:
            encoder = CaptionEncoder.from_pretrained(self.root, device=self.device)
            self.embeds = {k: v.cpu() for k, v in encoder.embedding(prompts).items()}
            del encoder
            gc.collect()
            self.vae = AutoencoderKL.from_pretrained(self.root / layout.VAE_DIR, device=self.device)
        else:
            runtime = setup.runtime
            self.embeds = RemoteCaptionEncoder(runtime.caption_url, token=runtime.service_token).embedding(prompts)
            self.vae = RemoteVAE(runtime.vae_url, token=runtime.service_token, output="float")
        self.baseline: Optional[OptionResult] = None

    def _frames(self, latents: torch.Tensor, tiling: bool):
        if tiling:
            self.vae.enable_tiling(*tiling_for(self.setup.sampling.height, self.setup.sampling.width))
        try:
            return latents_to_frames(self.vae, latents, crop_540p=False)
        finally:
            if tiling:
                self.vae.disable_tiling()

    def run(self, option: SpeedOption) -> OptionResult:
        """Generate with ``option`` and compare with the baseline (which :meth:`run_baseline` made)."""
        result = OptionResult(option.name)
        try:
            if option.layout:
                # the ranks use the baseline's thread count: CPU kernels may block (and round) by threads
                values = run_on_cpu_ranks(_layout_worker, option.world_size,
                                          args=(self.setup, self.root, option, self.embeds), timeout=1800,
                                          threads_per_rank=torch.get_num_threads())
                latents, result.seconds = values[0]["latents"], max(v["seconds"] for v in values)
            else:
                if self.device.type == "cuda":
                    accelerator().empty_cache()
                    accelerator().reset_peak_memory_stats(self.device)
                dit = _load_dit(self.setup, self.root, self.state, option)
                _sync(self.device)
                start = time.perf_counter()
                latents = _denoise(dit, self.root, self.setup.sampling, self.embeds)
                _sync(self.device)
                result.seconds = time.perf_counter() - start
                if self.device.type == "cuda":
                    result.peak_memory_gib = accelerator().max_memory_allocated(self.device) / 2 ** 30
                del dit
                gc.collect()
            result.latents = latents
            result.frames = self._frames(latents, option.vae_tiling)
        except Exception as exc:          # one failing option must not lose the others' rows
            result.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.error("option %s failed: %s", option.name, exc)
            return result
        if self.baseline is not None and self.baseline.frames is not None:
            cmp = compare_videos(self.baseline.frames, result.frames)
            result.psnr, result.ssim, result.max_abs_diff, result.identical = (cmp.psnr, cmp.ssim, cmp.max_abs_diff,
                                                                               cmp.identical)
            result.latents_rel_l2 = relative_l2(result.latents, self.baseline.latents)
        return result

    def run_baseline(self) -> OptionResult:
        self.baseline = self.run(SpeedOption("baseline"))
        if self.baseline.frames is None:
            raise RuntimeError(f"the baseline failed ({self.baseline.note}); no option can be compared")
        self.baseline.psnr, self.baseline.ssim, self.baseline.max_abs_diff = math.inf, 1.0, 0
        self.baseline.identical, self.baseline.latents_rel_l2 = True, 0.0
        return self.baseline


def run_table(setup: LosslessSetup, names: Optional[Sequence[str]] = None, progress: bool = True) -> List[OptionResult]:
    """Baseline, then every selected applicable option; one :class:`OptionResult` per row."""
    if setup.sampling.seed is None:
        setup = replace(setup, sampling=setup.sampling.with_overrides(seed=DEFAULT_SEED))
    runner = LosslessRunner(setup)

    baseline_backend = resolve_backend(setup.runtime.attention_backend)       # "auto" -> what it picks here
    options = select_options(applicable_options(runner.device, setup.max_ranks, local_vae=setup.runtime.local,
                                                baseline_backend=baseline_backend), names)
    rows = [runner.run_baseline()]
    for option in options:
        if progress:
            logger.info("option %s ...", option.name)
        rows.append(runner.run(option))
    return rows


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "psnr":
        return "inf" if math.isinf(value) else f"{value:.2f}"
    if kind == "bool":
        return "yes" if value else "no"
    if kind == "g":
        return f"{value:.3g}"
    return format(value, kind)


def table_lines(rows: Sequence[OptionResult]) -> List[str]:
    """option | seconds | peak memory | psnr | max |diff| | identical | latents rel. L2 | note."""
    header = ("option", "seconds", "peak_mem_gib", "psnr", "max|diff|", "identical", "latents_rel_l2", "note")
    cells = [header] + [(r.option, _fmt(r.seconds, ".2f"), _fmt(r.peak_memory_gib, ".2f"), _fmt(r.psnr, "psnr"),
                         _fmt(r.max_abs_diff, "d"), _fmt(r.identical, "bool"), _fmt(r.latents_rel_l2, "g"), r.note)
                        for r in rows]
    widths = [max(len(c[k]) for c in cells) for k in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
