"""``stepvideo.components``: local models and the service's clients implement the same caption
encoder and VAE interfaces, so the pipeline gives the same video with either (the real service
of the ``tiny_service`` fixture, tiny model, bit-exact)."""
from __future__ import annotations

import inspect

import pytest
import torch

from stepvideo.components import CaptionEncoderComponent, LocalVAE, VAEComponent
from stepvideo.models.vae import AutoencoderKL
from stepvideo.pipelines.pipeline import StepVideoPipeline
from stepvideo.caption_service.client import RemoteCaptionEncoder, RemoteVAE
from stepvideo.text_encoders.caption import CaptionEncoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_parts(tiny_ti2v_model_dir):
    return {"caption": CaptionEncoder.from_pretrained(tiny_ti2v_model_dir),
            "vae": AutoencoderKL.from_pretrained(tiny_ti2v_model_dir, dtype=torch.bfloat16)}


def test_local_and_remote_parts_satisfy_the_protocols(local_parts):
    for caption in (local_parts["caption"], RemoteCaptionEncoder("127.0.0.1:1")):
        assert isinstance(caption, CaptionEncoderComponent), caption
    for vae in (local_parts["vae"], LocalVAE(local_parts["vae"]), RemoteVAE("127.0.0.1:1")):
        assert isinstance(vae, VAEComponent), vae
        params = inspect.signature(vae.encode).parameters
        assert list(params)[1:4] == ["generator", "mode", "seed"], vae      # the seed is taken the same way
    assert not isinstance(object(), VAEComponent)
    with pytest.raises(ValueError, match="output must be one of"):
        LocalVAE(local_parts["vae"], output="png")
    with pytest.raises(ValueError, match="output must be one of"):
        StepVideoPipeline(None, None, vae_output="png")


def test_seeded_encode_and_uint8_decode_agree(tiny_service, local_parts):
    url, token = tiny_service
    vae = local_parts["vae"]
    x = torch.rand(1, 17, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    remote = RemoteVAE(url, token=token, output="uint8")
    sample = vae.encode(x, seed=7)
    assert torch.equal(remote.encode(x, seed=7), sample)
    assert torch.equal(vae.encode(x, generator=torch.Generator().manual_seed(7)), sample)   # the old spelling
    with pytest.raises(ValueError, match="not both"):
        vae.encode(x, seed=7, generator=torch.Generator())
    with pytest.raises(ValueError, match="not both"):
        remote.encode(x, seed=7, generator=torch.Generator())
    z = torch.randn(1, 3, vae.z_channels, 2, 2, generator=torch.Generator().manual_seed(1))
    frames = LocalVAE(vae, output="uint8").decode(z)
    assert frames.dtype == torch.uint8 and frames.device.type == "cpu"
    assert torch.equal(remote.decode(z), frames)


def test_pipeline_gives_the_same_video_with_local_or_remote_parts(tiny_service, local_parts,
                                                                  tiny_ti2v_model_dir, tmp_path):
    """TI2V: the caption encoder, the seeded image encode and the decode all go through the
    component interface; no code path asks which kind it holds."""
    image = torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(2))
    pipe = StepVideoPipeline.from_pretrained(tiny_ti2v_model_dir, torch_dtype=torch.float32)
    kwargs = dict(prompt="a red fox", num_frames=17, height=32, width=32, num_inference_steps=2,
                  first_image=image, seed=3, output_type="np", progress=False)
    pipe.caption_encoder, pipe.vae = local_parts["caption"], local_parts["vae"]
    local = pipe(**kwargs)
    pipe.caption_encoder, pipe.vae = None, None          # built lazily by setup_api
    pipe.vae_url = pipe.caption_url = tiny_service[0]
    pipe.service_token = tiny_service[1]
    pipe.vae_output = "uint8"
    remote = pipe(**kwargs)
    assert isinstance(pipe.vae, RemoteVAE) and pipe.vae.output == "uint8"
    assert torch.equal(remote.latents, local.latents)
    assert remote.video.shape == local.video.shape and (remote.video == local.video).all()
