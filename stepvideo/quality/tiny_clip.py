"""A tiny random Chinese-CLIP in the Hugging Face layout, for tests (no download).

    python -m stepvideo.quality.tiny_clip OUT_DIR

Writes ``config.json`` + ``model.safetensors`` (``ChineseCLIPModel``, 2 layers of width 32 per
tower, 32x32 images in 8x8 patches), ``preprocessor_config.json`` and a Chinese BERT vocab
(the tiny model's). Its scores are random numbers: they exercise the code, not quality.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..testing.tiny_text import bert_vocab

IMAGE_SIZE = 32
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_tiny_chinese_clip(folder, seed: int = 0) -> Path:
    import torch
    from transformers import BertTokenizer, ChineseCLIPConfig, ChineseCLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = bert_vocab()
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, tokenize_chinese_chars=True,
                              model_max_length=52)
    tokenizer.save_pretrained(str(folder))
    config = ChineseCLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=IMAGE_SIZE, patch_size=8, projection_dim=16),
        projection_dim=16)
    torch.manual_seed(seed)
    ChineseCLIPModel(config).eval().save_pretrained(str(folder), safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ChineseCLIPImageProcessor", "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_normalize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD}, indent=1), encoding="utf-8")
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m stepvideo.quality.tiny_clip OUT_DIR", file=sys.stderr)
        sys.exit(2)
    print(write_tiny_chinese_clip(sys.argv[1]))
