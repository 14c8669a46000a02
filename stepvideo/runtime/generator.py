"""The multi-rank video generator behind ``run_parallel.py`` and ``benchmark/evaluation.py``.

``VideoGenerator`` loads the DiT once (validated against the parallel layout before any weight
is read), applies tensor / sequence / CFG parallelism, and generates one video per call:

1. rank 0: ``StepVideoPipeline.encode_inputs`` (service, or local encoders loaded on demand with
   ``--no_service``) and, for TI2V, the first image; the results are broadcast to every rank;
2. every rank: ``StepVideoPipeline.denoise_inputs``, the identical loop on its share of the work;
3. rank 0: ``StepVideoPipeline.write_video`` decodes (service or local VAE) and writes the mp4,
   retrying with backoff; if that still fails, the final latents are saved next to the intended
   output (``<name>.latents.safetensors``, see :mod:`stepvideo.decode`) so no denoising is lost.

The generator only places these three stages on ranks and builds the pipeline's components.

Every step is collective (:mod:`stepvideo.parallel.agree`): a failure on any rank raises the
same :class:`~stepvideo.parallel.agree.RankFailure` on every rank.

With ``--no_service`` the memory profile (``--memory_profile``, :mod:`stepvideo.perf.memory_profiles`)
decides which of the text encoders, the DiT and the VAE is on the device in each stage: the
pipeline holds :mod:`stepvideo.runtime.placed_components`, which load on demand where the profile says.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from ..config import DiTConfig, OutputConfig, SamplingConfig
from ..errors import GenerationCancelled
from ..caption_service.client import READY_TIMEOUT_S
from ..io.video import output_video_path
from ..loading import checkpoint as ckpt
from ..loading import fp8_checkpoint, layout
from ..loading.hub import resolve_model_dir
from ..parallel import load_parallel_dit
from ..parallel.agree import on_all, on_main
from ..parallel.state import validate_before_loading
from ..perf.cache import cache_applied
from ..perf.memory_profiles import Placement, run_profile
from ..perf.speed import apply_speed_options
from ..pipelines.outputs import StepVideoPipelineOutput
from ..pipelines.pipeline import KeepLatents, StepVideoPipeline
from ..schedulers.flow_match_euler import FlowMatchDiscreteScheduler
from ..timing import StageTimer
from .placed_components import PlacedCaptionEncoder, PlacedVAE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeConfig:
    """Model location and the run-time choices of a generation process."""

    model_dir: str = "./ckpts"
    dtype: str = "bf16"
    attention_backend: str = "auto"
    local: bool = False
    vae_url: str = "127.0.0.1"
    caption_url: str = "127.0.0.1"
    service_token: Optional[str] = None
    fp8: bool = False                        # FP8 weights for the DiT block linears
    cpu_offload: bool = False                # DiT blocks stay in CPU memory, streamed to the device per block
    compile: bool = False                    # torch.compile every DiT block (stepvideo.perf.compile)
    decode_retries: int = 2                  # extra decode/write attempts before the latents are saved
    decode_backoff: float = 2.0              # seconds before the first retry (doubles each time)
    service_wait: float = READY_TIMEOUT_S    # seconds to wait for a service still loading (pre-flight, --serve)
    memory_profile: str = "auto"             # one-GPU placement (stepvideo.perf.memory_profiles): auto/141g/80g/48g/24g/16g/none
    stream_from_disk: bool = False           # streamed DiT blocks read from the checkpoint files (perf.disk_stream)


class VideoGenerator:
    """Loads the DiT once per process and generates videos on every rank of the layout."""

    def __init__(self, runtime: RuntimeConfig, state, sequence_tokens: Optional[int] = None):
        self.runtime = runtime
        self.state = state
        patterns = layout.DIT_PATTERNS + (layout.SERVICE_PATTERNS if runtime.local else [])
        # rank 0 downloads first (a failure reaches every rank), the others reuse its cache
        root = on_main(state, lambda: str(resolve_model_dir(runtime.model_dir, allow_patterns=patterns)))

        def read_config():
            local_root = Path(root) if state.is_main else resolve_model_dir(runtime.model_dir, allow_patterns=patterns)
            config = ckpt.read_json(local_root / layout.TRANSFORMER_DIR / layout.TRANSFORMER_CONFIG)
            validate_before_loading(state.config, num_heads=DiTConfig.from_dict(config).num_attention_heads,
                                    world_size=state.world_size, token_count=sequence_tokens)
            return local_root, config

        self.root, config = on_all(state, read_config)
        transformer_dir = self.root / layout.TRANSFORMER_DIR
        self.transformer_config = config

        self.placement = self._memory_placement(runtime, state)
        profile = self.placement.profile
        on_all(state, lambda: fp8_checkpoint.check_memory_profile(config, transformer_dir, runtime.memory_profile,
                                                                   profile.dit_fp8))
        # each rank materialises only its tensor-parallel shard, then SP hooks / CFG wrapper;
        # a bad shard on any rank stops every rank with the same line
        load_device = "cpu" if runtime.cpu_offload else self.placement.dit_load_device()
        load_dit = self.placement.dit_loader(load_parallel_dit)     # disk streaming reads no block here
        self.model = on_all(state, lambda: load_dit(
            transformer_dir, state, torch_dtype=runtime.dtype, device=load_device,
            attention_backend=runtime.attention_backend))
        apply_speed_options(self.dit, state.device, fp8=runtime.fp8 and not profile.dit_fp8,
                            offload=runtime.cpu_offload and not profile.dit_streamed_blocks,
                            compile=runtime.compile, prepare=self.placement.prepare_dit)
        self.pipeline = self._pipeline(runtime, state)

    def _pipeline(self, runtime: RuntimeConfig, state) -> StepVideoPipeline:
        """The pipeline with rank 0's components: on-demand local models (``--no_service``) or
        the service's clients (uint8 decode, converted on the server: half the bytes)."""
        how = f"--vae_url {runtime.vae_url}" if not runtime.local else f"--model_dir {self.root}"
        keep = KeepLatents(retries=runtime.decode_retries, backoff=runtime.decode_backoff, decode_flag=how,
                           decoder="local" if runtime.local else "service-uint8", model_dir=str(self.root))
        local = runtime.local and state.is_main
        pipeline = StepVideoPipeline(
            self.model, FlowMatchDiscreteScheduler.from_pretrained(self.root), vae_url=runtime.vae_url,
            caption_url=runtime.caption_url, rank=state.rank, service_token=runtime.service_token,
            vae_output="uint8", source=runtime.model_dir, keep_latents=keep,
            caption_encoder=PlacedCaptionEncoder(self.root, self.placement, self.dit) if local else None,
            vae=PlacedVAE(self.root, self.placement, self.dit) if local else None)
        if state.is_main and not runtime.local:
            pipeline.setup_api(runtime.vae_url, runtime.caption_url)   # token: flag, else the env var
        return pipeline

    @staticmethod
    def _memory_placement(runtime: RuntimeConfig, state) -> Placement:
        """The memory profile's placement (``auto``: one-GPU ``--no_service`` runs by the card's
        size; rank 0 of a multi-rank ``--no_service`` run parks its DiT share while it encodes and
        decodes, :data:`~stepvideo.perf.memory_profiles.RANK0_PARKS_DIT`)."""
        profile = run_profile(runtime, state.world_size, state.rank, state.device)
        logger.info("memory profile: %s", profile.name)
        return Placement.for_run(profile, state.device, runtime, auto=runtime.memory_profile == "auto")

    @property
    def dit(self):
        """The ``StepVideoModel`` (inside a CFG-parallel wrapper when there is one)."""
        return getattr(self.model, "module", self.model)

    # ------------------------------------------------------------------------------------
    def generate(self, prompt: str, sampling: SamplingConfig, output: OutputConfig, first_image=None,
                 progress: bool = True, *, timer: Optional[StageTimer] = None,
                 should_cancel: Optional[Callable[[int], bool]] = None):
        """Generate one video; returns the pipeline output on rank 0 and ``None`` elsewhere.

        Collective. Raises :class:`~stepvideo.parallel.agree.RankFailure` on every rank when any
        step fails on any rank; a failed decode/write leaves the latents on disk (see the message).

        ``timer``: a :class:`stepvideo.timing.StageTimer` to fill (one is made otherwise); its
        per-stage seconds and summary line are the result's ``timings``, and rank 0 logs the
        summary. ``should_cancel(step)``: called on every rank after each denoising step; it
        must answer the same on every rank (the generation server broadcasts rank 0's flag);
        ``True`` raises :class:`~stepvideo.errors.GenerationCancelled` on every rank at that step.
        """
        timer = timer if timer is not None else StageTimer()
        pipe, state = self.pipeline, self.state
        timer.begin("encoding")
        inputs = on_main(state, lambda: pipe.encode_inputs(prompt, sampling, first_image))
        latents = self._denoise_on_all(inputs, sampling, progress, timer, should_cancel)
        written = {}             # rank 0 only: the frames stay where they were written, not broadcast
        on_main(state, partial(self._write, written, latents, prompt, sampling, output, timer))
        timer.finish()
        if not state.is_main:
            return None
        logger.info("%s", timer.summary())
        return StepVideoPipelineOutput(video=written["frames"], latents=latents, path=written["path"],
                                       timings=timer.as_dict())

    def _write(self, written: dict, latents, prompt: str, sampling: SamplingConfig, output: OutputConfig,
               timer) -> None:
        """Rank 0: the mp4 path (unique at write time), then ``pipeline.write_video``; fills ``written``
        with ``path`` and ``frames``."""
        path = output_video_path(output.save_path, prompt or "video", seed=sampling.seed,
                                 output_file_name=output.output_file_name, name_suffix=output.name_suffix,
                                 output_path=output.output_path)
        frames = self.pipeline.write_video(latents, path, output, prompt=prompt, sampling=sampling, timer=timer)
        written.update(path=path, frames=frames)

    def _denoise_on_all(self, inputs, sampling: SamplingConfig, progress: bool, timer: StageTimer,
                        should_cancel: Optional[Callable[[int], bool]]):
        """Every rank: the DiT to where the profile wants it, then ``pipeline.denoise_inputs``; a cancel
        stops every rank at the same step."""

        def after_step(i, t, latents):
            if should_cancel is not None and should_cancel(i):
                raise GenerationCancelled(f"cancelled after step {i + 1}/{sampling.num_inference_steps}")

        def denoise():
            self.placement.enter("denoise", self.dit)
            try:
                # --cache: diffusers' hooks; without one, perf.cache is not even entered
                steps_cache = cache_applied(self.dit, sampling.cache) if sampling.cache else nullcontext()
                with steps_cache:
                    return self.pipeline.denoise_inputs(inputs, sampling, callback=after_step, progress=progress,
                                                        timer=timer)
            except GenerationCancelled as cancelled:     # not a failure: every rank stops at this step
                return cancelled

        latents = on_all(self.state, denoise)
        if isinstance(latents, GenerationCancelled):
            raise latents
        return latents
