"""``stepvideo.geometry``: pixel frames <-> latent frames (17 -> 3 per VAE chunk), 16x16 spatial."""
from __future__ import annotations

import pytest

from stepvideo import geometry
from stepvideo.cli import token_count as cli_token_count
from stepvideo.config import PRESETS


@pytest.mark.parametrize("frames, height, width, shape, tokens", [
    (204, 544, 992, (1, 36, 64, 34, 62), 75888),       # the T2V default
    (102, 544, 992, (1, 18, 64, 34, 62), 37944),       # the TI2V default
    (17, 64, 64, (1, 3, 64, 4, 4), 48),                # the tiny tests
    (100, 540, 960, (1, 15, 64, 33, 60), 29700),       # rounded down: 85 frames, 528 x 960
])
def test_latent_shape_and_token_count(frames, height, width, shape, tokens):
    assert geometry.latent_shape(height, width, frames) == shape
    assert geometry.token_count(height, width, frames) == tokens
    assert geometry.latent_shape(height, width, frames, channels=8, batch=2)[:3] == (2, shape[1], 8)


def test_frames_round_trip_and_short_chunks():
    for chunks in range(1, 13):
        frames = 17 * chunks
        assert geometry.latent_frames(frames) == 3 * chunks
        assert geometry.pixel_frames(geometry.latent_frames(frames)) == frames
        assert geometry.round_frames(frames + 16) == frames
    # a short last chunk of j latents decodes to 8 j - 7 frames (what the VAE does)
    assert [geometry.pixel_frames(n) for n in (1, 2, 4, 5, 7)] == [1, 9, 18, 26, 35]
    assert geometry.round_size(540) == 528 and geometry.latent_size(544, 992) == (34, 62)


def test_every_user_agrees_with_the_helper():
    from stepvideo.models.vae import AutoencoderKL
    from stepvideo.caption_service.client import RemoteVAE

    for cls in (AutoencoderKL, RemoteVAE):
        assert (cls.frame_len, cls.latent_len, cls.spatial_compression) == (17, 3, 16), cls
    for name, preset in PRESETS.items():
        assert cli_token_count(preset) == geometry.token_count(preset.height, preset.width, preset.num_frames), name
