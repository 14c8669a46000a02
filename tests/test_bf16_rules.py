"""The bf16 rounding rules of spec section 2, checked with the spec's worked values.

Every golden vector is fp32, so these rules are covered here directly.
"""
import torch

from stepvideo import FlowMatchDiscreteScheduler
from stepvideo.models.dit import cross_attention_mask, text_lengths
from stepvideo.models.embeddings import AdaLayerNormSingle, sinusoid
from stepvideo.models.rope import RoPE3D


def test_mask_sum_rounds_in_bf16():
    totals = [17, 256, 257, 258, 259, 260, 261, 262, 263, 397]
    expected = [17, 256, 256, 258, 260, 260, 260, 262, 264, 396]
    width = 400
    mask = torch.zeros(len(totals), width)
    for i, n in enumerate(totals):
        mask[i, :n] = 1
    assert text_lengths(mask.to(torch.bfloat16)).tolist() == expected
    assert text_lengths(mask).tolist() == totals                      # fp32: exact
    assert text_lengths(mask.to(torch.int64)).tolist() == totals      # int mask: exact
    m = cross_attention_mask(torch.tensor([2, 4]), 4)
    assert m.shape == (2, 1, 1, 4)
    assert m[0, 0, 0].tolist() == [True, True, False, False] and m[1].all()


def test_timestep_rounded_twice_in_bf16():
    sched = FlowMatchDiscreteScheduler()
    sched.set_timesteps(50, time_shift=13.0)
    fed = (sched.timesteps[:5].to(torch.bfloat16) * 1000).float()
    assert fed.tolist() == [0.0, 1.5625, 3.1875, 4.875, 6.65625]
    t = torch.tensor([0.0015674]).to(torch.bfloat16)
    assert abs(float(t) - 0.0015640) < 5e-7
    assert float(t * 1000) == 1.5625

    torch.manual_seed(0)
    adaln = AdaLayerNormSingle(32)
    emb_bf16_path = adaln.emb(torch.tensor([0.0015674]).to(torch.bfloat16), None)
    expected = adaln.emb.timestep_embedder(sinusoid(torch.tensor([1.5625])))
    torch.testing.assert_close(emb_bf16_path, expected, rtol=0, atol=0)
    exact = adaln.emb.timestep_embedder(sinusoid(torch.tensor([1.5674])))
    assert not torch.allclose(emb_bf16_path, exact)


def test_sinusoid_cos_first_check_values():
    s = sinusoid(torch.tensor([1.5625]))[0]
    torch.testing.assert_close(s[0:3], torch.tensor([0.00830, 0.11651, 0.21601]), atol=2e-5, rtol=0)
    torch.testing.assert_close(s[128:131], torch.tensor([0.99997, 0.99319, 0.97639]), atol=2e-5, rtol=0)


def test_rope_angles_cast_to_token_dtype_before_cos_sin():
    grid = (40, 3, 3)
    cos16, sin16 = RoPE3D().tables(grid, torch.bfloat16, "cpu")
    cos32, _ = RoPE3D().tables(grid, torch.float32, "cpu")
    assert cos16.dtype == torch.bfloat16 and cos16.shape == (40 * 9, 128)
    # token n = f*9 + y*3 + x; frame chunk channel k uses angle f * 10000**(-k/32)
    theta = 10000 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    f = 39
    angle_bf16 = (f * theta).to(torch.bfloat16)
    expected = torch.cat([angle_bf16, angle_bf16]).cos()
    row = cos16[f * 9]
    assert torch.equal(row[:64], expected)
    # the bf16 angle rounding differs from rounding an fp32 cosine
    assert not torch.equal(row[:64], cos32[f * 9, :64].to(torch.bfloat16))
    # spatial chunks: row index y uses channels 64..95, column x uses 96..127
    theta_s = 10000 ** (-torch.arange(0, 32, 2, dtype=torch.float32) / 32)
    ang = (2 * theta_s).to(torch.bfloat16)
    token = 5 * 9 + 2 * 3 + 1   # f=5, y=2, x=1
    assert torch.equal(cos16[token, 64:96], torch.cat([ang, ang]).cos())
    ang_x = (1 * theta_s).to(torch.bfloat16)
    assert torch.equal(sin16[token, 96:128], torch.cat([ang_x, ang_x]).sin())
