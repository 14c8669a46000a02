"""Optional compiled block path: ``torch.compile`` the forward of every DiT block.

``compile_blocks(model)`` replaces ``transformer_blocks[i].forward`` with a compiled version
of the same code; state-dict keys, module hooks (block offload, timing) and the eager code stay
as they are, and a model wrapped for CFG parallelism (``CFGParallelModel``) can be passed as
is. Inductor fuses the element-wise stages (``qk_norm_rope``, ``modulate``,
``gated_residual``, GELU, LayerNorm) around the matmul / attention kernels. All blocks run the
same code at the same shapes, so they share one compiled graph. ``dynamic=False`` by default:
one grid size per process, as in generation.

Parallelism: call it on the parallelized model (after ``parallelize_dit``). Multi-rank
sequence hooks are wrapped in :class:`EagerSequenceHooks`, whose ``attention`` (the Ulysses
all-to-all exchanges around the attention kernel) runs outside Dynamo: under Ulysses every block
is two compiled graphs around one eager attention call. Tensor parallelism's all-reduce is traced
as a functional collective; the CFG wrapper is outside the blocks and unchanged.

Compilation happens on the first forward; its wall time is logged once at INFO
(``compiled DiT blocks: first call ... s``). The Inductor cache (``TORCHINDUCTOR_CACHE_DIR``)
makes later runs with the same shapes reuse the compiled kernels: if the user has not set it,
:func:`compile_blocks` sets it (at call time, never at import) to ``cache_dir`` or to
:func:`default_cache_dir` (``$XDG_CACHE_HOME/stepvideo/inductor``, else
``~/.cache/stepvideo/inductor``), which survives reboots unlike Inductor's own ``/tmp`` default.
Importing ``torch._dynamo`` writes Inductor's default into ``TORCHINDUCTOR_CACHE_DIR`` itself,
so a value equal to that default is taken for torch's, not the user's (:func:`user_cache_dir`).
"""
from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..models.parallel_hooks import LocalSequence

logger = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stepvideo/inductor`` (``~/.cache/stepvideo/inductor`` without XDG)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stepvideo" / "inductor"


def inductor_default_cache_dir() -> str:
    """Inductor's own default, ``$TMPDIR/torchinductor_$USER``, which importing ``torch._dynamo``
    writes into ``TORCHINDUCTOR_CACHE_DIR``."""
    try:    # a private torch module (2.4+); the same formula below for other versions
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default
        return os.path.abspath(torch_default())
    except (ImportError, AttributeError):
        import getpass
        import tempfile

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
        return os.path.abspath(os.path.join(tempfile.gettempdir(), "torchinductor_" + user))


def user_cache_dir() -> Optional[str]:
    """``TORCHINDUCTOR_CACHE_DIR`` when the user set it; None when it is unset or holds the
    default that importing ``torch._dynamo`` wrote there."""
    value = os.environ.get(CACHE_ENV)
    if not value or os.path.abspath(value) == inductor_default_cache_dir():
        return None
    return value


def use_inductor_cache(cache_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """Choose the Inductor cache directory and return it.

    Precedence: ``cache_dir`` (an explicit request), then the user's ``TORCHINDUCTOR_CACHE_DIR``
    (:func:`user_cache_dir`), then :func:`default_cache_dir`. The choice is written to ``TORCHINDUCTOR_CACHE_DIR`` (which
    Inductor reads on each use, and spawned workers inherit).
    """
    if cache_dir is None and user_cache_dir() is not None:
        return os.environ[CACHE_ENV]
    chosen = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    chosen.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(chosen.resolve())
    return os.environ[CACHE_ENV]


def _hooks_attention(hooks, q, k, v, fn):
    return hooks.attention(q, k, v, fn)


class EagerSequenceHooks:
    """Sequence-parallel hooks whose ``attention`` Dynamo does not trace (a graph break).

    ``split``, ``gather`` and ``split_range`` (called by the model outside the blocks) and the
    attributes are those of the wrapped hooks.
    """

    def __init__(self, hooks):
        self.hooks = hooks
        self.world_size = hooks.world_size
        self.rank = hooks.rank
        self._eager_attention = torch.compiler.disable(_hooks_attention)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return self.hooks.split(x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.hooks.gather(x)

    def split_range(self, length: int):
        return self.hooks.split_range(length)

    def attention(self, q, k, v, fn):
        return self._eager_attention(self.hooks, q, k, v, fn)


def _keep_sequence_hooks_eager(model: nn.Module) -> None:
    hooks = getattr(model, "sequence_parallel", None)
    if hooks is None or isinstance(hooks, (LocalSequence, EagerSequenceHooks)):
        return
    model.set_sequence_parallel(EagerSequenceHooks(hooks))


class _FirstCallTimer:
    """Logs the wall time of the first compiled forward (compilation + one pass of the blocks)."""

    def __init__(self, first: nn.Module, last: nn.Module, cache: str):
        self.cache = cache
        self.start = None
        self.handles = [first.register_forward_pre_hook(self._pre), last.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.start is None:
            self.start = time.perf_counter()

    def _post(self, module, args, output):
        if self.start is None:
            return
        seconds = time.perf_counter() - self.start
        for handle in self.handles:
            handle.remove()
        logger.info("compiled DiT blocks: first call %.1f s (compilation + one pass; Inductor cache %s)",
                    seconds, self.cache)


def compile_blocks(model: nn.Module, *, mode: Optional[str] = None, dynamic: Optional[bool] = False,
                   fullgraph: bool = False, cache_dir: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """Compile the forward of every ``model.transformer_blocks[i]`` in place; returns ``model``.

    Args:
        model: a ``StepVideoModel``, or a wrapper that reads ``transformer_blocks`` through
            (``CFGParallelModel``), after tensor / sequence parallelism were applied.
        mode, dynamic, fullgraph: passed to ``torch.compile``. ``fullgraph=True`` is for single-
            process models (the sequence-parallel attention is a deliberate graph break).
        cache_dir: Inductor cache directory (see :func:`use_inductor_cache`).
    """
    blocks = model.transformer_blocks
    if len(blocks) == 0:
        return model
    cache = use_inductor_cache(cache_dir)
    _keep_sequence_hooks_eager(model)
    compiled = {}     # one compiled function per block class, shared by all its instances
    fresh = [block for block in blocks if "forward" not in vars(block)]      # not compiled yet
    if not fresh:
        return model
    for block in fresh:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
        # a bound method in the instance dict: module hooks stay outside the compiled code, and
        # copy.deepcopy rebinds it to the copy
        block.forward = types.MethodType(compiled[cls], block)
    _FirstCallTimer(blocks[0], blocks[-1], cache)
    logger.info("compiling %d DiT blocks on first use (mode=%s, dynamic=%s); Inductor cache %s",
                len(blocks), mode or "default", dynamic, cache)
    return model
