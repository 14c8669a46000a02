"""Tiny ``step_llm/`` and ``hunyuan_clip/`` folders for the factory.

Both folders use the official layout and load through the real loaders
(:class:`~stepvideo.text_encoders.step_llm.STEP1TextEncoder`,
:class:`~stepvideo.text_encoders.hunyuan_clip.HunyuanClip`). Tokenizers are made here, from a
small in-memory corpus written for this purpose: nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import List

from ..loading import layout, save_sharded
from ..text_encoders.step_llm import Step1Model
from .init import init_random_weights

logger = logging.getLogger(__name__)

# The default magic prompts (``../shared/spec/STEP_VIDEO_SPEC.md`` §5.8) and a few prompts in the style of the
# benchmark set.
MAGIC_STRINGS = (
    "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。",
    "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。",
    "画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、整体不变形、超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。",
    "动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、面部有褶皱、表情僵硬、畸形手指",
)

CHINESE_SENTENCES = (
    "一只小猫坐在窗台上，看着窗外的雨。",
    "一名宇航员在月球上行走，远处的地球慢慢升起。",
    "夕阳下的海边，海浪轻轻拍打着沙滩，画面安静而温暖。",
    "一个女孩在花园里奔跑，阳光透过树叶洒在她的脸上。",
    "城市的夜晚，街道上的灯光闪烁，汽车缓缓驶过。",
    "镜头缓缓推进，山间的云雾清晰可见，画面稳定。",
    "一位老人在公园里打太极，动作流畅自然。",
    "雪山脚下的湖面平静如镜，倒映着蓝色的天空。",
)

ENGLISH_SENTENCES = (
    "A cat sits on the window and watches the rain outside.",
    "An astronaut walks on the moon while the earth rises slowly in the distance.",
    "The camera moves forward through a quiet forest in the early morning light.",
    "A girl runs through the garden, and the sun shines through the green leaves.",
    "Waves roll onto the beach at sunset, the scene is calm and warm.",
    "A red car drives along the coast road with the mountains behind it.",
    "Two dogs play with a ball in the park on a sunny afternoon.",
    "The city at night is full of lights, people and moving cars.",
    "Step-Video generates a video from a text prompt in high definition.",
    "A chef slices fresh vegetables in a bright kitchen, close-up shot.",
)

NUMBERS_AND_PUNCTUATION = (
    "0 1 2 3 4 5 6 7 8 9 10 12 24 25 30 50 60 100 204 320 544 992 1080 2025",
    "HDR 4K 8K 16:9 1.5x 3.14 (video) [clip] {frame} <tag> \"quote\" 'single' - _ + = / \\ | ? ! @ # $ % ^ & * ~ ;",
    "，。、！？：；“”‘’（）《》【】…—",
)

STEP_CONTROL_SYMBOLS = ["<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>"]
STEP_USER_SYMBOLS = ["<|MASK_1e69f|>", "<|UNMASK_1e69f|>"]


def tokenizer_corpus() -> List[str]:
    """The fixed training corpus of the tiny tokenizers (repeated lines weight the merges)."""
    lines = list(MAGIC_STRINGS) + list(CHINESE_SENTENCES) + list(NUMBERS_AND_PUNCTUATION)
    lines += [s for s in ENGLISH_SENTENCES for _ in range(10)]
    return lines


# ----------------------------------------------------------------------------------------
# step_llm
# ----------------------------------------------------------------------------------------

def train_step_tokenizer(vocab_size: int) -> bytes:
    """Train a BPE SentencePiece model in memory (byte fallback, identity normalisation,
    unk 0 / bos 1 / eos 2 / no pad, the Step control and user symbols); deterministic."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        character_coverage=0.98,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=STEP_CONTROL_SYMBOLS,
        user_defined_symbols=STEP_USER_SYMBOLS,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def step_llm_config(dims) -> dict:
    """``step_llm/config.json`` in the published style (``STEP_VIDEO_SPEC.md`` Appendix B.1), tiny values."""
    head_dim = dims.llm_hidden // dims.llm_heads
    return {
        "architectures": ["Step1Model"],
        "hidden_size": dims.llm_hidden,
        "num_layers": dims.llm_layers,
        "num_attention_heads": dims.llm_heads,
        "num_attention_groups": dims.llm_groups,
        "kv_channels": head_dim,
        "ffn_hidden_size": dims.llm_ffn,
        "padded_vocab_size": dims.llm_vocab,
        "orig_vocab_size": dims.llm_vocab,
        "seq_length": 16384,
        "max_position_embeddings": 16384,
        "layernorm_epsilon": 1e-5,
        "attention_impl": "GQA",
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "use_flash_attn": True,
        "embedding_weights_in_fp32": False,
        "fp32_residual_connection": False,
        "params_dtype": "torch.bfloat16",
        "torch_dtype": "float32",
        "allow_transformer_engine": False,
        "swiglu_recompute_silu_dot": True,
        "tokens_to_generate": 512,
        "transformers_version": "4.48.3",
    }


