"""``stepvideo.io.frames.to_uint8_frames``: the reference's bf16 pixel arithmetic."""
from __future__ import annotations

import pytest
import torch

from stepvideo.io.frames import to_uint8_frames


def test_to_uint8_frames_matches_reference_arithmetic():
    g = torch.Generator().manual_seed(0)
    video = (torch.randn(1, 3, 3, 8, 8, generator=g) * 1.2).to(torch.bfloat16)
    video.view(-1)[:8] = torch.tensor([-1.0, 1.0, 0.999, -0.999, 3.0, -3.0, 0.0, 0.5]).to(torch.bfloat16)
    before = video.clone()
    want = ((video.clamp(-1, 1) + 1) * 127.5).clamp(0, 255).to(torch.uint8)   # spec 5.7, all in bf16
    got = to_uint8_frames(video)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(video, before)
    # 0.999 rounds to bf16 0.99609375; +1 rounds to 2.0 in bf16, so it maps to 255 (not 254)
    assert got.view(-1)[:8].tolist() == [0, 255, 255, 0, 255, 0, 127, 191]
    with pytest.raises(ValueError, match="floating-point"):
        to_uint8_frames(got)
