"""Chunked encode / decode through a :class:`~stepvideo.components.VAEComponent` (``LocalVAE``,
``AutoencoderKL`` or the service's ``RemoteVAE``: the same calls for all).

Memory is bounded by one chunk: encoding sends 17 pixel frames at a time, decoding 3 latent
frames at a time (one service request each), and the chunk seams are blended afterwards with
the model's own rule (:func:`stepvideo.models.vae.mix_chunk_seams_`), so the result equals one
whole-video ``decode``. :func:`latents_to_mp4` is the one latents -> mp4 function (also for
``python -m stepvideo.decode``).

Videos are ``[B, T, 3, H, W]`` in [-1, 1]; frames are ``uint8 [T, H, W, 3]``; latents are
``[B, F, C, H/16, W/16]``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import geometry
from ..caption_service.client import RemoteVAE
from ..components import LocalVAE, VAEComponent
from ..io.frames import decoded_to_frames
from ..io.video import write_mp4
from ..models.vae import AutoencoderKL, mix_chunk_seams_

logger = logging.getLogger(__name__)

FRAME_LEN = geometry.FRAMES_PER_CHUNK          # pixel frames per encode chunk
LATENT_LEN = geometry.LATENTS_PER_CHUNK        # latent frames per decode chunk
SPATIAL = geometry.SPATIAL_COMPRESSION
FRAME_POLICIES = ("refuse", "pad", "trim")


def open_vae(model_dir: Optional[str] = None, vae_url: Optional[str] = None, *, device: str = "cpu",
             dtype: str = "bf16", token: Optional[str] = None, tiling: bool = False):
    """A :class:`~stepvideo.components.VAEComponent` with float output: a ``LocalVAE`` over the
    VAE of ``model_dir`` (model dir, ``vae/`` folder or Hub repo id) or a ``RemoteVAE``."""
    if (model_dir is None) == (vae_url is None):
        raise ValueError("give exactly one of --model_dir (run the VAE here) or --vae_url (use the service)")
    if vae_url is not None:
        vae = RemoteVAE(vae_url, token=token, output="float")
        vae.z_channels                              # fail now if the service has no VAE or is down
        return vae
    vae = AutoencoderKL.from_pretrained(model_dir, dtype=dtype, device=device)
    return LocalVAE(vae.enable_tiling() if tiling else vae, output="float")


# ------------------------------------------------------------------------------ frame counts
def valid_frame_count(t: int) -> bool:
    """17*k frames, optionally plus a short last chunk of 8*j + 1 frames (what the VAE encodes)."""
    last = t % FRAME_LEN or FRAME_LEN
    return t >= 1 and last % 8 == 1


def fit_frames(frames: np.ndarray, policy: str = "refuse") -> Tuple[np.ndarray, int]:
    """Make ``frames [T, H, W, 3]`` encodable: returns ``(frames', T)`` (T = the original count).

    ``refuse`` raises for a count the VAE does not take; ``pad`` repeats the last frame up to the
    next multiple of 17; ``trim`` drops frames down to the previous multiple of 17.
    """
    if policy not in FRAME_POLICIES:
        raise ValueError(f"frame policy must be one of {FRAME_POLICIES}, got {policy!r}")
    t = len(frames)
    if t == 0:
        raise ValueError("the video has no frames")
    if valid_frame_count(t):
        return frames, t
    down, up = t // FRAME_LEN * FRAME_LEN, -(-t // FRAME_LEN) * FRAME_LEN
    if policy == "refuse":
        raise ValueError(f"the video has {t} frames; the VAE encodes 17*k frames (optionally plus a last "
                         f"chunk of 8*j+1): pass --frames pad (repeat the last frame up to {up}) or --frames trim "
                         f"(keep {down})" if down else
                         f"the video has {t} frames; the VAE encodes 17*k frames (optionally plus a last chunk of "
                         f"8*j+1): pass --frames pad (repeat the last frame up to {up})")
    if policy == "trim":
        if down == 0:
            raise ValueError(f"--frames trim: the video has only {t} frames, fewer than one chunk of {FRAME_LEN}")
        return frames[:down], t
    pad = np.repeat(frames[-1:], up - t, axis=0)
    return np.concatenate([frames, pad], axis=0), t


def check_size(frames: np.ndarray, crop: bool = False) -> np.ndarray:
    """Sides must be multiples of 16; ``crop`` centre-crops them down instead of refusing."""
    _, h, w, _ = frames.shape
    h2, w2 = h // SPATIAL * SPATIAL, w // SPATIAL * SPATIAL
    if (h2, w2) == (h, w):
        return frames
    if not crop or h2 == 0 or w2 == 0:
        raise ValueError(f"the video is {w}x{h}; the VAE needs width and height that are multiples of {SPATIAL}"
                         + (f": pass --crop to centre-crop to {w2}x{h2}" if h2 and w2 else ""))
    top, left = (h - h2) // 2, (w - w2) // 2
    return np.ascontiguousarray(frames[:, top:top + h2, left:left + w2])


def frames_to_video(frames: np.ndarray) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> ``float32 [1, T, 3, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).unsqueeze(0)


# ------------------------------------------------------------------------------ encode / decode
@torch.no_grad()
def encode_video(vae, video: torch.Tensor, mode: str = "mean", seed: Optional[int] = None,
                 progress: bool = False) -> torch.Tensor:
    """``video [B, T, 3, H, W]`` -> latents ``[B, F, C, H/16, W/16]``, one 17-frame chunk at a time.

    ``mode="mean"``: the posterior mean (deterministic). ``mode="sample"``: a posterior draw; with
    ``seed`` chunk ``k`` is drawn with ``seed + k`` (reproducible, local or remote alike).
    """
    if mode not in ("mean", "sample"):
        raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
    starts = range(0, video.shape[1], FRAME_LEN)
    chunks = []
    for k, start in enumerate(tqdm(starts, desc="encoding", unit="chunk", disable=not progress)):
        clip = video[:, start:start + FRAME_LEN]
        chunk_seed = None if seed is None else seed + k
        # images go to the VAE in bf16, as the pipeline sends them
        z = vae.encode(clip.to(torch.bfloat16), mode=mode, seed=chunk_seed)
        chunks.append(z.float().cpu())
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Latents ``[B, F, C, h, w]`` -> video ``[B, N, 3, 16h, 16w]`` (VAE dtype, CPU), 3 latents at a time;
    equal to one whole ``vae.decode(latents)``."""
    channels = vae.z_channels
    if latents.ndim != 5 or latents.shape[2] != channels:
        raise ValueError(f"latents must be [B, F, {channels}, h, w] for this VAE, got {list(latents.shape)}")
    parts = []
    for start in tqdm(range(0, latents.shape[1], LATENT_LEN), desc="decoding", unit="chunk", disable=not progress):
        parts.append(vae.decode(latents[:, start:start + LATENT_LEN]).cpu())
    video = torch.cat(parts, dim=1)
    return mix_chunk_seams_(video, FRAME_LEN, AutoencoderKL.seam_weight)


@dataclass(frozen=True)
class VideoWriteOptions:
    """How decoded frames become an mp4 (the pipeline's defaults: crop and denoise filter on)."""

    fps: int = 25
    crop_540p: bool = True
    denoise_filter: bool = True


def latents_to_frames(vae, latents: torch.Tensor, crop_540p: bool = True, num_frames: Optional[int] = None,
                      progress: bool = False) -> np.ndarray:
    """Latents -> ``uint8 [T, H, W, 3]`` with the pipeline's arithmetic; ``num_frames`` trims padding."""
    return _to_frames(decode_latents(vae, latents, progress=progress), crop_540p, num_frames)


def _to_frames(video: torch.Tensor, crop_540p: bool, num_frames: Optional[int]) -> np.ndarray:
    frames = decoded_to_frames(video, crop_540p=crop_540p)
    return frames[:num_frames] if num_frames else frames


def latents_to_mp4(vae, latents: torch.Tensor, path: Union[str, os.PathLike],
                   options: VideoWriteOptions = VideoWriteOptions(), num_frames: Optional[int] = None,
                   progress: bool = False, *,
                   on_stage: Optional[Callable[[str], None]] = None) -> Tuple[Path, np.ndarray]:
    """Decode ``latents [B, F, C, h, w]``, post-process as the pipeline does, write ``path`` atomically.

    ``vae``: a :class:`~stepvideo.components.VAEComponent`, decoded 3 latent frames at a time
    (:func:`decode_latents`), or a function latents -> video applied whole (the generator passes
    ``StepVideoPipeline.decode``, whose component may return uint8 pixels). ``options``: anything
    with ``fps``, ``crop_540p``, ``denoise_filter`` (:class:`VideoWriteOptions`, ``OutputConfig``).
    ``num_frames`` trims padding. ``on_stage`` is called with ``"decoding"`` and ``"writing"`` as
    those stages start (a :class:`~stepvideo.timing.StageTimer`'s ``begin`` measures them).

    Returns ``(path, frames uint8 [T, H, W, 3])``: the frames the pipeline would write for the
    same latents (same conversion, same crop rule).
    """
    decode = (lambda z: decode_latents(vae, z, progress=progress)) if isinstance(vae, VAEComponent) else vae
    if on_stage is not None:
        on_stage("decoding")
    frames = _to_frames(decode(latents), options.crop_540p, num_frames)
    if on_stage is not None:
        on_stage("writing")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_mp4(path, frames, fps=options.fps, denoise=options.denoise_filter), frames
