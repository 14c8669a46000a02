"""The Step-LLM tokenizer: a SentencePiece model plus fixed BOS/EOS/PAD wrapping
(``../shared/spec/STEP_VIDEO_SPEC.md`` §6.1).

``StepChatTokenizer`` owns the SentencePiece model and checks that the special pieces the
Step chat format relies on exist. ``Wrapped_StepChatTokenizer`` adds the batch call used by
the text encoder: every text becomes ``[BOS] + ids[:max_length-2] + [EOS]`` right-padded
with ``PAD`` to ``max_length``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

import torch

BOS_ID = 1
EOS_ID = 2
PAD_ID = 2

# must be control (or unknown) pieces of the SentencePiece model
CONTROL_TOKENS = ("<|BOT|>", "<|EOT|>", "<|CALL_START|>", "<|CALL_END|>", "<|THINK_START|>", "<|THINK_END|>")
# must exist (user-defined pieces)
USER_TOKENS = ("<|MASK_1e69f|>", "<|UNMASK_1e69f|>")


class TokenizerError(ValueError):
    """The SentencePiece model is not a valid Step chat tokenizer."""


class StepChatTokenizer:
    """SentencePiece model of the Step-1 chat models.

    Args:
        model_file: path to ``step1_chat_tokenizer.model``.

    Raises:
        FileNotFoundError: the file does not exist.
        TokenizerError: the file is not a SentencePiece model, or it lacks required special
            pieces (all missing ones are named).
    """

    def __init__(self, model_file: Union[str, os.PathLike]):
        import sentencepiece as spm

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"Step-LLM tokenizer not found: {path} (expected step1_chat_tokenizer.model in the "
                "step_llm folder of the checkpoint)")
        self.model_file = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{path} is not a SentencePiece model ({err})") from err
        self._check_special_tokens()

    def _piece_id(self, piece: str) -> int:
        """Id of ``piece``, or -1 when the model does not contain it."""
        idx = self._sp.PieceToId(piece)
        return idx if self._sp.IdToPiece(idx) == piece else -1

    def _check_special_tokens(self) -> None:
        missing = [p for p in CONTROL_TOKENS + USER_TOKENS if self._piece_id(p) < 0]
        not_control = [p for p in CONTROL_TOKENS if p not in missing
                       and not (self._sp.IsControl(self._piece_id(p)) or self._sp.IsUnknown(self._piece_id(p)))]
        problems = []
        if missing:
            problems.append(f"missing special tokens: {', '.join(missing)}")
        if not_control:
            problems.append(f"tokens that must be control symbols but are not: {', '.join(not_control)}")
        if problems:
            raise TokenizerError(
                f"{self.model_file} is not a Step chat tokenizer ({'; '.join(problems)}). Use the "
                "step1_chat_tokenizer.model shipped with the checkpoint.")

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def encode(self, text: str) -> List[int]:
        """Plain SentencePiece ids of ``text`` (no BOS/EOS)."""
        return list(self._sp.EncodeAsIds(text))

    def tokenize(self, text: str) -> List[str]:
        return list(self._sp.EncodeAsPieces(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def piece_to_id(self, piece: str) -> int:
        return self._piece_id(piece)


class Wrapped_StepChatTokenizer(StepChatTokenizer):  # noqa: N801  (the reference's public name)
    """Batch tokenizer of the Step-LLM text encoder (reference name and call signature)."""

    def __call__(self, text: Union[str, Sequence[str]], max_length: int = 320, padding: str = "max_length",
                 truncation: bool = True, return_tensors: str = "pt") -> Dict[str, object]:
        """Tokenise a batch with BOS=1, EOS=2 and right padding with PAD=2.

        Args:
            text: a string or a list of strings. An empty list gives one ``[1, 2, 2, ...]`` row.
            max_length: row length; each text keeps its first ``max_length - 2`` ids.

        Returns:
            dict with ``input_ids (B, max_length)`` and ``attention_mask (B, max_length)`` (int64;
            mask is 1 up to and including EOS), ``cu_input_ids`` (the valid ids of all rows
            concatenated, int64), ``cu_seqlens (B + 1,)`` (int32 prefix sums of the valid
            lengths) and ``max_seq_len`` (int, longest valid length).
        """
        if padding != "max_length" or not truncation or return_tensors != "pt":
            raise ValueError("Wrapped_StepChatTokenizer only supports padding='max_length', truncation=True, "
                             f"return_tensors='pt' (got {padding!r}, {truncation!r}, {return_tensors!r})")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            texts = [""]
        rows, masks, lengths = [], [], []
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"texts must be strings, got {type(t).__name__}")
            ids = [BOS_ID] + self.encode(t)[:max_length - 2] + [EOS_ID]
            lengths.append(len(ids))
            rows.append(ids + [PAD_ID] * (max_length - len(ids)))
            masks.append([1] * len(ids) + [0] * (max_length - len(ids)))
        input_ids = torch.tensor(rows, dtype=torch.int64)
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.tensor(masks, dtype=torch.int64),
            "cu_input_ids": torch.cat([input_ids[i, :n] for i, n in enumerate(lengths)]),
            "cu_seqlens": cu_seqlens,
            "max_seq_len": max(lengths),
        }
