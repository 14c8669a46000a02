"""``AutoencoderKL``: the Step-Video Video-VAE v2 facade (chunked encode/decode, seam blend,
posterior, loading).

Layouts (frames second, as the pipelines use them):

* video ``[B, T, 3, H, W]`` in ``[-1, 1]``, ``T = 17k`` (or ``17k + 8j + 1`` with a short last chunk)
* latents ``[B, F, z, H/16, W/16]``, 17 frames <-> 3 latent frames per chunk; no scaling.

Encode runs the encoder on independent 17-frame chunks; decode runs the decoder on
independent 3-latent chunks, writes each chunk into one preallocated output and blends the
two frames around every chunk seam (:func:`mix_chunk_seams_`). Optional spatial tiling
(off by default) bounds the activation memory of one decoder call; see ``docs/vae.md``.

Loading::

    vae = AutoencoderKL.from_pretrained("ckpts/stepvideo-t2v")   # model dir, vae/ dir or the file
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import geometry
from ..loading import layout
from ..loading.checkpoint import (assert_materialized, constructor_kwargs, find_weight_files, load_files_into_model,
                                  load_state_into_model, parse_dtype, read_json)
from ..loading.hub import looks_like_repo_id, resolve_model_dir
from .vae_decoder import VideoDecoder
from .vae_encoder import VideoEncoder
from .vae_rank_split import decode_rank_split

logger = logging.getLogger(__name__)

VAE_CONFIG_FILE = "config.json"
VAE_WEIGHTS_NAME = layout.VAE_V2_FILE[: -len(".safetensors")]   # "vae_v2"

# file key prefix -> module key prefix (the official file stores decoder.conv_out.{weight,bias})
CHECKPOINT_RENAMES = {"decoder.conv_out.": "decoder.conv_out.conv."}


def checkpoint_to_module_key(key: str) -> str:
    """Map a ``vae_v2.safetensors`` key to the module's state-dict key."""
    for file_prefix, module_prefix in CHECKPOINT_RENAMES.items():
        if key.startswith(file_prefix) and not key.startswith(module_prefix):
            return module_prefix + key[len(file_prefix):]
    return key


def module_to_checkpoint_key(key: str) -> str:
    """Inverse of :func:`checkpoint_to_module_key` (used to write files in the official naming)."""
    for file_prefix, module_prefix in CHECKPOINT_RENAMES.items():
        if key.startswith(module_prefix):
            return file_prefix + key[len(module_prefix):]
    return key


# ----------------------------------------------------------------------------------------
# Posterior and seam blending
# ----------------------------------------------------------------------------------------

@dataclass
class DiagonalGaussianDistribution:
    """Posterior ``N(mean, exp(logvar))`` from encoder moments ``[B, F, 2z, h, w]``
    (channels ``[0:z]`` = mean, ``[z:2z]`` = logvar, clamped to ``[-30, 20]``)."""

    mean: torch.Tensor      # [B, F, z, h, w]
    logvar: torch.Tensor    # [B, F, z, h, w]

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussianDistribution":
        mean, logvar = moments.chunk(2, dim=-3)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn in float32 (from ``generator``, or the
        global RNG as the reference does) and cast to the moments' dtype."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=device)
        eps = eps.to(device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps


def mix_chunk_seams_(video: torch.Tensor, frame_len: int = 17, weight: float = 0.6) -> torch.Tensor:
    """Blend the two frames around every chunk seam of ``video [B, N, C, H, W]``, in place.

    With ``front`` = frames ``16, 33, ...`` (< N-1) and ``back`` = ``17, 34, ...`` (< N):
    first ``back <- 0.6*back + 0.4*front``, then ``front <- 0.6*front + 0.4*back`` using the
    updated ``back`` (the reference's sequential order). Returns ``video``.
    """
    n = video.shape[1]
    front = list(range(frame_len - 1, n - 1, frame_len))
    back = list(range(frame_len, n, frame_len))
    if not back:
        return video
    q = 1.0 - weight
    video[:, back] = video[:, back] * weight + video[:, front] * q
    video[:, front] = video[:, front] * weight + video[:, back] * q
    return video


# ----------------------------------------------------------------------------------------
# Spatial tiling (optional)
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TilingConfig:
    """Spatial tiling of one decoder call: latent tiles of ``tile_size`` x ``tile_size`` that
    overlap by ``overlap`` latent pixels, blended with linear ramps. Approximate: GroupNorm and
    the mid-block attention see only their tile (error measured in ``docs/vae.md``)."""

    tile_size: int = 32
    overlap: int = 8

    def __post_init__(self):
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1 latent pixel, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"overlap must be in [0, tile_size), got {self.overlap} (tile_size {self.tile_size})")


