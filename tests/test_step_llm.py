"""Step-LLM: sqrt-ALiBi attention, golden replay, real key tree on meta, loading from the tiny factory."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from stepvideo.loading import CheckpointKeyError, load_state_into_model
from stepvideo.text_encoders.alibi import alibi_slopes, sqrt_alibi_attention
from stepvideo.text_encoders.step_llm import STEP1TextEncoder, Step1Config, Step1Model
from stepvideo.text_encoders.tokenizer import TokenizerError


def dense_sqrt_alibi_reference(q, k, v, slopes):
    """Written out with plain matmul/softmax: q [B, L, N, D], k/v [B, L, G, D] (float64)."""
    batch, length, heads, dim = q.shape
    groups = k.shape[2]
    group_of_head = torch.arange(heads) // (heads // groups)
    k, v = k[:, :, group_of_head], v[:, :, group_of_head]                     # [B, L, N, D]
    scores = torch.einsum("bind,bjnd->bnij", q, k) / math.sqrt(dim)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    dist = (i - j).double()
    bias = -torch.tensor(slopes, dtype=torch.float64)[:, None, None] * dist.clamp(min=0).sqrt()
    bias = torch.where(j <= i, bias, torch.tensor(float("-inf"), dtype=torch.float64))
    probs = torch.softmax(scores + bias, dim=-1)
    return torch.einsum("bnij,bjnd->bind", probs, v)


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------

def test_slopes_match_the_goldens(golden):
    for case in ("step_llm", "step_llm_g1"):
        heads = golden.case(case)["constructor_kwargs"]["config_fields"]["num_attention_heads"]
        assert alibi_slopes(heads) == pytest.approx(golden.case(case)["alibi_slopes"], rel=1e-12)


def test_slopes_for_48_heads_follow_appendix_a():
    slopes = alibi_slopes(48)
    assert len(slopes) == 48
    for j in range(32):
        assert slopes[j] == pytest.approx(2 ** (-(j + 1) / 4), rel=1e-12)
    for i in range(16):
        assert slopes[32 + i] == pytest.approx(2 ** (-(2 * i + 1) / 8), rel=1e-12)
    # non power of two, small: P = 4 for 6 heads
    assert alibi_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    with pytest.raises(ValueError):
        alibi_slopes(0)


@pytest.mark.parametrize("heads,groups", [(1, 1), (2, 1), (4, 2), (6, 3), (48, 8), (48, 48)])
def test_attention_equals_dense_reference(heads, groups):
    g = torch.Generator().manual_seed(heads * 100 + groups)
    batch, length, dim = 2, 11, 8
    q = torch.randn(batch, length, heads, dim, generator=g)
    k = torch.randn(batch, length, groups, dim, generator=g)
    v = torch.randn(batch, length, groups, dim, generator=g)
    out = sqrt_alibi_attention(q, k, v)
    want = dense_sqrt_alibi_reference(q.double(), k.double(), v.double(), alibi_slopes(heads))
    assert out.shape == (batch, length, heads, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_keeps_low_precision_dtype():
    q = torch.randn(1, 5, 4, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 5, 2, 8, dtype=torch.bfloat16)
    out = sqrt_alibi_attention(q, k, k)
    assert out.dtype == torch.bfloat16
    want = dense_sqrt_alibi_reference(q.double(), k.double(), k.double(), alibi_slopes(4))
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------
# Golden replay
# ----------------------------------------------------------------------------------------

def golden_model(golden, case: str) -> Step1Model:
    from transformers import PretrainedConfig

    fields = dict(golden.case(case)["constructor_kwargs"]["config_fields"])
    fields["params_dtype"] = torch.float32
    model = Step1Model(PretrainedConfig(**fields), device="meta")
    load_state_into_model(model, golden.weights(case).items(), dtype=torch.float32, device="cpu")
    return model.eval()


@pytest.mark.parametrize("case", ["step_llm", "step_llm_g1"])
def test_golden_step_llm(golden, case):
    data = golden.data(case)
    model = golden_model(golden, case)
    assert model.config.ffn_size == golden.case(case)["effective_ffn_hidden"]
    with torch.no_grad():
        out = model(data["inputs.input_ids"], data["inputs.attention_mask"])     # [L, B, H]
    out = out.transpose(0, 1)
    torch.testing.assert_close(out, data["outputs.hidden_states"], **golden.tolerance(case))
    # the bias matters: plain causal attention is far away
    assert (out - data["outputs.hidden_states_plain_causal_NOT_REFERENCE"]).abs().max() > 1e-2


def test_padding_is_ignored_and_does_not_leak(golden):
    model = golden_model(golden, "step_llm")
    g = torch.Generator().manual_seed(0)
    valid = torch.cat([torch.tensor([[1]]), torch.randint(3, 512, (1, 9), generator=g), torch.tensor([[2]])], 1)
    short = torch.nn.functional.pad(valid, (0, 5), value=2)                         # 16 tokens
    long = torch.nn.functional.pad(valid, (0, 21), value=2)                         # 32 tokens
    with torch.no_grad():
        out_short = model(short)[:11]
        out_long = model(long)[:11]
        ones = model(short, torch.ones_like(short))
        zeros = model(short, torch.zeros_like(short))
    torch.testing.assert_close(out_short, out_long, atol=1e-5, rtol=1e-5)
    assert torch.equal(ones, zeros)  # the mask is not used at all


# ----------------------------------------------------------------------------------------
# Config and key tree
# ----------------------------------------------------------------------------------------

def test_real_config_key_tree_on_meta(golden):
    entry = golden.manifest["keys"]["step_llm_full"]
    lines = (golden.root / entry["file"]).read_text().strip().splitlines()
    want = [(name, json.loads(shape)) for name, shape in (line.split("\t") for line in lines)]
    config = dict(entry["constructor_kwargs"]["config_fields"], architectures=["Step1Model"], unknown_key=1)
    model = Step1Model(config, device="meta", dtype=torch.bfloat16)
    got = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert got == want
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == entry["num_parameters"] == 19_579_600_896


def test_config_from_object_and_dict():
    from transformers import PretrainedConfig

    fields = dict(hidden_size=64, num_attention_heads=2, num_attention_groups=1, num_layers=1,
                  ffn_hidden_size=200, padded_vocab_size=32, params_dtype=torch.float32)
    a = Step1Config.from_config(PretrainedConfig(**fields))
    b = Step1Config.from_config(dict(fields, seq_length=16384, not_a_field="x"))
    assert a == b and a.ffn_size == 256 and a.head_dim == 32 and a.params_dtype == "torch.float32"
    assert Step1Config() == Step1Config.from_config({})  # defaults = the published config
    with pytest.raises(ValueError, match="num_attention_groups"):
        Step1Config(hidden_size=64, num_attention_heads=4, num_attention_groups=3)
    with pytest.raises(ValueError, match="hidden_size"):
        Step1Config(hidden_size=65, num_attention_heads=4, num_attention_groups=2)


# ----------------------------------------------------------------------------------------
# Loading from the tiny factory
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory):
    from stepvideo.loading import layout
    from stepvideo.testing.tiny import write_tiny_model_dir

    root = write_tiny_model_dir(tmp_path_factory.mktemp("tiny_llm") / "m", parts=["step_llm"])
    return root / layout.LLM_DIR


def test_tiny_folder_layout(tiny_llm_dir):
    names = sorted(p.name for p in tiny_llm_dir.iterdir())
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "step1_chat_tokenizer.model"]
    config = json.loads((tiny_llm_dir / "config.json").read_text())
    assert config["hidden_size"] == 128 and config["padded_vocab_size"] == 512
    assert config["architectures"] == ["Step1Model"]


def test_text_encoder_loads_tiny_folder(tiny_llm_dir):
    enc = STEP1TextEncoder(tiny_llm_dir, max_length=24, dtype=torch.float32)
    y, mask = enc(["A cat sits on the window. 超高清。", ""])
    assert y.shape == (2, 24, 128) and y.dtype == torch.float32
    assert mask.dtype == torch.int64 and mask[1].tolist() == [1, 1] + [0] * 22
    tokens = enc.text_tokenizer(["A cat sits on the window. 超高清。", ""], max_length=24)
    with torch.no_grad():
        direct = enc.text_encoder(tokens["input_ids"]).transpose(0, 1)
    assert torch.equal(y, direct)

    bf16 = STEP1TextEncoder.from_pretrained(tiny_llm_dir, 24)  # default dtype: bf16
    y16, mask16 = bf16(["A cat sits on the window. 超高清。", ""])
    assert y16.dtype == torch.bfloat16 and torch.equal(mask16, mask)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    torch.testing.assert_close(y16.float(), y, atol=0.25, rtol=0.05)


def test_missing_tokenizer_file_is_reported(tiny_llm_dir, tmp_path):
    folder = tmp_path / "step_llm"
    shutil.copytree(tiny_llm_dir, folder)
    (folder / "step1_chat_tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="step1_chat_tokenizer.model"):
        STEP1TextEncoder(folder)


def test_tokenizer_without_special_tokens_is_reported(tiny_llm_dir, tmp_path):
    import io

    import sentencepiece as spm

    folder = tmp_path / "step_llm"
    shutil.copytree(tiny_llm_dir, folder)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a cat sits on the window"] * 4), model_writer=out,
                                   vocab_size=30, model_type="bpe", num_threads=1, minloglevel=2,
                                   hard_vocab_limit=False)
    (folder / "step1_chat_tokenizer.model").write_bytes(out.getvalue())
    with pytest.raises(TokenizerError, match=r"missing special tokens: <\|BOT\|>"):
        STEP1TextEncoder(folder)


def test_checkpoint_that_does_not_match_the_config(tiny_llm_dir, tmp_path):
    folder = tmp_path / "step_llm"
    shutil.copytree(tiny_llm_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointKeyError, match="transformer.layers.2.attention.wqkv.weight"):
        Step1Model.from_pretrained(folder)


def test_import_has_no_side_effects():
    code = ("import sys; sys.argv = ['server', '--port', '1', '--llm_dir', 'x']\n"
            "import stepvideo.text_encoders as te\n"
            "assert 'sentencepiece' not in sys.modules and 'transformers' not in sys.modules\n"
            "te.Step1Model; print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

