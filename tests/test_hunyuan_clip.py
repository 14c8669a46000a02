"""HunyuanCLIP (BERT) wrapper: golden replay, .bin loading, tiny factory folder, errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from stepvideo.loading import CorruptCheckpointError
from stepvideo.text_encoders.hunyuan_clip import HunyuanClip


class NotWeights:
    """An object only full unpickling would accept."""


@pytest.fixture(scope="module")
def golden_clip_dir(golden):
    return golden.root / "hunyuan_clip_tiny"


def _check_golden(clip, golden):
    data = golden.data("tokenizers")
    prompts = golden.case("tokenizers")["bert"]["prompts"]
    hidden, pooled = clip(prompts)
    tol = golden.tolerance("tokenizers")
    assert hidden.shape == (4, 77, 48) and hidden.dtype == torch.float32
    torch.testing.assert_close(hidden, data["outputs.clip.last_hidden_state"], **tol)
    torch.testing.assert_close(pooled, data["outputs.clip.pooler_output"], **tol)


def test_golden_last_hidden_state(golden, golden_clip_dir):
    clip = HunyuanClip(golden_clip_dir, max_length=77)
    _check_golden(clip, golden)


def test_pytorch_model_bin_is_loaded_safely(golden, golden_clip_dir, tmp_path):
    """The official checkpoint ships ``pytorch_model.bin``; old BERT checkpoints may also carry a
    ``bert.`` prefix and the ``position_ids`` buffer."""
    from safetensors.torch import load_file

    folder = tmp_path / "hunyuan_clip"
    shutil.copytree(golden_clip_dir, folder)
    encoder = folder / "clip_text_encoder"
    state = load_file(str(encoder / "model.safetensors"))
    (encoder / "model.safetensors").unlink()
    legacy = {f"bert.{k}": v for k, v in state.items()}
    legacy["bert.embeddings.position_ids"] = torch.arange(80)[None]
    torch.save(legacy, encoder / "pytorch_model.bin")
    _check_golden(HunyuanClip(folder), golden)

    torch.save({"payload": NotWeights()}, encoder / "pytorch_model.bin")
    with pytest.raises(CorruptCheckpointError, match="weights_only=True"):
        HunyuanClip(folder)

    (encoder / "pytorch_model.bin").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1302\n")
    with pytest.raises(CorruptCheckpointError, match="git-lfs"):
        HunyuanClip(folder)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from stepvideo.loading import layout
    from stepvideo.testing.tiny import write_tiny_model_dir

    root = write_tiny_model_dir(tmp_path_factory.mktemp("tiny_clip") / "m", parts=["hunyuan_clip"])
    return root / layout.CLIP_DIR


def test_tiny_factory_folder(tiny_clip_dir):
    assert sorted(p.name for p in (tiny_clip_dir / "tokenizer").iterdir()) == [
        "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    assert sorted(p.name for p in (tiny_clip_dir / "clip_text_encoder").iterdir()) == [
        "config.json", "model.safetensors"]
    vocab = (tiny_clip_dir / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert [vocab[i] for i in (0, 100, 101, 102, 103)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

    clip = HunyuanClip(tiny_clip_dir)
    prompts = ["一只小猫坐在窗台上。超高清、画面稳定", "A cat sits on the window.", ""]
    tokens = clip.tokenizer(prompts)["input_ids"]
    assert all(100 not in row for row in tokens[:2])  # the vocab covers the corpus
    hidden, pooled = clip(prompts)
    assert hidden.shape == (3, 77, 64) and hidden.dtype == torch.float32 and pooled.shape == (3, 64)
    assert torch.isfinite(hidden).all()

    bf16 = HunyuanClip(tiny_clip_dir, dtype=torch.bfloat16)
    hidden16, _ = bf16(prompts)
    assert hidden16.dtype == torch.bfloat16
    torch.testing.assert_close(hidden16.float(), hidden, atol=0.1, rtol=0.05)


def test_missing_parts_are_reported(tiny_clip_dir, tmp_path):
    folder = tmp_path / "hunyuan_clip"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "clip_text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        HunyuanClip(folder)
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        HunyuanClip(folder)
