"""Step chat tokenizer (spec 6.1) and the HunyuanCLIP BERT tokenizer against the goldens."""
from __future__ import annotations

import io
import json

import pytest
import torch

from stepvideo.text_encoders.tokenizer import (BOS_ID, CONTROL_TOKENS, EOS_ID, PAD_ID, USER_TOKENS, TokenizerError,
                                               Wrapped_StepChatTokenizer)


@pytest.fixture(scope="module")
def golden_sp_file(golden):
    return golden.root / "tokenizers" / "step1_chat_tokenizer.model"


@pytest.fixture(scope="module")
def step_tokenizer(golden_sp_file):
    return Wrapped_StepChatTokenizer(golden_sp_file)


@pytest.fixture(scope="module")
def readable_cases(golden):
    return json.loads((golden.root / "tokenizers" / "tokenizer_cases.json").read_text(encoding="utf-8"))


def _train(tmp_path, control=(), user=()):
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a cat sits on the window", "the dog runs in the park"] * 5),
        model_writer=out, vocab_size=40, model_type="bpe", byte_fallback=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=list(control), user_defined_symbols=list(user),
        num_threads=1, minloglevel=2, hard_vocab_limit=False)
    path = tmp_path / "step1_chat_tokenizer.model"
    path.write_bytes(out.getvalue())
    return path


def test_step1_golden_cases(golden, step_tokenizer, readable_cases):
    data = golden.data("tokenizers")
    calls = golden.case("tokenizers")["step1_calls"]
    readable = {c["tag"]: c for c in readable_cases["step1"]}
    assert len(calls) == 5
    for call in calls:
        tag = call["tag"]
        out = step_tokenizer(call["text"], max_length=24, padding="max_length", truncation=True,
                             return_tensors="pt")
        for name in ("input_ids", "attention_mask", "cu_seqlens"):
            want = data[f"outputs.step1.{tag}.{name}"]
            assert out[name].dtype == want.dtype, (tag, name)
            assert torch.equal(out[name], want), (tag, name)
        assert out["max_seq_len"] == readable[tag]["max_seq_len"]
        packed = [i for row, m in zip(readable[tag]["input_ids"], readable[tag]["attention_mask"])
                  for i, keep in zip(row, m) if keep]
        assert out["cu_input_ids"].tolist() == packed


def test_step1_raw_encoding_and_truncation(step_tokenizer, readable_cases):
    long_zh = next(c for c in readable_cases["step1"] if c["tag"] == "long_zh")
    assert step_tokenizer.encode(long_zh["text"][0]) == long_zh["raw_sentencepiece_ids"][0]
    assert len(long_zh["raw_sentencepiece_ids"][0]) > 22  # the golden case really truncates
    out = step_tokenizer(long_zh["text"], max_length=24)
    assert out["input_ids"][0, 1:23].tolist() == long_zh["raw_sentencepiece_ids"][0][:22]
    assert out["input_ids"][0, -1] == EOS_ID and out["attention_mask"].all()


def test_step1_defaults_and_empty_inputs(step_tokenizer):
    assert (BOS_ID, EOS_ID, PAD_ID) == (1, 2, 2)
    out = step_tokenizer(["A cat sits on the window.", ""])
    assert out["input_ids"].shape == (2, 320) and out["attention_mask"].shape == (2, 320)
    assert out["input_ids"][1].tolist() == [1] + [2] * 319
    assert out["attention_mask"][1].tolist() == [1, 1] + [0] * 318
    empty = step_tokenizer([])
    assert torch.equal(empty["input_ids"], out["input_ids"][1:])
    assert torch.equal(step_tokenizer("A cat sits on the window.")["input_ids"], out["input_ids"][:1])


def test_step1_rejects_bad_arguments(step_tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        step_tokenizer(["a"], max_length=1)
    with pytest.raises(ValueError, match="padding"):
        step_tokenizer(["a"], padding="longest")
    with pytest.raises(ValueError, match="strings"):
        step_tokenizer(["a", 3])


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="step1_chat_tokenizer.model"):
        Wrapped_StepChatTokenizer(tmp_path / "step1_chat_tokenizer.model")


def test_not_a_sentencepiece_file(tmp_path):
    bad = tmp_path / "step1_chat_tokenizer.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Wrapped_StepChatTokenizer(bad)


def test_missing_special_tokens_are_named(tmp_path):
    path = _train(tmp_path, control=CONTROL_TOKENS[:2], user=USER_TOKENS[:1])
    with pytest.raises(TokenizerError) as info:
        Wrapped_StepChatTokenizer(path)
    message = str(info.value)
    for name in CONTROL_TOKENS[2:] + USER_TOKENS[1:]:
        assert name in message
    for name in CONTROL_TOKENS[:2] + USER_TOKENS[:1]:
        assert name not in message


def test_control_tokens_must_be_control(tmp_path):
    path = _train(tmp_path, user=CONTROL_TOKENS + USER_TOKENS)
    with pytest.raises(TokenizerError, match="must be control symbols"):
        Wrapped_StepChatTokenizer(path)


def test_tiny_factory_tokenizer_is_valid_and_deterministic(tmp_path):
    from stepvideo.testing.tiny_text import MAGIC_STRINGS, train_step_tokenizer

    proto = train_step_tokenizer(512)
    assert proto == train_step_tokenizer(512)
    path = tmp_path / "step1_chat_tokenizer.model"
    path.write_bytes(proto)
    tok = Wrapped_StepChatTokenizer(path)
    assert tok.vocab_size == 512
    assert tok._sp.unk_id() == 0 and tok._sp.bos_id() == 1 and tok._sp.eos_id() == 2 and tok._sp.pad_id() == -1
    for text in MAGIC_STRINGS + ("A cat sits on the window. 2025!",):
        ids = tok.encode(text)
        assert 0 not in ids  # byte fallback: never unknown
        assert tok.decode(ids) == text


def test_bert_tokenizer_golden(golden):
    from transformers import BertTokenizer

    data = golden.data("tokenizers")
    bert = golden.case("tokenizers")["bert"]
    tokenizer = BertTokenizer.from_pretrained(str(golden.root / "hunyuan_clip_tiny" / "tokenizer"))
    out = tokenizer(bert["prompts"], padding="max_length", max_length=77, truncation=True,
                    return_attention_mask=True, return_tensors="pt")
    assert torch.equal(out["input_ids"], data["outputs.bert.input_ids"])
    assert torch.equal(out["attention_mask"], data["outputs.bert.attention_mask"])