def _tile_spans(size: int, tile: int, overlap: int) -> List[Tuple[int, int, int, int]]:
    """Tiles covering ``[0, size)``: ``(start, stop, lead, trail)`` where ``lead``/``trail`` are
    the overlaps with the previous/next tile (the last tile is aligned to the end)."""
    if size <= tile:
        return [(0, size, 0, 0)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    spans = []
    for i, start in enumerate(starts):
        stop = start + tile
        lead = starts[i - 1] + tile - start if i > 0 else 0
        trail = stop - starts[i + 1] if i + 1 < len(starts) else 0
        spans.append((start, stop, lead, trail))
    return spans


def _ramp(length: int, lead: int, trail: int, device) -> torch.Tensor:
    """Weights ``[length]``: linear ramps over ``lead`` first / ``trail`` last entries, 1 elsewhere."""
    w = torch.ones(length, dtype=torch.float32, device=device)
    if lead:
        w[:lead] = (torch.arange(lead, dtype=torch.float32, device=device) + 0.5) / lead
    if trail:
        w[length - trail:] = torch.minimum(
            w[length - trail:], (torch.arange(trail, 0, -1, dtype=torch.float32, device=device) - 0.5) / trail)
    return w


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

class AutoencoderKL(nn.Module):
    """Step-Video Video-VAE (version 2): 16x16 spatial and 8x temporal compression.

    Args:
        in_channels, out_channels: pixel channels (3).
        z_channels: latent channels (64 for the released model).
        num_res_blocks: ResNet blocks per encoder level (decoder: one more).
        model_path: optional checkpoint (file, ``vae/`` folder or model dir) loaded strictly
            into the freshly built module (the reference's constructor argument).
            Prefer :meth:`from_pretrained`, which builds on the meta device.
        weight_dict: optional state dict (checkpoint key names) loaded strictly.
        world_size: > 1 makes :meth:`decode` split its chunks over the ranks of the default
            ``torch.distributed`` group (see :mod:`stepvideo.models.vae_rank_split`).
        version: only 2 (the released VAE) is implemented.
        encoder_ch, encoder_ch_mult, decoder_ch, decoder_ch_mult: trunk widths (the defaults
            are the released model; the tiny test model shrinks them).

    Per-frame GroupNorm (version 2) is a property of this instance's norm layers; nothing
    global is changed.
    """

    frame_len = geometry.FRAMES_PER_CHUNK        # 17 pixel frames per encode chunk
    latent_len = geometry.LATENTS_PER_CHUNK      # 3 latent frames per decode chunk
    spatial_compression = geometry.SPATIAL_COMPRESSION
    temporal_compression = geometry.TEMPORAL_COMPRESSION
    scaling_factor = 1.0           # latents are used as-is
    seam_weight = 0.6
    _checkpoint_renames = CHECKPOINT_RENAMES
    _no_split_modules = ("ResnetBlock3D", "CausalAttnBlock", "Upsample3D")

    def __init__(self, in_channels: int = 3, out_channels: int = 3, z_channels: int = 64, num_res_blocks: int = 2,
                 model_path: Optional[Union[str, os.PathLike]] = None,
                 weight_dict: Optional[Dict[str, torch.Tensor]] = None, world_size: int = 1, version: int = 2,
                 encoder_ch: int = 32, encoder_ch_mult: Sequence[int] = (4, 8, 16, 16),
                 decoder_ch: int = 128, decoder_ch_mult: Sequence[int] = (1, 2, 4, 4)):
        super().__init__()
        if version != 2:
            raise ValueError(f"only version=2 (vae_v2.safetensors, the released VAE) is implemented, got version={version}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.num_res_blocks = num_res_blocks
        self.version = version
        self.world_size = world_size
        self.encoder_ch = encoder_ch
        self.encoder_ch_mult = tuple(encoder_ch_mult)
        self.decoder_ch = decoder_ch
        self.decoder_ch_mult = tuple(decoder_ch_mult)
        self.per_frame_group_norm = version == 2
        self.tiling: Optional[TilingConfig] = None

        self.encoder = VideoEncoder(in_channels, encoder_ch, self.encoder_ch_mult, num_res_blocks, z_channels,
                                    per_frame_norm=self.per_frame_group_norm)
        self.decoder = VideoDecoder(out_channels, decoder_ch, self.decoder_ch_mult, num_res_blocks, z_channels,
                                    per_frame_norm=self.per_frame_group_norm)

        if model_path is not None:
            weights, _ = resolve_vae_files(model_path)
            device = next(self.parameters()).device
            load_files_into_model(self, [weights], dtype=None, device="cpu" if device.type == "meta" else device,
                                  rename=checkpoint_to_module_key, strict=True)
        if weight_dict:
            device = next(self.parameters()).device
            load_state_into_model(self, weight_dict.items(), device="cpu" if device.type == "meta" else device,
                                  rename=checkpoint_to_module_key, strict=True, where="weight_dict")

    # -- config ---------------------------------------------------------------------------

    def to_config(self) -> dict:
        """Constructor kwargs of this architecture (what ``vae/config.json`` holds)."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "z_channels": self.z_channels,
                "num_res_blocks": self.num_res_blocks, "version": self.version,
                "encoder_ch": self.encoder_ch, "encoder_ch_mult": list(self.encoder_ch_mult),
                "decoder_ch": self.decoder_ch, "decoder_ch_mult": list(self.decoder_ch_mult)}

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_tiling(self, tile_size: int = 32, overlap: int = 8) -> "AutoencoderKL":
        """Decode in overlapping spatial tiles of ``tile_size`` latent pixels (approximate)."""
        self.tiling = TilingConfig(tile_size, overlap)
        return self

    def disable_tiling(self) -> "AutoencoderKL":
        self.tiling = None
        return self

    # -- encode ---------------------------------------------------------------------------

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"video must be [B, T, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        t, h, w = x.shape[1], x.shape[3], x.shape[4]
        s = self.spatial_compression
        if h % s or w % s:
            raise ValueError(f"video height and width must be multiples of {s}, got {h}x{w}")
        last = t % self.frame_len or self.frame_len
        if last % 8 != 1:
            raise ValueError(f"video frames must be 17*k, optionally plus a short last chunk of 8*j+1 frames; "
                             f"got T={t} (last chunk {last} frames)")

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output, chunk by chunk.

        ``x [B, T, 3, H, W]`` -> moments ``[B, F, 2z, H/16, W/16]`` (mean | logvar on dim 2),
        ``F = sum over 17-frame chunks of (T_c - 1)/8 + 1``.
        """
        self._check_video(x)
        x = x.to(device=self.device, dtype=self.dtype)
        chunks = []
        for start in range(0, x.shape[1], self.frame_len):
            clip = x[:, start:start + self.frame_len].permute(0, 2, 1, 3, 4)   # [B, 3, T_c, H, W]
            chunks.append(self.encoder(clip).permute(0, 2, 1, 3, 4))          # [B, F_c, 2z, h, w]
        return chunks[0].contiguous() if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def posterior(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Encode ``x [B, T, 3, H, W]`` to the diagonal Gaussian posterior over ``[B, F, z, h, w]``."""
        return DiagonalGaussianDistribution.from_moments(self.encode_moments(x))

    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
               mode: str = "sample", seed: Optional[int] = None) -> torch.Tensor:
        """``x [B, T, 3, H, W]`` in [-1, 1] -> latents ``[B, F, z, H/16, W/16]`` (on the VAE's device).

        ``mode="sample"`` (the reference behaviour) returns ``mean + std * eps`` with ``eps``
        from ``generator``, or from a CPU generator seeded with ``seed`` (the same draw as
        ``RemoteVAE.encode(x, seed=seed)``), or from the global RNG with neither;
        ``mode="mean"`` returns the mean.
        """
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either seed or generator to encode, not both")
            generator = torch.Generator(device="cpu").manual_seed(seed)
        dist = self.posterior(x)
        return dist.mean if mode == "mean" else dist.sample(generator)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic encode: the posterior mean ``[B, F, z, h, w]``."""
        return self.encode(x, mode="mean")

    # -- decode ---------------------------------------------------------------------------

    def num_frames(self, num_latents: int) -> int:
        """Decoded frame count for ``num_latents`` latent frames (chunks of 3 -> 17)."""
        return geometry.pixel_frames(num_latents)

    def chunk_bounds(self, num_latents: int) -> List[Tuple[int, int, int, int]]:
        """``(latent_start, latent_stop, frame_start, frame_stop)`` of every decode chunk."""
        bounds, frame = [], 0
        for start in range(0, num_latents, self.latent_len):
            stop = min(start + self.latent_len, num_latents)
            frames = geometry.pixel_frames(stop - start)
            bounds.append((start, stop, frame, frame + frames))
            frame += frames
        return bounds

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[2] != self.z_channels:
            raise ValueError(f"latents must be [B, F, {self.z_channels}, h, w], got shape {tuple(z.shape)}")

    @torch.no_grad()
    def decode_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Decode one independent chunk ``z [B, F_c, z, h, w]`` (F_c <= 3) -> ``[B, 8F_c-7, 3, 16h, 16w]``
        (no seam blending; tiled when :meth:`enable_tiling` was called)."""
        self._check_latents(z)
        z = z.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)  # [B, z, F_c, h, w]
        if self.tiling is None or max(z.shape[-2:]) <= self.tiling.tile_size:
            return self.decoder(z).permute(0, 2, 1, 3, 4)                     # [B, T_c, 3, H, W]
        return self._decode_tiled(z)

    def _decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        """Tiled :meth:`decode_chunk` for ``z [B, z, F_c, h, w]``; returns ``[B, T_c, 3, H, W]``."""
        cfg, s = self.tiling, self.spatial_compression
        b, _, f, h, w = z.shape
        out = torch.zeros(b, geometry.pixel_frames(f), self.out_channels, h * s, w * s, dtype=torch.float32,
                          device=z.device)
        weight = torch.zeros(h * s, w * s, dtype=torch.float32, device=z.device)
        for y0, y1, lead_y, trail_y in _tile_spans(h, cfg.tile_size, cfg.overlap):
            wy = _ramp((y1 - y0) * s, lead_y * s, trail_y * s, z.device)
            for x0, x1, lead_x, trail_x in _tile_spans(w, cfg.tile_size, cfg.overlap):
                wx = _ramp((x1 - x0) * s, lead_x * s, trail_x * s, z.device)
                w2 = wy[:, None] * wx[None, :]                                # [th*16, tw*16]
                tile = self.decoder(z[..., y0:y1, x0:x1]).permute(0, 2, 1, 3, 4)   # [B, T_c, 3, th*16, tw*16]
                out[..., y0 * s:y1 * s, x0 * s:x1 * s] += tile.float() * w2
                weight[y0 * s:y1 * s, x0 * s:x1 * s] += w2
                del tile
        return out.div_(weight).to(self.dtype)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``z [B, F, z, h, w]`` -> video ``[B, N, 3, 16h, 16w]`` (``N = 17F/3`` for F a
        multiple of 3), in the model dtype, unclamped.

        Chunks of 3 latents are decoded independently into one preallocated output, then the
        seams are blended in place. With ``world_size > 1`` the chunks are split over ranks.
        """
        self._check_latents(z)
        if self.world_size > 1:
            return decode_rank_split(self, z)
        b, f, _, h, w = z.shape
        s = self.spatial_compression
        out = torch.empty(b, self.num_frames(f), self.out_channels, h * s, w * s, dtype=self.dtype, device=self.device)
        for l0, l1, t0, t1 in self.chunk_bounds(f):
            out[:, t0:t1] = self.decode_chunk(z[:, l0:l1])
        return self.mix(out)

    def mix(self, video: torch.Tensor) -> torch.Tensor:
        """In-place seam blend of ``video [B, N, 3, H, W]`` (see :func:`mix_chunk_seams_`)."""
        return mix_chunk_seams_(video, self.frame_len, self.seam_weight)

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: Optional[Union[torch.dtype, str]] = torch.bfloat16,
                        device: Union[torch.device, str] = "cpu", **overrides) -> "AutoencoderKL":
        """Load the VAE from ``path``: a model dir containing ``vae/``, a ``vae/`` folder, the
        ``vae_v2.safetensors`` file itself, or a Hub repo id; in ``dtype`` (``None``: as stored).

        ``vae/config.json`` (written by the tiny factory; absent in the official folder, whose
        architecture is the default) supplies constructor kwargs; unknown keys are ignored and
        ``overrides`` win. The module is built on the meta device and the file is streamed in
        with strict key checking (``CheckpointKeyError`` names every missing/unexpected/misshaped
        key; ``CorruptCheckpointError`` for git-lfs pointers and truncated files).
        """
        weights, config_file = resolve_vae_files(path)
        config = read_json(config_file) if config_file is not None else {}
        kwargs = constructor_kwargs(cls, config)
        kwargs.update(overrides)
        kwargs.pop("model_path", None)
        kwargs.pop("weight_dict", None)
        with torch.device("meta"):
            model = cls(**kwargs)
        dtype = None if dtype is None else parse_dtype(dtype)
        load_files_into_model(model, [weights], dtype=dtype, device=device,
                              rename=checkpoint_to_module_key, strict=True)
        assert_materialized(model, f"AutoencoderKL from {weights}")
        logger.info("loaded VAE from %s (%s, %s)", weights, model.dtype, device)
        return model.eval().requires_grad_(False)


def resolve_vae_files(path: Union[str, os.PathLike]) -> Tuple[Path, Optional[Path]]:
    """Return ``(weights file, config.json or None)`` for a file, a ``vae/`` folder, a model dir
    or a Hub repo id."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_file():
        folder, weights = p.parent, p
    else:
        if not p.exists():
            if not looks_like_repo_id(text):
                raise FileNotFoundError(f"VAE checkpoint not found: {text!r} (expected a model dir, its vae/ "
                                        f"folder, the {layout.VAE_V2_FILE} file, or a Hub repo id)")
            p = resolve_model_dir(text, allow_patterns=[f"{layout.VAE_DIR}/{layout.VAE_V2_FILE}",
                                                        f"{layout.VAE_DIR}/{VAE_CONFIG_FILE}"])
        folder = p / layout.VAE_DIR if (p / layout.VAE_DIR).is_dir() else p
        files = find_weight_files(folder, VAE_WEIGHTS_NAME)
        if len(files) != 1:
            raise ValueError(f"expected one VAE weights file in {folder}, found {len(files)}")
        weights = files[0]
        if weights.name == "vae.safetensors":
            raise ValueError(f"{weights} is the version-1 VAE; only {layout.VAE_V2_FILE} (version 2) is supported")
    config = folder / VAE_CONFIG_FILE
    return weights, (config if config.is_file() else None)


def iter_checkpoint_items(model: AutoencoderKL) -> Iterable[Tuple[str, torch.Tensor]]:
    """``(checkpoint key, tensor)`` pairs of ``model`` in state-dict order (official file naming)."""
    for key, value in model.state_dict().items():
        yield module_to_checkpoint_key(key), value
