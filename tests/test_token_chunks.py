"""Token-chunked DiT blocks (stepvideo/models/token_chunks.py) against the unchunked block."""
from __future__ import annotations

import pytest
import torch

from stepvideo.models.dit import StepVideoModel
from stepvideo.models.token_chunks import TokenChunkedBlock, set_token_chunk, token_chunk_of, token_spans


def _model(dtype, layers=2, ti2v=False):
    torch.manual_seed(0)
    model = StepVideoModel(num_attention_heads=2, num_layers=layers, caption_channels=[64, 32],
                           use_additional_conditions=ti2v, attention_backend="sdpa").eval()
    for p in model.parameters():            # no zero-initialised modulation: every path carries signal
        p.data.normal_(0, 0.05)
    return model.to(dtype)


def _inputs(dtype, grid=(3, 6, 10)):
    g = torch.Generator().manual_seed(1)
    f, h, w = grid
    x = torch.randn(2, f, 64, h, w, generator=g).to(dtype)
    y = torch.randn(2, 20, 64, generator=g).to(dtype)
    clip = torch.randn(2, 77, 32, generator=g).to(dtype)
    t = torch.tensor([0.3, 0.3])
    mask = torch.ones(2, 97)
    mask[1, 60:] = 0                             # a real cross-attention mask (one shorter prompt)
    return dict(hidden_states=x, encoder_hidden_states=y, encoder_hidden_states_2=clip, timestep=t,
                encoder_attention_mask=mask, return_dict=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_blocks_are_bit_identical(dtype):
    """180 tokens in chunks that divide it, that do not, and one larger than the sequence."""
    model = _model(dtype)
    inputs = _inputs(dtype)
    with torch.no_grad():
        whole = model(**inputs)
        for tokens in (8, 37, 1000):
            set_token_chunk(model, tokens)
            assert token_chunk_of(model) == tokens
            assert all(type(b) is TokenChunkedBlock for b in model.transformer_blocks)
            chunked = model(**inputs)
            assert torch.equal(chunked, whole), (tokens, (chunked - whole).abs().max().item())
        set_token_chunk(model, None)
        assert token_chunk_of(model) is None
        assert torch.equal(model(**inputs), whole)
    assert whole.abs().mean() > 0.01


def test_chunked_block_keeps_its_input_and_keys():
    model = _model(torch.float32, layers=1)
    keys = list(model.state_dict())
    set_token_chunk(model, 16)
    assert list(model.state_dict()) == keys
    block = model.transformer_blocks[0]
    x = torch.randn(2, 50, 256)
    saved = x.clone()
    rope = model.rope.tables((1, 5, 10), dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():                       # an inference path (in-place stages)
        out = block(x, torch.randn(2, 7, 256), torch.randn(2, 6 * 256), None, rope)
    assert torch.equal(x, saved) and out.shape == x.shape


def test_token_spans():
    assert token_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert token_spans(3, 8) == [(0, 3)]
    with pytest.raises(ValueError):
        token_spans(3, 0)
