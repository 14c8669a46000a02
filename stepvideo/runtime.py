"""The multi-rank generation runtime behind ``run_parallel.py`` and ``benchmark/evaluation.py``.

``VideoGenerator`` loads the DiT once (validated against the parallel layout before any weight
is read), applies tensor / sequence / CFG parallelism, and generates one video per call:

1. rank 0 encodes the prompt (service, or local encoders loaded in turn with ``--local``) and,
   for TI2V, the first image; the results are broadcast to every rank;
2. every rank runs the identical denoising loop on its share of the work;
3. rank 0 decodes (service or local VAE) and writes the mp4.

With ``--local`` the text encoders, the DiT and the VAE are never on the device at the same
time: the encoders are loaded, used and freed before the DiT's loop, the VAE after it.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .config import OutputConfig, SamplingConfig
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
    memory_profile: str = "auto"             # one-GPU placement (stepvideo.memory_profiles): auto/141g/80g/48g/24g/none


class GenerationError(RuntimeError):
    """A generation failed for a reason the user can act on (service down, bad image, ...)."""


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def broadcast_from_main(state, payload):
    """Broadcast a picklable object of CPU tensors from global rank 0 (trusted, in-process group)."""
    if not state.distributed:
        return payload
    import torch.distributed as dist

    box = [payload if state.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class VideoGenerator:
    """Loads the DiT once per process and generates videos on every rank of the layout."""

    def __init__(self, runtime: RuntimeConfig, state, sequence_tokens: Optional[int] = None):
        from .loading.hub import resolve_model_dir
        from .parallel.state import validate_before_loading
        from .pipelines.pipeline import StepVideoPipeline
        from .schedulers.flow_match_euler import FlowMatchDiscreteScheduler

        self.runtime = runtime
        self.state = state
        patterns = layout.DIT_PATTERNS + (layout.SERVICE_PATTERNS if runtime.local else [])
        if state.is_main:
            root = resolve_model_dir(runtime.model_dir, allow_patterns=patterns)
        state.barrier()       # rank 0 downloads first, the others reuse its cache
        self.root = root if state.is_main else resolve_model_dir(runtime.model_dir, allow_patterns=patterns)
        transformer_dir = self.root / layout.TRANSFORMER_DIR
        config = ckpt.read_json(transformer_dir / layout.TRANSFORMER_CONFIG)
        validate_before_loading(state.config, num_heads=int(config.get("num_attention_heads", 48)),
                                world_size=state.world_size, token_count=sequence_tokens)
        self.transformer_config = config
        from .parallel import load_parallel_dit

        self.placement = self._memory_placement(runtime, state)
        # each rank materialises only its tensor-parallel shard, then SP hooks / CFG wrapper
        self.model = load_parallel_dit(transformer_dir, state, torch_dtype=runtime.dtype,
                                       device="cpu" if runtime.cpu_offload else self.placement.dit_load_device(),
                                       attention_backend=runtime.attention_backend)
        dit = getattr(self.model, "module", self.model)          # inside a CFG-parallel wrapper
        if runtime.fp8 and not self.placement.profile.dit_fp8:
            from .perf.fp8 import quantize_blocks
            quantize_blocks(dit)
        self.placement.prepare_dit(dit)
        self._encoders = None                     # kept between generations when the profile says so
        if runtime.cpu_offload and not self.placement.profile.dit_streamed_blocks:
            from .perf.offload import enable_block_offload
            enable_block_offload(dit, state.device)
        self.pipeline = StepVideoPipeline(self.model, FlowMatchDiscreteScheduler.from_pretrained(self.root),
                                          vae_url=runtime.vae_url, caption_url=runtime.caption_url,
                                          rank=state.rank,
                                          service_token=runtime.service_token)
        if state.is_main and not runtime.local:
            self.pipeline.setup_api(runtime.vae_url, runtime.caption_url)   # token: flag, else the env var
            self.pipeline.vae.output = "uint8"     # converted on the server: half the bytes, same numbers

    # ------------------------------------------------------------------------------------
    @staticmethod
    def _memory_placement(runtime: RuntimeConfig, state):
        """The memory profile's placement (``auto`` applies to one-GPU ``--local`` runs only)."""
        from .memory_profiles import Placement, resolve_profile

        name = runtime.memory_profile
        if name == "auto" and not (runtime.local and state.world_size == 1):
            name = "none"
        profile = resolve_profile(name, state.device)
        logger.info("memory profile: %s", profile.name)
        return Placement(profile, state.device)

    @property
    def dit(self):
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
            raise ValueError("this is a TI2V checkpoint: pass --first_image_path")
        image = None
        if needs_image:
            image = prepare_first_image(first_image, sampling.height // 16 * 16, sampling.width // 16 * 16)
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
                 progress: bool = True):
        """Generate one video; returns the pipeline output on rank 0 and ``None`` elsewhere."""
        error = None
        inputs = None
        if self.state.is_main:
            try:
                inputs = self._encode_inputs(prompt, sampling, first_image)
            except Exception as exc:      # every rank must learn about it, or the others hang
                error = f"{type(exc).__name__}: {exc}"
                inputs = {"error": error}
        inputs = broadcast_from_main(self.state, inputs)
        if "error" in inputs:
            if error is not None:
                raise GenerationError(error)
            raise GenerationError(f"rank 0 failed to prepare the inputs: {inputs['error']}")

        pipe = self.pipeline
        self.placement.enter("denoise", self.dit)
        if self.state.is_main and self.runtime.local:
            pipe.vae = _LazyVAE(self._decode_vae)
        failure = None
        try:
            result = pipe(prompt=prompt, height=sampling.height, width=sampling.width, num_frames=sampling.num_frames,
                          num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
                          time_shift=sampling.time_shift, pos_magic=sampling.pos_magic, neg_magic=sampling.neg_magic,
                          motion_score=sampling.motion_score, seed=sampling.seed, prompt_embeds=inputs["embeds"],
                          condition_latents=inputs.get("condition"), output_type="mp4", output=output,
                          output_file_name=output.output_file_name, output_path=output.output_path,
                          progress=progress)
        except Exception as exc:      # rank 0's decode/write: still meet the others at the barrier
            if not self.state.distributed:
                raise
            failure, result = exc, None
        if self.runtime.local and self.state.is_main:
            pipe.vae = None
            _free(self._encoder_device())
            self.placement.release("decode", "vae")
        self.state.barrier()
        if failure is not None:
            raise failure
        return result if self.state.is_main else None


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
