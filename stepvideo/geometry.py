"""Video <-> latent geometry of the Step-Video VAE and DiT: the one place these numbers live.

Spec: ``../shared/spec/STEP_VIDEO_SPEC.md`` §5.2 (size normalisation and latent shape) and
``../shared/spec/VAE_SPEC.md``.

* pixel video ``[B, T, 3, H, W]``, ``T = 17 k`` frames, ``H, W`` multiples of 16
* latents ``[B, F, C, h, w]`` with ``F = 3 k`` (every 17-frame VAE chunk <-> 3 latent frames),
  ``h = H / 16``, ``w = W / 16``
* DiT tokens per sample ``L = F * h * w`` (patch size 1, frame-major)

Pure Python (no torch): the CLI, the service client and the cost models import it cheaply.
"""
from __future__ import annotations

from typing import Tuple

FRAMES_PER_CHUNK = 17          # pixel frames per VAE chunk
LATENTS_PER_CHUNK = 3          # latent frames per VAE chunk
SPATIAL_COMPRESSION = 16       # pixels per latent pixel, each side
TEMPORAL_COMPRESSION = 8       # inside a chunk: 8 j + 1 pixel frames <-> j + 1 latent frames


def round_frames(num_frames: int) -> int:
    """Pixel frames rounded down to whole VAE chunks: ``204 -> 204``, ``100 -> 85``."""
    return num_frames // FRAMES_PER_CHUNK * FRAMES_PER_CHUNK


def round_size(pixels: int) -> int:
    """A height or width rounded down to a multiple of 16: ``540 -> 528``."""
    return pixels // SPATIAL_COMPRESSION * SPATIAL_COMPRESSION


def latent_frames(num_frames: int) -> int:
    """Latent frames ``F`` for ``num_frames`` pixel frames (whole chunks only): ``204 -> 36``."""
    return num_frames // FRAMES_PER_CHUNK * LATENTS_PER_CHUNK


def pixel_frames(num_latent_frames: int) -> int:
    """Decoded pixel frames ``T`` for ``F`` latent frames: chunks of 3 -> 17, a short last chunk
    of ``j`` latents -> ``8 j - 7`` frames (``36 -> 204``, ``4 -> 18``)."""
    full, rest = divmod(num_latent_frames, LATENTS_PER_CHUNK)
    return full * FRAMES_PER_CHUNK + (TEMPORAL_COMPRESSION * rest - 7 if rest else 0)


def latent_size(height: int, width: int) -> Tuple[int, int]:
    """Latent ``(h, w)`` for a pixel ``height x width``: ``(544, 992) -> (34, 62)``."""
    return height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION


def latent_shape(height: int, width: int, num_frames: int, channels: int = 64,
                 batch: int = 1) -> Tuple[int, int, int, int, int]:
    """Latents ``[B, F, C, h, w]`` of a ``num_frames x height x width`` video.

    ``latent_shape(544, 992, 204) == (1, 36, 64, 34, 62)``. Sizes are rounded down as the
    pipeline rounds them (whole chunks, multiples of 16).
    """
    h, w = latent_size(height, width)
    return (batch, latent_frames(num_frames), channels, h, w)


def token_count(height: int, width: int, num_frames: int) -> int:
    """DiT tokens per sample ``L = F * h * w``: ``token_count(544, 992, 204) == 75888``."""
    _, frames, _, h, w = latent_shape(height, width, num_frames)
    return frames * h * w
