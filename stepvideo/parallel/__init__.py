"""Multi-rank execution helpers (``torch.distributed``; every path also works at world size 1).

Light, lazy re-exports (importing the package imports nothing else; xfuser never unless chosen).
"""
from __future__ import annotations

import importlib

# public name -> defining module
_EXPORTS = {
    "ParallelConfig": "stepvideo.parallel.state",
    "ParallelState": "stepvideo.parallel.state",
    "validate_before_loading": "stepvideo.parallel.state",
    "UlyssesSequence": "stepvideo.parallel.ulysses",
    "apply_tensor_parallel": "stepvideo.parallel.tensor",
    "CFGParallelModel": "stepvideo.parallel.cfg",
    "parallelize_dit": "stepvideo.parallel.parallelize",
    "load_parallel_dit": "stepvideo.parallel.parallelize",
    "run_on_cpu_ranks": "stepvideo.parallel.launch",
}
_ALIASES = {"apply_parallelism": ("stepvideo.parallel.parallelize", "parallelize_dit")}

__all__ = [*_EXPORTS, *_ALIASES]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
    else:
        raise AttributeError(f"module 'stepvideo.parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
