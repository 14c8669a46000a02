"""The multi-rank video generator behind ``run_parallel.py`` and ``benchmark/evaluation.py``.

``VideoGenerator`` loads the DiT once (validated against the parallel layout before any weight
is read), applies tensor / sequence / CFG parallelism, and generates one video per call:

1. rank 0 encodes the prompt (service, or local encoders loaded in turn with ``--no_service``)
   and, for TI2V, the first image; the results are broadcast to every rank;
2. every rank runs the identical denoising loop on its share of the work;
3. rank 0 decodes (service or local VAE) and writes the mp4, retrying with backoff; if that
   still fails, the final latents are saved next to the intended output
   (``<name>.latents.safetensors``, see :mod:`stepvideo.decode`) so no denoising is lost.

Every step is collective (:mod:`stepvideo.parallel.agree`): a failure on any rank raises the
same :class:`~stepvideo.parallel.agree.RankFailure` on every rank.

With ``--no_service`` the memory profile (``--memory_profile``, :mod:`stepvideo.memory_profiles`)
decides which of the text encoders, the DiT and the VAE is on the device in each stage.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .accelerator import accelerator
from .config import DiTConfig, OutputConfig, SamplingConfig
from .geometry import round_size
from .loading import checkpoint as ckpt
from .loading import layout

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
    encoder_device: Optional[str] = None     # --local: where the text encoders / VAE run (default: DiT device)
    fp8: bool = False                        # FP8 weights for the DiT block linears
    cpu_offload: bool = False                # DiT blocks stay in CPU memory, streamed to the device per block
    compile: bool = False                    # torch.compile every DiT block (stepvideo.perf.compile)
    decode_retries: int = 2                  # extra decode/write attempts before the latents are saved
    decode_backoff: float = 2.0              # seconds before the first retry (doubles each time)
    service_wait: float = 540.0              # pre-flight: seconds to wait for a service still loading
    memory_profile: str = "auto"             # one-GPU placement (stepvideo.memory_profiles): auto/141g/80g/48g/24g/none


class GenerationError(RuntimeError):
    """A generation failed for a reason the user can act on (service down, bad image, ...)."""


class GenerationCancelled(RuntimeError):
    """``should_cancel`` asked to stop; raised on every rank at the same step boundary."""


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        accelerator().empty_cache()


class VideoGenerator:
    """Loads the DiT once per process and generates videos on every rank of the layout."""

    def __init__(self, runtime: RuntimeConfig, state, sequence_tokens: Optional[int] = None):
        from .loading.hub import resolve_model_dir
        from .parallel.state import validate_before_loading
        from .pipelines.pipeline import StepVideoPipeline
        from .schedulers.flow_match_euler import FlowMatchDiscreteScheduler

        from .parallel.agree import on_all, on_main

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
        from .parallel import load_parallel_dit

        self.placement = self._memory_placement(runtime, state)
        # each rank materialises only its tensor-parallel shard, then SP hooks / CFG wrapper;
        # a bad shard on any rank stops every rank with the same line
        load_device = "cpu" if runtime.cpu_offload else self.placement.dit_load_device()
        self.model = on_all(state, lambda: load_parallel_dit(
            transformer_dir, state, torch_dtype=runtime.dtype, device=load_device,
            attention_backend=runtime.attention_backend))
        dit = self.dit
        if runtime.fp8 and not self.placement.profile.dit_fp8:
            from .perf.fp8 import quantize_blocks
            quantize_blocks(dit)
        self.placement.prepare_dit(dit)
        self._encoders = None                     # kept between generations when the profile says so
        if runtime.cpu_offload and not self.placement.profile.dit_streamed_blocks:
            from .perf.offload import enable_block_offload
            enable_block_offload(dit, state.device)
        if runtime.compile:
            from .perf.compile import compile_blocks
            compile_blocks(dit)
        self.pipeline = StepVideoPipeline(self.model, FlowMatchDiscreteScheduler.from_pretrained(self.root),
                                          vae_url=runtime.vae_url, caption_url=runtime.caption_url,
                                          rank=state.rank,
                                          service_token=runtime.service_token,
                                          vae_output="uint8")     # converted on the server: half the bytes
        if state.is_main and not runtime.local:
            self.pipeline.setup_api(runtime.vae_url, runtime.caption_url)   # token: flag, else the env var

    # ------------------------------------------------------------------------------------
    @staticmethod
    def _memory_placement(runtime: RuntimeConfig, state):
        """The memory profile's placement (``auto`` applies to one-GPU ``--no_service`` runs only)."""
        from .memory_profiles import Placement, resolve_profile

        name = runtime.memory_profile
        if name == "auto" and not (runtime.local and state.world_size == 1):
            name = "none"
        profile = resolve_profile(name, state.device)
        logger.info("memory profile: %s", profile.name)
        return Placement(profile, state.device)

    @property
    def dit(self):
        """The ``StepVideoModel`` (inside a CFG-parallel wrapper when there is one)."""
        return getattr(self.model, "module", self.model)

    def _caption_encoder(self):
        """Local text encoders placed by the memory profile (cached when it keeps them)."""
        from .text_encoders.caption import CaptionEncoder

        if self._encoders is not None:
            return self._encoders
        device = torch.device(self.runtime.encoder_device) if self.runtime.encoder_device \
            else self.placement.encoder_load_device()
        encoder = CaptionEncoder.from_pretrained(self.root, device=device)
        self.placement.prepare_caption_encoder(encoder)
        if self.placement.profile.encoders_stay:
            self._encoders = encoder
        return encoder

    def _encoder_device(self) -> torch.device:
        return torch.device(self.runtime.encoder_device) if self.runtime.encoder_device else self.state.device

    def _encode_inputs(self, prompt: str, sampling: SamplingConfig, first_image) -> dict:
        """Rank 0: text embeddings (and TI2V image latent) as CPU tensors."""
        from .pipelines.pipeline import encode_image
        from .io.image import prepare_first_image

        prompts = [prompt + sampling.pos_magic, sampling.neg_magic]
        needs_image = self.pipeline.is_ti2v
        if needs_image and first_image is None:
            raise ValueError(f"{self.runtime.model_dir} is an image-to-video (TI2V) checkpoint: pass "
                             "--first_image_path")
        if first_image is not None and not needs_image:
            raise ValueError(f"a first image was given ({first_image}), but {self.runtime.model_dir} is a "
                             "text-to-video (T2V) checkpoint; use a Step-Video-TI2V checkpoint or drop the image")
        image = None
        if needs_image:
            image = prepare_first_image(first_image, round_size(sampling.height), round_size(sampling.width))
        result = {}
        if self.runtime.local:
            device = self._encoder_device()
            self.placement.enter("encode", self.dit)
            encoder = self._caption_encoder()
            result["embeds"] = encoder.embedding(prompts)
            del encoder
            self.placement.release("encode", "text_encoders")
            if needs_image:
                vae = self._local_vae()
                self.placement.prepare_vae(vae, "encode")
                result["condition"] = encode_image(vae, image, sampling.seed).cpu()
                del vae
                _free(device)
                self.placement.release("encode", "vae")
        else:
            result["embeds"] = self.pipeline.caption_encoder.embedding(prompts)
            if needs_image:
                result["condition"] = encode_image(self.pipeline.vae, image, sampling.seed).cpu()
        return result

    def _local_vae(self):
        from .models.vae import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.root / layout.VAE_DIR, device=self._encoder_device())

    def _decode_vae(self):
        """The local VAE for the final decode, after the memory profile moved the DiT away."""
        self.placement.enter("decode", self.dit)
        vae = self._local_vae()
        self.placement.prepare_vae(vae, "decode")
        return vae

    # ------------------------------------------------------------------------------------
    def generate(self, prompt: str, sampling: SamplingConfig, output: OutputConfig, first_image=None,
                 progress: bool = True, *, timer=None, should_cancel: Optional[Callable[[int], bool]] = None):
        """Generate one video; returns the pipeline output on rank 0 and ``None`` elsewhere.

        Collective. Raises :class:`~stepvideo.parallel.agree.RankFailure` on every rank when any
        step fails on any rank; a failed decode/write leaves the latents on disk (see the message).

        ``timer``: a :class:`stepvideo.timing.StageTimer` to fill (one is made otherwise); its
        per-stage seconds and summary line go into the result's ``timings``, and rank 0 logs
        the summary. ``should_cancel(step)``: called on every rank after each denoising step; it
        must answer the same on every rank (the generation server broadcasts rank 0's flag);
        ``True`` raises :class:`GenerationCancelled` on every rank at that step.
        """
        from .parallel.agree import on_all, on_main
        from .timing import StageTimer

        timer = timer if timer is not None else StageTimer()
        timer.begin("encoding")
        inputs = on_main(self.state, lambda: self._encode_inputs(prompt, sampling, first_image))
        pipe = self.pipeline
        self.placement.enter("denoise", self.dit)
        if self.state.is_main and self.runtime.local:
            pipe.vae = _LazyVAE(self._decode_vae)
        timer.begin("denoising", total_steps=sampling.num_inference_steps)

        def after_step(i, t, latents):
            timer.step(i)
            if should_cancel is not None and should_cancel(i):
                raise GenerationCancelled(f"cancelled after step {i + 1}/{sampling.num_inference_steps}")

        def denoise():
            try:
                return pipe(prompt=prompt, sampling=sampling, prompt_embeds=inputs["embeds"],
                            condition_latents=inputs.get("condition"), output_type="latent", progress=progress,
                            callback=after_step)
            except GenerationCancelled as cancelled:     # not a failure: every rank stops at this step
                return cancelled

        finished = {}
        try:
            denoised = on_all(self.state, denoise)
            if isinstance(denoised, GenerationCancelled):
                raise denoised
            on_main(self.state, lambda: finished.update(result=self._finish(prompt, sampling, output, denoised,
                                                                            timer)))
        finally:
            if self.runtime.local and self.state.is_main:
                pipe.vae = None
                _free(self._encoder_device())
                self.placement.release("decode", "vae")
        timer.finish()
        result = finished.get("result") if self.state.is_main else None
        if result is not None:
            result.timings.update(timer.as_dict())
            logger.info("%s", timer.summary())
        return result

    def _finish(self, prompt: str, sampling: SamplingConfig, output: OutputConfig, denoised, timer):
        """Rank 0: decode and write the mp4, retried; if that fails the latents are kept and it raises."""
        from .decode import decode_or_keep_latents
        from .io.video import output_video_path
        from .pipelines.outputs import StepVideoPipelineOutput

        timings = dict(denoised.timings)
        path = output_video_path(output.save_path, prompt or "video", seed=sampling.seed,
                                 output_file_name=output.output_file_name, name_suffix=output.name_suffix,
                                 output_path=output.output_path)
        how = f"--vae_url {self.runtime.vae_url}" if not self.runtime.local else f"--model_dir {self.root}"
        frames = decode_or_keep_latents(self.pipeline.decode, denoised.latents, path, output, prompt=prompt,
                                        sampling=sampling, remote=not self.runtime.local, model_dir=str(self.root),
                                        decode_flag=how, retries=self.runtime.decode_retries,
                                        backoff=self.runtime.decode_backoff, timings=timings, on_stage=timer.begin)
        logger.info("Saved the generated video in %s", path)
        return StepVideoPipelineOutput(video=frames, latents=denoised.latents, path=path, timings=timings)


class _LazyVAE:
    """Loads the local VAE at the first decode and frees it right after (one-GPU mode)."""

    def __init__(self, factory):
        self._factory = factory

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self._factory()
        try:
            param = next(vae.parameters())
            return vae.decode(latents.to(param.device, param.dtype)).cpu()
        finally:
            del vae
            gc.collect()

    def encode(self, *args, **kwargs):
        return self._factory().encode(*args, **kwargs)
