"""Batch evaluation over prompt sets (Step-Video-T2V-Eval, TI2V-Eval, JSONL / text files).

``benchmark/evaluation.py`` is the entry point; see docs/evaluation.md.
"""
from .sets import EvalItem, load_items, parse_shard, select_items, shard_items  # noqa: F401
