"""Parallel configuration, process groups and the checks to run before loading weights.

Rank layout
-----------
A world of ``cfg * sp * tp`` ranks is arranged with **TP varying fastest, then SP, then CFG**
(xDiT's ``tp-sp-pp-cfg-dp`` order)::

    rank = (cfg_rank * sp_degree + sp_rank) * tp_degree + tp_rank

With ``tp = 2, sp = 2`` (4 ranks) the TP groups are {0, 1}, {2, 3} and the SP groups {0, 2},
{1, 3}; adding ``cfg = 2`` (8 ranks) gives CFG groups {0, 4}, {1, 5}, {2, 6}, {3, 7}. Only the
order of the communication depends on the layout, never the numbers.

Usage (every rank, e.g. under ``torchrun``)::

    config = ParallelConfig(ulysses_degree=2, tensor_parallel_degree=2)
    validate_before_loading(config, num_heads=48, world_size=read_env().world_size, token_count=L)
    state = ParallelState.from_env(config)     # init_process_group + SP/TP/CFG groups
    ...
    state.barrier()
    if state.is_main:                          # only global rank 0 writes files
        save(...)
    state.destroy()

``ParallelState.single()`` (or ``from_env`` without the torchrun variables) is the size-1
default: it never touches ``torch.distributed``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..accelerator import accelerator

logger = logging.getLogger(__name__)

SEQUENCE_BACKENDS = ("native", "xfuser")


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True, init=False)
class ParallelConfig:
    """Degrees of the three kinds of DiT parallelism.

    Args:
        ulysses_degree: sequence-parallel (Ulysses all-to-all) ranks per sample.
        tensor_parallel_degree: ranks sharing every block's weights (whole heads per rank).
        cfg_parallel: ``True``/``2`` runs the conditional and unconditional rows of the CFG
            batch on two rank groups; ``False``/``1`` keeps the batch of 2 together.
        ring_degree: kept for CLI compatibility with the reference; must stay 1.
        sp_backend: sequence-parallel implementation: ``native`` (``all_to_all_single``, any
            process-group backend, gloo included) or ``xfuser`` (optional, CUDA only, tensor-parallel
            degree 1). ``backend=`` (keyword) and the ``backend`` attribute are the old spelling.
    """

    ulysses_degree: int = 1
    tensor_parallel_degree: int = 1
    cfg_parallel: Union[bool, int] = False
    ring_degree: int = 1
    sp_backend: str = "native"

    def __init__(self, ulysses_degree: int = 1, tensor_parallel_degree: int = 1, cfg_parallel: Union[bool, int] = False,
                 ring_degree: int = 1, sp_backend: str = "native", *, backend: Optional[str] = None):
        if backend is not None:
            if sp_backend not in ("native", backend):
                raise ValueError(f"pass one of `sp_backend` ({sp_backend!r}) and its old name `backend` ({backend!r})")
            sp_backend = backend
        for name, value in (("ulysses_degree", ulysses_degree), ("tensor_parallel_degree", tensor_parallel_degree),
                            ("cfg_parallel", cfg_parallel), ("ring_degree", ring_degree), ("sp_backend", sp_backend)):
            object.__setattr__(self, name, value)
        self.__post_init__()

    @property
    def backend(self) -> str:
        """Old name of :attr:`sp_backend`."""
        return self.sp_backend

    def __post_init__(self):
        for name in ("ulysses_degree", "tensor_parallel_degree", "ring_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.ring_degree != 1:
            raise ValueError(f"`ring_degree` must be 1 (the sequence-parallel degree is `ulysses_degree` alone, "
                             f"as in the reference), got {self.ring_degree}")
        if not isinstance(self.cfg_parallel, bool) and self.cfg_parallel not in (1, 2):
            raise ValueError(f"`cfg_parallel` must be a bool or a degree of 1 or 2, got {self.cfg_parallel!r}")
        if self.sp_backend not in SEQUENCE_BACKENDS:
            raise ValueError(f"`sp_backend` must be one of {', '.join(SEQUENCE_BACKENDS)}, got {self.sp_backend!r}")
        if self.sp_backend == "xfuser" and self.tensor_parallel_degree > 1:
            raise ValueError(f"the xfuser sequence-parallel backend cannot be combined with tensor parallelism "
                             f"(tensor_parallel_degree {self.tensor_parallel_degree}): its Ulysses groups are built "
                             "from contiguous ranks, ours interleave with the tensor-parallel ranks, so attention "
                             "would be exchanged between the wrong ranks; use sp_backend 'native' or "
                             "tensor_parallel_degree 1")

    @property
    def cfg_degree(self) -> int:
        if isinstance(self.cfg_parallel, bool):
            return 2 if self.cfg_parallel else 1
        return int(self.cfg_parallel)

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree

    @property
    def tp_degree(self) -> int:
        return self.tensor_parallel_degree

    @property
    def world_size(self) -> int:
        """Number of ranks this configuration needs."""
        return self.cfg_degree * self.sp_degree * self.tp_degree


def coordinates(rank: int, config: ParallelConfig) -> Tuple[int, int, int]:
    """``(cfg_rank, sp_rank, tp_rank)`` of a global ``rank`` (TP fastest, then SP, then CFG)."""
    tp, sp = config.tp_degree, config.sp_degree
    return rank // (tp * sp), (rank // tp) % sp, rank % tp


def group_ranks(config: ParallelConfig) -> dict:
    """Rank lists of every SP, TP and CFG group: ``{"sp": [[...], ...], "tp": ..., "cfg": ...}``."""
    cfg, sp, tp = config.cfg_degree, config.sp_degree, config.tp_degree

    def rank(c, s, t):
        return (c * sp + s) * tp + t

    return {
        "tp": [[rank(c, s, t) for t in range(tp)] for c in range(cfg) for s in range(sp)],
        "sp": [[rank(c, s, t) for s in range(sp)] for c in range(cfg) for t in range(tp)],
        "cfg": [[rank(c, s, t) for c in range(cfg)] for s in range(sp) for t in range(tp)],
    }


class SequencePlan(NamedTuple):
    """What :func:`validate_before_loading` found: per-rank heads and token counts."""

    heads_per_rank: int          # heads in attention after TP and the Ulysses exchange
    tokens_per_rank: List[int]   # SP chunk lengths (empty when the token count is unknown)
    uneven: bool                 # token count not divisible by the SP degree


def validate_before_loading(config: ParallelConfig, num_heads: int, world_size: int,
                            token_count: Optional[int] = None) -> SequencePlan:
    """Check a parallel layout against the model and the launch, before any weight is read.

    Rules: ``num_heads`` divisible by ``ulysses_degree * tensor_parallel_degree``; the launch's
    ``world_size`` equal to the product of the degrees; and, for ``token_count`` (``F*h*w``
    latent tokens), at least one token per SP rank. A token count that does not divide by the
    SP degree is served exactly by uneven chunks (the native backend's all-to-all takes
    per-rank sizes, so no padded token ever enters attention); the ``xfuser`` backend needs
    equal chunks and raises instead.
    """
    split = config.sp_degree * config.tp_degree
    if num_heads % split:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be divisible by ulysses_degree x tensor_parallel_degree "
            f"({config.sp_degree} x {config.tp_degree} = {split}); choose degrees whose product divides "
            f"{num_heads}")
    if world_size != config.world_size:
        raise ValueError(
            f"world size ({world_size}) must equal ulysses_degree x tensor_parallel_degree x cfg degree "
            f"({config.sp_degree} x {config.tp_degree} x {config.cfg_degree} = {config.world_size}); "
            f"launch with `torchrun --nproc_per_node {config.world_size}` or change the degrees")
    tokens: List[int] = []
    uneven = False
    if token_count is not None:
        if token_count < config.sp_degree:
            raise ValueError(f"token count ({token_count}) is smaller than ulysses_degree ({config.sp_degree}): "
                             "every sequence-parallel rank needs at least one token")
        tokens = chunk_lengths(token_count, config.sp_degree)
        uneven = token_count % config.sp_degree != 0
        if uneven and config.sp_backend == "xfuser":
            raise ValueError(
                f"token count ({token_count}) must be divisible by ulysses_degree ({config.sp_degree}) with the "
                "xfuser backend; use backend 'native' (uneven chunks, exact) or another frame/size")
        if uneven:
            logger.info("token count %d is not divisible by ulysses_degree %d: uneven chunks %s",
                        token_count, config.sp_degree, tokens)
    return SequencePlan(num_heads // split, tokens, uneven)


def chunk_lengths(length: int, parts: int) -> List[int]:
    """Balanced contiguous chunk lengths: the first ``length % parts`` chunks get one more.

    Equals ``torch.chunk`` (the reference) whenever ``parts`` divides ``length``.
    """
    base, extra = divmod(length, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


# ----------------------------------------------------------------------------------------
# Environment and process groups
# ----------------------------------------------------------------------------------------

class LaunchEnv(NamedTuple):
    rank: int
    local_rank: int
    world_size: int


def read_env() -> LaunchEnv:
    """``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` as set by torchrun (defaults 0, 0, 1)."""
    def get(name, default):
        raw = os.environ.get(name, str(default))
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None

    env = LaunchEnv(get("RANK", 0), get("LOCAL_RANK", 0), get("WORLD_SIZE", 1))
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"RANK ({env.rank}) must be in [0, WORLD_SIZE={env.world_size})")
    return env


def device_for(local_rank: int) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    if accelerator().is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class ParallelState:
    """This rank's place in the layout, its device and its SP/TP/CFG process groups.

    A group is ``None`` when its degree is 1 (nothing to communicate). Build with
    :meth:`from_env` (multi-rank) or :meth:`single` (no ``torch.distributed``).
    """

    config: ParallelConfig = field(default_factory=ParallelConfig)
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sp_group: Optional["dist.ProcessGroup"] = None
    tp_group: Optional["dist.ProcessGroup"] = None
    cfg_group: Optional["dist.ProcessGroup"] = None
    owns_process_group: bool = False

    @classmethod
    def single(cls, config: Optional[ParallelConfig] = None,
               device: Optional[Union[str, torch.device]] = None) -> "ParallelState":
        """Size-1 state; works without ``torch.distributed``."""
        config = config or ParallelConfig()
        if config.world_size != 1:
            raise ValueError(f"ParallelState.single needs all degrees = 1, got world size {config.world_size}")
        return cls(config=config, device=torch.device(device) if device is not None else device_for(0))

    @classmethod
    def from_env(cls, config: Optional[ParallelConfig] = None, *, backend: Optional[str] = None,
                 timeout: Optional[timedelta] = None) -> "ParallelState":
        """Read the launch variables once, init the default process group and build the groups.

        The process-group backend is NCCL on CUDA and gloo on CPU unless ``backend`` says
        otherwise; an already initialised default group is reused (its size must match).
        Collective: every rank must call this with the same ``config``.
        """
        config = config or ParallelConfig()
        env = read_env()
        if env.world_size != config.world_size:
            raise ValueError(
                f"WORLD_SIZE ({env.world_size}) must equal ulysses_degree x tensor_parallel_degree x cfg degree "
                f"({config.sp_degree} x {config.tp_degree} x {config.cfg_degree} = {config.world_size})")
        device = device_for(env.local_rank)
        if env.world_size == 1 and not (dist.is_available() and dist.is_initialized()):
            return cls(config=config, rank=0, local_rank=env.local_rank, world_size=1, device=device)

        if not dist.is_available():
            raise RuntimeError("this torch build has no torch.distributed; multi-rank runs are impossible")
        owns = False
        if device.type == "cuda":
            accelerator().set_device(device)
        if not dist.is_initialized():
            backend = backend or (accelerator().process_group_backend() if device.type == "cuda" else "gloo")
            kwargs = {"timeout": timeout} if timeout is not None else {}
            dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kwargs)
            owns = True
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise RuntimeError(f"the initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                               f"does not match RANK={env.rank}, WORLD_SIZE={env.world_size}")

        # every rank creates every group, in the same order (new_group is collective)
        mine = {}
        for kind, lists in group_ranks(config).items():
            for ranks in lists:
                if len(ranks) == 1:
                    continue
                group = dist.new_group(ranks)
                if env.rank in ranks:
                    mine[kind] = group
        state = cls(config=config, rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
                    device=device, sp_group=mine.get("sp"), tp_group=mine.get("tp"), cfg_group=mine.get("cfg"),
                    owns_process_group=owns)
        logger.info("rank %d/%d on %s: cfg %d, sp %d, tp %d", state.rank, state.world_size, device,
                    state.cfg_rank, state.sp_rank, state.tp_rank)
        return state

    # ------------------------------------------------------------------------------------
    @property
    def cfg_rank(self) -> int:
        return coordinates(self.rank, self.config)[0]

    @property
    def sp_rank(self) -> int:
        return coordinates(self.rank, self.config)[1]

    @property
    def tp_rank(self) -> int:
        return coordinates(self.rank, self.config)[2]

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only rank that decodes and writes outputs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op at size 1)."""
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def destroy(self) -> None:
        """Tear down the default process group if :meth:`from_env` created it."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False
