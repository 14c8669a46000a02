"""Optional xfuser (xDiT) sequence-parallel attention behind the same hook protocol.

Selected with ``ParallelConfig(sp_backend="xfuser")`` (``--sp_backend xfuser``, old spelling
``--parallel_backend``) and imported only then. Tensor parallelism is refused with this backend
(``ParallelConfig`` raises): xfuser builds its Ulysses groups from contiguous ranks while ours
interleave with the tensor-parallel ranks, so the all-to-all would run between the wrong ranks.
xfuser keeps its process groups in module globals: one initialisation per process; a second
one raises a RuntimeError saying so. Token split/gather are ours (:class:`UlyssesSequence`); only the
attention call goes to ``xFuserLongContextAttention`` (Ulysses all-to-all + flash attention,
CUDA, fp16/bf16), so the DiT's own attention backend is bypassed inside self-attention.
xfuser needs equal chunks: the token count must divide by the SP degree.

xfuser's import can fail with more than ImportError on CPU-only or mismatched installs
(CUDA/flash-attn initialisation errors), so the import is guarded broadly and re-raised as
one RuntimeError that names the cause and the fix.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..accelerator import accelerator
from .state import ParallelState
from .ulysses import UlyssesSequence

logger = logging.getLogger(__name__)

INSTALL_HINT = ("install it on a CUDA host with `pip install xfuser` (plus flash-attn: "
                "`pip install flash-attn --no-build-isolation`), or use the default backend 'native'")


def import_xfuser():
    """Return ``(xFuserLongContextAttention, init_distributed_environment, initialize_model_parallel)``."""
    try:
        from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
    except Exception as err:   # xfuser may raise RuntimeError/OSError/AssertionError on import on CPU
        raise RuntimeError(f"parallel backend 'xfuser' is unavailable ({type(err).__name__}: {err}); "
                           f"{INSTALL_HINT}") from err
    return xFuserLongContextAttention, init_distributed_environment, initialize_model_parallel


class XFuserSequence(UlyssesSequence):
    """Hooks whose attention is xDiT's ``xFuserLongContextAttention`` over xfuser's SP group.

    xfuser keeps its own process groups; they are initialised here with the same degrees and
    the same ``tp-sp-pp-cfg`` rank order as :class:`ParallelState`.
    """

    def __init__(self, state: ParallelState):
        attention_cls, init_environment, init_model_parallel = import_xfuser()
        if not accelerator().is_available():
            raise RuntimeError(f"parallel backend 'xfuser' needs CUDA (flash attention); {INSTALL_HINT}")
        super().__init__(state.sp_group)
        config = state.config
        if config.tp_degree > 1:      # ParallelConfig refuses it too; kept for states built by hand
            raise ValueError("the xfuser backend cannot be combined with tensor parallelism; use sp_backend 'native'")
        try:
            init_environment(rank=state.rank, world_size=state.world_size)
            init_model_parallel(sequence_parallel_degree=config.sp_degree, ring_degree=1,
                                ulysses_degree=config.sp_degree, tensor_parallel_degree=config.tp_degree,
                                classifier_free_guidance_degree=config.cfg_degree)
        except AssertionError as err:   # xfuser asserts its module-level groups are not set yet
            raise RuntimeError(f"xfuser's process groups are already initialised in this process ({err or 'assert'}); "
                               "xfuser allows one initialisation per process: reuse the loaded model, or start a "
                               "new process") from None
        self._attention = attention_cls()

    def split(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % self.world_size:
            raise ValueError(f"the xfuser backend needs a token count divisible by ulysses_degree "
                             f"({x.shape[1]} tokens, degree {self.world_size}); use backend 'native'")
        return super().split(x)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``q, k, v [B, L/W, N, Dh]`` -> ``[B, L/W, N, Dh]``; ``fn`` is not used."""
        return self._attention(None, query=q, key=k, value=v, softmax_scale=q.shape[-1] ** -0.5)
