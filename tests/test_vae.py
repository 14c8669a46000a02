"""Video-VAE v2 (``stepvideo.models.vae``): golden replay, key tree, loading, chunking, tiling."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepvideo.loading import CheckpointKeyError, CorruptCheckpointError, load_state_into_model
from stepvideo.models import vae_blocks
from stepvideo.models.vae import (AutoencoderKL, _tile_spans, checkpoint_to_module_key, mix_chunk_seams_,
                                  module_to_checkpoint_key)
from stepvideo.testing.tiny import TINY
from stepvideo.testing.tiny_vae import write_tiny_vae


# ----------------------------------------------------------------------------------------
# Golden replay (tiny upstream VAE, float32)
# ----------------------------------------------------------------------------------------

def _golden_kwargs(case: dict) -> dict:
    kwargs = {k: v for k, v in case["constructor_kwargs"].items() if k not in ("model_path", "weight_dict")}
    kwargs.update(encoder_ch=case["encoder_extra_kwargs"]["ch"], encoder_ch_mult=case["encoder_extra_kwargs"]["ch_mult"],
                  decoder_ch=case["decoder_extra_kwargs"]["ch"], decoder_ch_mult=case["decoder_extra_kwargs"]["ch_mult"])
    return kwargs


@pytest.fixture(scope="module")
def golden_vae(golden):
    with torch.device("meta"):
        model = AutoencoderKL(**_golden_kwargs(golden.case("vae_decode")))
    load_state_into_model(model, golden.weights("vae_decode").items(), dtype=torch.float32,
                          rename=checkpoint_to_module_key, strict=True)
    return model.eval()


def test_golden_decode(golden, golden_vae):
    data, tol = golden.data("vae_decode"), golden.tolerance("vae_decode")
    z = data["inputs.latents"]                                                # [1, 6, 4, 2, 2]
    video = golden_vae.decode(z)
    assert video.shape == (1, 34, 3, 32, 32)
    torch.testing.assert_close(video, data["outputs.video"], **tol)
    torch.testing.assert_close(golden_vae.decode(z[:, 0:3]), data["outputs.video_single_chunk"], **tol)
    # the frames around the seam before `mix`
    before = torch.cat([golden_vae.decode_chunk(z[:, 0:3]), golden_vae.decode_chunk(z[:, 3:6])], dim=1)
    torch.testing.assert_close(before[:, 16:18], data["outputs.video_before_mix_frames16_17"], **tol)
    torch.testing.assert_close(mix_chunk_seams_(before.clone()), video, atol=0, rtol=0)


def test_golden_encode(golden, golden_vae):
    data, tol = golden.data("vae_encode"), golden.tolerance("vae_encode")
    x = data["inputs.video"]                                                  # [1, 17, 3, 32, 32]
    torch.testing.assert_close(golden_vae.encode_moments(x), data["outputs.moments"], **tol)
    dist = golden_vae.posterior(x)
    torch.testing.assert_close(dist.mean, data["outputs.mean"], **tol)
    torch.testing.assert_close(dist.std, data["outputs.std"], **tol)
    torch.testing.assert_close(golden_vae.encode(x, mode="mean"), data["outputs.mean"], **tol)
    torch.testing.assert_close(golden_vae.encode_mean(x), data["outputs.mean"], **tol)
    # The reference drew its noise from the global CPU RNG after manual_seed(1234); a CPU
    # generator with the same seed draws the same numbers.
    noise = torch.randn(data["outputs.mean"].shape, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(noise, data["outputs.sample_noise"])
    sample = golden_vae.encode(x, generator=torch.Generator().manual_seed(1234))
    torch.testing.assert_close(sample, data["outputs.sample"], **tol)


# ----------------------------------------------------------------------------------------
# Key tree of the released model
# ----------------------------------------------------------------------------------------

def test_full_size_keys_match_checkpoint(shared_dir):
    rows = [line.split("\t") for line in (shared_dir / "golden/keys/vae_v2_z64_full.tsv").read_text().splitlines()]
    expected = [(name, [int(d) for d in shape.strip("[]").split(",") if d.strip()]) for name, shape in rows]
    with torch.device("meta"):
        model = AutoencoderKL(z_channels=64, version=2)
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 498_818_819


def test_checkpoint_key_rename():
    assert checkpoint_to_module_key("decoder.conv_out.weight") == "decoder.conv_out.conv.weight"
    assert checkpoint_to_module_key("decoder.conv_out.conv.bias") == "decoder.conv_out.conv.bias"
    assert checkpoint_to_module_key("encoder.conv_out.conv.bias") == "encoder.conv_out.conv.bias"
    assert module_to_checkpoint_key("decoder.conv_out.conv.bias") == "decoder.conv_out.bias"


# ----------------------------------------------------------------------------------------
# Loading the factory-written tiny VAE
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vae_model")
    write_tiny_vae(root / "vae", TINY, seed=1)
    return root


@pytest.fixture(scope="module")
def tiny_vae(tiny_root):
    return AutoencoderKL.from_pretrained(tiny_root, dtype=torch.float32)


def test_tiny_factory_writes_official_key_names(tiny_root):
    keys = set(load_file(str(tiny_root / "vae" / "vae_v2.safetensors")))
    assert {"decoder.conv_out.weight", "decoder.conv_out.bias"} <= keys
    assert not any(k.startswith("decoder.conv_out.conv.") for k in keys)


@pytest.mark.parametrize("where", ["model_dir", "vae_dir", "file"])
def test_from_pretrained_locations(tiny_root, tiny_vae, where):
    path = {"model_dir": tiny_root, "vae_dir": tiny_root / "vae",
            "file": tiny_root / "vae" / "vae_v2.safetensors"}[where]
    model = AutoencoderKL.from_pretrained(path)                               # bf16 by default
    assert model.z_channels == TINY.z_channels and model.decoder_ch_mult == TINY.vae_decoder_ch_mult
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    reference = tiny_vae.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key].to(torch.bfloat16)), key


def test_from_pretrained_lfs_pointer(tmp_path):
    (tmp_path / "vae_v2.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 998000000\n")
    with pytest.raises(CorruptCheckpointError, match="git-lfs"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_from_pretrained_truncated(tiny_root, tmp_path):
    blob = (tiny_root / "vae" / "vae_v2.safetensors").read_bytes()
    (tmp_path / "vae_v2.safetensors").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "config.json").write_bytes((tiny_root / "vae" / "config.json").read_bytes())
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        AutoencoderKL.from_pretrained(tmp_path)


def test_from_pretrained_missing_key(tiny_root, tmp_path):
    state = load_file(str(tiny_root / "vae" / "vae_v2.safetensors"))
    del state["decoder.mid.attn_1.q.conv.weight"]
    save_file(state, str(tmp_path / "vae_v2.safetensors"))
    (tmp_path / "config.json").write_bytes((tiny_root / "vae" / "config.json").read_bytes())
    with pytest.raises(CheckpointKeyError, match=r"decoder\.mid\.attn_1\.q\.conv\.weight") as info:
        AutoencoderKL.from_pretrained(tmp_path)
    assert info.value.missing == ["decoder.mid.attn_1.q.conv.weight"]


def test_from_pretrained_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------
# Behaviour on the tiny VAE
# ----------------------------------------------------------------------------------------

def test_tiny_decode_shape(tiny_vae):
    # speed is measured by benchmark/bench_vae_decode.py, not asserted here (a loaded CI box varies)
    z = torch.randn(1, 3, TINY.z_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    video = tiny_vae.decode(z)
    assert video.shape == (1, 17, 3, 64, 64) and torch.isfinite(video).all()


def test_tiny_encode_shapes_and_short_last_chunk(tiny_vae):
    x = torch.rand(1, 17 + 9, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    moments = tiny_vae.encode_moments(x)
    assert moments.shape == (1, 3 + 2, 2 * TINY.z_channels, 2, 2)
    # chunks are independent: the second chunk's latents equal encoding it alone
    torch.testing.assert_close(moments[:, 3:], tiny_vae.encode_moments(x[:, 17:]), atol=0, rtol=0)
    z = tiny_vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 5, TINY.z_channels, 2, 2)
    assert tiny_vae.decode(z).shape == (1, 17 + 9, 3, 32, 32)


def test_causality(tiny_vae):
    """Latent 0 depends only on frame 0, and frame 0 only on latent 0 (TI2V relies on it)."""
    x = torch.rand(1, 17, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    torch.testing.assert_close(tiny_vae.encode_mean(x[:, :1]), tiny_vae.encode_mean(x)[:, :1], atol=1e-5, rtol=1e-5)
    z = torch.randn(1, 3, TINY.z_channels, 2, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(tiny_vae.decode(z[:, :1]), tiny_vae.decode(z)[:, :1], atol=1e-5, rtol=1e-5)


def test_input_validation(tiny_vae):
    with pytest.raises(ValueError, match="frames"):
        tiny_vae.encode(torch.zeros(1, 10, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        tiny_vae.encode(torch.zeros(1, 17, 3, 24, 32))
    with pytest.raises(ValueError, match="latents must be"):
        tiny_vae.decode(torch.zeros(1, 3, TINY.z_channels + 1, 2, 2))
    with pytest.raises(ValueError, match="mode"):
        tiny_vae.encode(torch.zeros(1, 1, 3, 16, 16), mode="median")
    with pytest.raises(ValueError, match="version"):
        AutoencoderKL(version=1)


def test_mix_is_sequential():
    x = torch.zeros(1, 51, 1, 1, 1)
    x[:, 16], x[:, 17], x[:, 33], x[:, 34] = 1.0, 2.0, 3.0, 4.0
    mix_chunk_seams_(x)
    back = 0.6 * 2.0 + 0.4 * 1.0
    assert x[0, 17].item() == pytest.approx(back) and x[0, 16].item() == pytest.approx(0.6 * 1.0 + 0.4 * back)
    back = 0.6 * 4.0 + 0.4 * 3.0
    assert x[0, 34].item() == pytest.approx(back) and x[0, 33].item() == pytest.approx(0.6 * 3.0 + 0.4 * back)
    assert x[0, 50].item() == 0.0 and mix_chunk_seams_(torch.ones(1, 17, 1, 1, 1)).eq(1).all()


def test_time_split_convolution_is_exact(monkeypatch):
    torch.manual_seed(0)
    conv = vae_blocks.CausalConv3d(4, 5, 3).eval()
    strided = vae_blocks.CausalConv3d(4, 4, 3, stride=(2, 2, 2)).eval()
    x = torch.randn(1, 4, 9, 6, 6)
    with torch.no_grad():
        plain, plain_strided = conv(x), strided(x)
        monkeypatch.setattr(vae_blocks, "LARGE_TENSOR_NUMEL", 16)
        torch.testing.assert_close(conv(x), plain, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(strided(x), plain_strided, atol=1e-6, rtol=1e-6)


def test_tile_spans_cover_and_overlap():
    assert _tile_spans(4, 6, 2) == [(0, 4, 0, 0)]
    assert _tile_spans(10, 4, 2) == [(0, 4, 0, 2), (2, 6, 2, 2), (4, 8, 2, 2), (6, 10, 2, 0)]
    assert _tile_spans(7, 4, 1) == [(0, 4, 0, 1), (3, 7, 1, 0)]


def test_tiling_error_is_bounded(tiny_vae):
    """Tiling is exact when one tile covers the latent and approximate otherwise: GroupNorm
    statistics and the mid-block attention see one tile only (numbers in docs/vae.md)."""
    z = torch.randn(1, 3, TINY.z_channels, 6, 6, generator=torch.Generator().manual_seed(4))
    reference = tiny_vae.decode(z)
    try:
        assert torch.equal(tiny_vae.enable_tiling(tile_size=6, overlap=2).decode(z), reference)
        tiled = tiny_vae.enable_tiling(tile_size=4, overlap=2).decode(z)
    finally:
        tiny_vae.disable_tiling()
    assert tiled.shape == reference.shape and torch.isfinite(tiled).all()
    rel_rms = (tiled - reference).pow(2).mean().sqrt() / reference.std()
    assert rel_rms < 0.6, f"tiled decode relative RMS error {rel_rms:.3f} (random tiny weights measure ~0.4)"


def test_bf16_decode_close_to_fp32(tiny_root, tiny_vae):
    z = torch.randn(1, 3, TINY.z_channels, 2, 2, generator=torch.Generator().manual_seed(5))
    bf16 = AutoencoderKL.from_pretrained(tiny_root)
    video = bf16.decode(z)
    assert video.dtype == torch.bfloat16
    torch.testing.assert_close(video.float(), tiny_vae.decode(z), atol=0.15, rtol=0.05)
