"""The service's request-cost predictions (``stepvideo.caption_service.cost``) on the tiny VAE: the tracker
agrees with torch's MemTracker and with the real tensors of a real decode, and the composed
per-request prediction agrees with a trace of the whole request."""
from __future__ import annotations

import pytest
import torch

from stepvideo.caption_service.cost import (RUNTIME_OVERHEAD_BYTES, LiveBytesTracker, RequestTooCostly, VAECostModel,
                                    check_budget, nbytes)
from stepvideo.caption_service.protocol import ProtocolError


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    from stepvideo.models.vae import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def cost(vae):
    return VAECostModel(vae)


def test_tracker_matches_memtracker_on_the_fake_decode(cost):
    from torch.distributed._tools.mem_tracker import MemTracker

    mine = cost._decode_chunk(3, 4, 4)
    mode, model = cost._fake_model()
    for p in model.parameters():
        p.requires_grad_(True)              # MemTracker hooks the parameters' gradients
    try:
        with mode:
            z = torch.empty(1, 3, 8, 4, 4, dtype=torch.bfloat16)
            tracker = MemTracker()
            with tracker, torch.no_grad():
                model.decode_chunk(z)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    activations = sum(v for k, v in peak.items() if "ACT" in str(k) or "TEMP" in str(k))
    assert mine > 0 and abs(mine - activations) <= 0.01 * activations     # MemTracker rounds to blocks


def test_fake_trace_equals_the_real_tensors_of_a_real_decode(vae, cost):
    z = torch.randn(1, 3, 8, 3, 3, dtype=torch.bfloat16)
    tracker = LiveBytesTracker()
    with tracker, torch.inference_mode():
        vae.decode_chunk(z)
    assert tracker.live >= 0 and tracker.peak > 0
    assert abs(cost._decode_chunk(3, 3, 3) - tracker.peak) <= 0.02 * tracker.peak


def test_decode_prediction_composes_to_a_trace_of_the_whole_decode(cost):
    shape = (2, 7, 8, 4, 4)                   # three chunks (3, 3, 1 latents), batch 2
    mode, model = cost._fake_model()
    with mode, torch.no_grad():
        z = torch.empty(shape, dtype=torch.float32)
        tracker = LiveBytesTracker()
        with tracker:
            model.decode(z)
    predicted = cost.decode_bytes(shape, torch.float32, "float") - RUNTIME_OVERHEAD_BYTES - nbytes(shape, torch.float32)
    assert tracker.peak <= predicted <= 1.1 * tracker.peak


def test_encode_prediction_covers_a_trace_of_the_whole_encode(cost):
    shape = (1, 34, 3, 32, 32)                # two 17-frame chunks
    mode, model = cost._fake_model()
    with mode, torch.no_grad():
        x = torch.empty(shape, dtype=torch.float32)
        tracker = LiveBytesTracker()
        with tracker:
            model.encode(x, generator=None, mode="sample")
    predicted = cost.encode_bytes(shape, torch.float32) - RUNTIME_OVERHEAD_BYTES - nbytes(shape, torch.float32)
    assert tracker.peak <= predicted <= 1.5 * tracker.peak


def test_limits_and_budget_messages(cost):
    with pytest.raises(ProtocolError, match="65 latent frames") as info:
        cost.check_decode_shape((1, 65, 8, 2, 2))
    assert info.value.status == 422
    with pytest.raises(ProtocolError, match="multiples of 16"):
        cost.check_encode_shape((1, 17, 3, 20, 32))
    with pytest.raises(ProtocolError, match="T=5"):
        cost.check_encode_shape((1, 5, 3, 32, 32))
    with pytest.raises(RequestTooCostly, match=r"shape \[1, 2, 8, 64, 64\] would need about 2\.00 GiB.*1\.00 GiB") as info:
        check_budget("decode", (1, 2, 8, 64, 64), 2 << 30, 1 << 30)
    assert info.value.status == 413 and info.value.details["predicted_gib"] == 2.0
    check_budget("decode", (1, 1, 8, 1, 1), 1 << 20, 1 << 30)      # inside the budget: no error


def test_the_default_budget_gives_a_gpu_request_most_of_the_free_memory():
    """A GPU runs one model call at a time, so the default budget is 0.9 of its free memory after
    loading (0.5 refused the 204-frame 544x992 decode on an 80 GB card that holds the encoders and
    the VAE: benchmark/rehearse.py --service); the host keeps 0.5. Several devices: the smallest."""
    from stepvideo.accelerator import using
    from stepvideo.caption_service.cost import available_memory, default_budget
    from stepvideo.rehearsal.fake_cuda import FakeCuda

    gib = 1 << 30
    card = FakeCuda(2, 80 * gib, used_bytes=lambda index: 40 * gib if index == 0 else 70 * gib)
    with using(card):
        budget, source = default_budget(["cuda:0"])
        assert budget == int(0.9 * 40 * gib) and source.startswith("0.9 x free memory of cuda:0"), source
        assert default_budget(["cuda:0", "cuda:1"])[0] == int(0.9 * 10 * gib)
    host, _ = available_memory("cpu")
    budget, source = default_budget(["cpu"])
    assert abs(budget - host // 2) < 64 << 20 and source.startswith("0.5 x the host's"), source
