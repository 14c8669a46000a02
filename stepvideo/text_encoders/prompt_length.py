"""How much of a prompt the two text encoders read, so a cut prompt is reported, not silent.

    counter = PromptLengthCounter.from_model_dir("ckpts")        # None without the tokenizer files
    length = counter.check(prompt, sampling.pos_magic)           # logs the warning line if it is cut
    check_prompt_length("ckpts", prompt, sampling.pos_magic)     # the same in one call

The Step-LLM reads ``max_length`` = 320 tokens (BOS + the first 318 text ids + EOS) and
HunyuanCLIP 77 (``[CLS]`` + 75 word pieces + ``[SEP]``); both tokenizers drop the rest without a
word, and the reference does the same. Nothing here changes what is encoded: it only counts,
with the same tokenizer files, the text the encoders receive (the prompt followed by the
positive magic text).

``truncated``: the Step-LLM cuts the prompt with its magic text, or HunyuanCLIP cuts the prompt's
own words. (HunyuanCLIP's 77 tokens usually end inside the magic text, as in the reference; that
alone is not reported.)
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..loading import layout
from .caption import CaptionEncoder
from .tokenizer import StepChatTokenizer

logger = logging.getLogger(__name__)

_ENCODER_DEFAULTS = inspect.signature(CaptionEncoder.from_pretrained).parameters
STEP_LLM_READS = _ENCODER_DEFAULTS["max_length"].default           # 320, the caption encoder's own default
HUNYUAN_CLIP_READS = _ENCODER_DEFAULTS["clip_max_length"].default  # 77


@dataclass(frozen=True)
class PromptLength:
    """Token counts, special tokens included, as each encoder would count them."""

    step_llm: int                 # prompt + positive magic text, BOS/EOS included
    step_llm_reads: int
    hunyuan_clip: int             # prompt + positive magic text, [CLS]/[SEP] included
    hunyuan_clip_reads: int
    hunyuan_clip_prompt: int      # the prompt alone, [CLS]/[SEP] included

    @property
    def truncated(self) -> bool:
        return self.step_llm > self.step_llm_reads or self.hunyuan_clip_prompt > self.hunyuan_clip_reads

    def warning(self, name: str = "the prompt") -> str:
        """The one line that says it (meant for ``truncated`` prompts)."""
        return (f"{name} is longer than the text encoders read: with the positive magic text it is "
                f"{self.step_llm} Step-LLM tokens (the Step-LLM reads {self.step_llm_reads}) and "
                f"{self.hunyuan_clip} HunyuanCLIP tokens (HunyuanCLIP reads {self.hunyuan_clip_reads}); the rest "
                "is dropped, as in the reference (long prompts are reported to give noisy videos: shorten it)")

    def to_dict(self) -> dict:
        """For the machine-readable records (job settings, evaluation manifest)."""
        return {**asdict(self), "truncated": self.truncated}


class PromptLengthCounter:
    """The two tokenizers of a checkpoint folder (no weights)."""

    def __init__(self, step_tokenizer: StepChatTokenizer, clip_tokenizer,
                 step_llm_reads: int = STEP_LLM_READS, hunyuan_clip_reads: int = HUNYUAN_CLIP_READS):
        self.step_tokenizer = step_tokenizer
        self.clip_tokenizer = clip_tokenizer
        self.step_llm_reads = step_llm_reads
        self.hunyuan_clip_reads = hunyuan_clip_reads

    @classmethod
    def from_model_dir(cls, model_dir) -> Optional["PromptLengthCounter"]:
        """The tokenizers of ``model_dir``; None (logged at DEBUG) when the folder lacks them,
        e.g. a DiT-only folder next to a caption service, or a Hub id not downloaded yet."""
        root = Path(model_dir)
        step_file = root / layout.LLM_DIR / layout.LLM_TOKENIZER_FILE
        clip_dir = root / layout.CLIP_DIR / layout.CLIP_TOKENIZER_SUBDIR
        if not step_file.is_file() or not (clip_dir / "vocab.txt").is_file():
            logger.debug("prompt length not checked: no tokenizer files under %s", root)
            return None
        from transformers import BertTokenizer   # heavy; only when counting

        return cls(StepChatTokenizer(step_file), BertTokenizer.from_pretrained(str(clip_dir)))

    def _clip_tokens(self, text: str) -> int:
        ids = self.clip_tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return len(ids)

    def count(self, prompt: str, pos_magic: str = "") -> PromptLength:
        text = prompt + pos_magic
        return PromptLength(step_llm=len(self.step_tokenizer.encode(text)) + 2, step_llm_reads=self.step_llm_reads,
                            hunyuan_clip=self._clip_tokens(text), hunyuan_clip_reads=self.hunyuan_clip_reads,
                            hunyuan_clip_prompt=self._clip_tokens(prompt))

    def check(self, prompt: str, pos_magic: str = "", name: str = "the prompt") -> PromptLength:
        """:meth:`count`, and the warning line (about ``name``) logged when the encoders cut the prompt."""
        length = self.count(prompt, pos_magic)
        if length.truncated:
            logger.warning(length.warning(name))
        return length


def check_prompt_length(model_dir, prompt: str, pos_magic: str = "") -> Optional[PromptLength]:
    """:meth:`PromptLengthCounter.check` with the tokenizers of ``model_dir``; None without them."""
    counter = PromptLengthCounter.from_model_dir(model_dir)
    return None if counter is None else counter.check(prompt, pos_magic)
