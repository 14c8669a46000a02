"""Text encoders of the caption path: Step-LLM (+ its SentencePiece tokenizer), HunyuanCLIP,
and ``CaptionEncoder`` which assembles both (``../shared/spec/STEP_VIDEO_SPEC.md`` §6).

Importing this package is cheap and has no side effects: no kernel libraries are loaded, no
argv is parsed, and torch/transformers/sentencepiece are imported only when a public name
is first used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "StepChatTokenizer": ".tokenizer",
    "Wrapped_StepChatTokenizer": ".tokenizer",
    "TokenizerError": ".tokenizer",
    "alibi_slopes": ".alibi",
    "sqrt_alibi_attention": ".alibi",
    "sqrt_alibi_bias": ".alibi",
    "Step1Config": ".step_llm",
    "Step1Model": ".step_llm",
    "STEP1TextEncoder": ".step_llm",
    "HunyuanClip": ".hunyuan_clip",
    "CaptionEncoder": ".caption",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
