"""CaptionEncoder.embedding (spec 6.4): golden replay, dtypes/devices, prompt validation."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from stepvideo.loading import layout, save_sharded
from stepvideo.text_encoders.caption import CaptionEncoder


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """bf16 values equal or one bf16 step apart. Near zero the float32 noise of an independent
    implementation (~1e-6) can exceed a bf16 step, so differences within the float32 ``atol``
    also pass; nearly all values must still be bit-identical."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    got, want = got.double(), want.double()
    diff = (got - want).abs()
    # one step of the smaller magnitude's binade (bf16 keeps 7 explicit mantissa bits)
    smaller = torch.minimum(got.abs(), want.abs()).clamp(min=2.0 ** -126)
    ulp = torch.pow(2.0, torch.floor(torch.log2(smaller)) - 7)
    assert ((diff <= ulp) | (diff <= atol)).all(), diff.max()
    assert (diff == 0).double().mean() > 0.999


@pytest.fixture(scope="module")
def golden_model_dir(golden, tmp_path_factory):
    """A checkpoint-style folder built from the golden tiny encoders: ``step_llm`` (golden float32
    weights in 2 shards, golden tokenizer) and ``hunyuan_clip`` (the golden tiny BERT)."""
    root = tmp_path_factory.mktemp("caption_golden")
    llm = root / layout.LLM_DIR
    llm.mkdir()
    fields = dict(golden.case("step_llm")["constructor_kwargs"]["config_fields"], architectures=["Step1Model"])
    (llm / layout.LLM_CONFIG).write_text(json.dumps(fields))
    save_sharded(golden.weights("step_llm"), llm, layout.LLM_WEIGHTS, num_shards=2)
    shutil.copy(golden.root / "tokenizers" / "step1_chat_tokenizer.model", llm / layout.LLM_TOKENIZER_FILE)
    shutil.copytree(golden.root / "hunyuan_clip_tiny", root / layout.CLIP_DIR)
    return root


def test_golden_caption(golden, golden_model_dir):
    case = golden.case("caption")
    data = golden.data("caption")
    encoder = CaptionEncoder.from_pretrained(golden_model_dir, llm_dtype=torch.float32,
                                             max_length=case["text_max_length"])
    tol = {"atol": case["tolerance"]["atol"], "rtol": case["tolerance"]["rtol"]}
    for call in case["calls"]:
        tag = call["tag"]
        out = encoder.embedding(call["prompts"])
        assert set(out) == {"y", "y_mask", "clip_embedding"}
        torch.testing.assert_close(out["y"], data[f"outputs.{tag}.y"], **tol)
        assert out["y_mask"].dtype == torch.int64
        assert torch.equal(out["y_mask"], data[f"outputs.{tag}.y_mask"])
        assert_bf16_close(out["clip_embedding"], data[f"outputs.{tag}.clip_embedding"], tol["atol"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from stepvideo.testing.tiny import write_tiny_model_dir

    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_caption") / "m", parts=["step_llm", "hunyuan_clip"])


@pytest.fixture(scope="module")
def tiny_encoder(tiny_dir):
    return CaptionEncoder.from_pretrained(tiny_dir, max_length=32)


def test_tiny_embedding_layout(tiny_encoder):
    from stepvideo.testing.tiny_text import MAGIC_STRINGS

    prompts = ["A cat sits on the window." + MAGIC_STRINGS[0], MAGIC_STRINGS[1]]
    out = tiny_encoder.embedding(prompts)
    y, y_mask, clip = out["y"], out["y_mask"], out["clip_embedding"]
    assert y.shape == (2, 32, 128) and y.dtype == torch.bfloat16 and y.device.type == "cpu"
    assert y_mask.shape == (2, 77 + 32) and y_mask.dtype == torch.int64
    assert clip.shape == (2, 77, 64) and clip.dtype == torch.bfloat16
    assert y_mask[:, :77].eq(1).all()
    _, llm_mask = tiny_encoder.text_encoder(prompts)
    assert torch.equal(y_mask[:, 77:], llm_mask)
    # the seam is deterministic
    again = tiny_encoder.embedding(prompts)
    assert all(torch.equal(out[k], again[k]) for k in out)


@pytest.mark.parametrize("bad,match", [
    ("a prompt", "single str"),
    ([], "empty list"),
    (None, "NoneType"),
    (["ok", 3], "non-strings at 1: int"),
])
def test_prompt_validation(tiny_encoder, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_encoder.embedding(bad)


def test_missing_subfolder_is_reported(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="clip"):
        CaptionEncoder.from_pretrained(tiny_dir, clip_dir="no_such_clip")
    with pytest.raises(FileNotFoundError):
        CaptionEncoder.from_pretrained(tmp_path / "does_not_exist")
