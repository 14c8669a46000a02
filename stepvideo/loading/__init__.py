"""Checkpoint discovery, validation and streaming loaders."""
from .checkpoint import (CheckpointError, CheckpointKeyError, CorruptCheckpointError, LoadReport,
                         assert_materialized, check_safetensors_file, constructor_kwargs, find_weight_files,
                         iter_safetensors, load_files_into_model, load_state_into_model, parse_dtype,
                         read_json, save_sharded)
from .hub import resolve_model_dir

__all__ = [
    "CheckpointError", "CheckpointKeyError", "CorruptCheckpointError", "LoadReport", "assert_materialized",
    "check_safetensors_file", "constructor_kwargs", "find_weight_files", "iter_safetensors",
    "load_files_into_model", "load_state_into_model", "parse_dtype", "read_json", "resolve_model_dir",
    "save_sharded",
]