def write_tiny_step_llm(folder: Path, dims, seed: int = 2) -> None:
    """Write ``config.json``, 2 float32 safetensors shards + index and a locally trained
    ``step1_chat_tokenizer.model`` (vocab = ``dims.llm_vocab``)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = step_llm_config(dims)
    model = Step1Model(config, dtype=torch.float32)
    init_random_weights(model, seed=seed)
    (folder / layout.LLM_CONFIG).write_text(json.dumps(config, indent=2))
    save_sharded(model.state_dict(), folder, layout.LLM_WEIGHTS, num_shards=2)
    (folder / layout.LLM_TOKENIZER_FILE).write_bytes(train_step_tokenizer(dims.llm_vocab))


# ----------------------------------------------------------------------------------------
# hunyuan_clip
# ----------------------------------------------------------------------------------------

BERT_SPECIAL = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}

ENGLISH_WORDS = (
    "a an the and of in on at to with for from by is are was be it this that as while through into "
    "cat dog dogs girl boy man woman people chef astronaut car cars city night day light lights sun "
    "moon earth rain window garden park beach sea waves forest mountain mountains road coast kitchen "
    "video camera scene shot close up slowly quiet calm warm bright green red blue white black "
    "sits walks runs play plays moves drives rises shines watches slices generates high definition "
    "text prompt frame clip tag step hdr"
).split()
WORDPIECES = ("##s", "##ed", "##ing", "##ly", "##er", "##es", "##fun", "##y", "##d", "##n", "##t")


def bert_vocab() -> List[str]:
    """A Chinese-BERT-style vocab: ``[PAD]`` 0, ``[unusedN]`` 1-99, ``[UNK]`` 100, ``[CLS]`` 101,
    ``[SEP]`` 102, ``[MASK]`` 103, then ASCII characters, CJK characters and punctuation of the
    corpus, English words and word pieces."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(vocab)

    def add(token: str) -> None:
        if token not in seen and not token.isspace() and token:
            seen.add(token)
            vocab.append(token)

    for code in range(33, 127):
        add(chr(code).lower())
    for line in tokenizer_corpus():
        for ch in line:
            if ord(ch) > 127:
                add(ch)
    for word in ENGLISH_WORDS:
        add(word)
    for piece in WORDPIECES:
        add(piece)
    return vocab


def write_tiny_hunyuan_clip(folder: Path, dims, seed: int = 3) -> None:
    """Write ``clip_text_encoder/{config.json, model.safetensors}`` (a random ``BertModel``) and
    ``tokenizer/{vocab.txt, tokenizer_config.json, special_tokens_map.json}``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    encoder_dir = folder / layout.CLIP_ENCODER_SUBDIR
    tokenizer_dir = folder / layout.CLIP_TOKENIZER_SUBDIR
    encoder_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)

    vocab = bert_vocab()
    vocab_file = tokenizer_dir / "vocab.txt"
    vocab_file.write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, tokenize_chinese_chars=True)
    tokenizer.save_pretrained(str(tokenizer_dir))
    for extra in ("added_tokens.json", "tokenizer.json"):
        (tokenizer_dir / extra).unlink(missing_ok=True)

    config = BertConfig(
        vocab_size=len(vocab), hidden_size=dims.clip_hidden, num_hidden_layers=dims.clip_layers,
        num_attention_heads=dims.clip_heads, intermediate_size=dims.clip_intermediate,
        max_position_embeddings=dims.clip_max_positions, type_vocab_size=2, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12, pad_token_id=0,
    )
    config.architectures = ["BertModel"]
    model = BertModel(config)
    init_random_weights(model, seed=seed, embedding_std=0.5)
    config.to_json_file(str(encoder_dir / "config.json"))
    state = {k: v.to(torch.float32) for k, v in model.state_dict().items()}
    save_sharded(state, encoder_dir, "model", num_shards=1)
