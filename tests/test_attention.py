"""Attention dispatch: every backend name equals SDPA where it runs, ``auto`` per GPU family, errors.

``choose_backend`` is a pure function of (CUDA capability, importable flash-attn flavours), so the
per-GPU choice of ``auto`` is checked here on CPU.
"""
import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F

from stepvideo.models import attention as attn
from stepvideo.models.attention import BACKENDS, FLASH_MODULES, attention, choose_backend, resolve_backend


def _qkv(lq=24, lk=24, b=2, n=3, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, length, n, d, generator=g).to(dtype) for length in (lq, lk, lk))


def _reference(q, k, v, mask=None):
    """Plain SDPA on [B, N, L, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _flash_missing(name):
    return all(importlib.util.find_spec(m) is None for m in FLASH_MODULES[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_every_backend_equals_sdpa_on_cpu(backend, masked):
    """Every backend name runs on CPU tensors (flash names fall back to SDPA there) with the same result."""
    q, k, v = _qkv(lq=24, lk=10)
    mask = torch.arange(10)[None, None, None, :] < torch.tensor([10, 6])[:, None, None, None] if masked else None
    name = resolve_backend(backend) if backend not in FLASH_MODULES else backend
    out = attention(q, k, v, mask=mask, backend=name)
    assert out.shape == q.shape
    torch.testing.assert_close(out, _reference(q, k, v, mask), rtol=1e-6, atol=1e-6)
    if masked:   # the masked keys of row 1 do not matter
        k2 = k.clone()
        k2[1, 6:] += 100.0
        torch.testing.assert_close(attention(q, k2, v, mask=mask, backend=name)[1], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("capability, importable, expected", [
    ((9, 0), {"flash3", "flash2"}, "flash3"),      # H100 / H200 / H20
    ((9, 0), {"flash3"}, "flash3"),
    ((9, 0), {"flash2"}, "sdpa"),                  # Hopper without FA3: PyTorch's own kernels
    ((9, 0), set(), "sdpa"),
    ((8, 0), {"flash2", "flash3"}, "flash2"),      # A100 / A800
    ((8, 6), {"flash2"}, "flash2"),                # A10 / RTX 30xx
    ((8, 9), {"flash2"}, "flash2"),                # L40S / RTX 40xx (Ada)
    ((8, 0), {"flash3"}, "sdpa"),                  # FA3 is Hopper-only
    ((8, 0), set(), "sdpa"),
    ((7, 5), {"flash2", "flash3"}, "sdpa"),        # T4 (Turing)
    ((10, 0), {"flash2", "flash3"}, "sdpa"),       # B200 (Blackwell)
    ((12, 0), {"flash2"}, "sdpa"),
    (None, {"flash2", "flash3"}, "sdpa"),          # no CUDA
])
def test_auto_per_gpu_family(capability, importable, expected):
    assert choose_backend(capability, importable) == expected


def test_auto_resolves_and_logs_on_this_machine(caplog):
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        chosen = resolve_backend("auto")
    capability, importable, _ = attn._device_facts()
    assert chosen == choose_backend(capability, importable)
    assert f"attention backend: {chosen} (auto on" in caplog.text


@pytest.mark.parametrize("name", ["flash", "flash2", "flash3"])
def test_missing_flash_attn_raises_with_install_hint(name):
    if not _flash_missing(name):
        pytest.skip(f"flash-attn for {name} is installed here")
    with pytest.raises(RuntimeError, match=rf"{name}.*not importable: install .*pip install|{name}.*setup.py"):
        resolve_backend(name)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'.*sdpa-cudnn"):
        resolve_backend("xformers")


def test_cross_attention_uses_the_model_backend(monkeypatch):
    """Self- and cross-attention both go through ``attention`` with the model's backend."""
    from stepvideo.models import blocks
    from stepvideo.models.dit import StepVideoModel

    model = StepVideoModel(num_attention_heads=2, attention_head_dim=128, in_channels=8, num_layers=1,
                           caption_channels=[16, 8], attention_backend="sdpa-math").eval()
    seen = []

    def spy(q, k, v, *, mask=None, scale=None, backend="sdpa"):
        seen.append((backend, mask is not None))
        return attn.attention(q, k, v, mask=mask, scale=scale, backend=backend)

    monkeypatch.setattr(blocks, "attention", spy)
    with torch.no_grad():
        model(hidden_states=torch.randn(2, 1, 8, 2, 2), encoder_hidden_states=torch.randn(2, 3, 16),
              encoder_hidden_states_2=torch.randn(2, 2, 8), timestep=torch.tensor([0.5, 0.5]),
              encoder_attention_mask=torch.tensor([[1] * 5, [1] * 4 + [0]]))
    assert seen == [("sdpa-math", False), ("sdpa-math", True)]
