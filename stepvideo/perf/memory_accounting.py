"""Peak device memory of full-size work, measured on CPU without allocating it.

Every figure here comes from running the real modules (``StepVideoModel``, ``Step1Model``, the
HunyuanCLIP BERT, ``AutoencoderKL``) at the real widths and sizes under
``torch._subclasses.FakeTensorMode`` (tensors carry shapes, dtypes and storages, but no data)
with ``torch.distributed._tools.mem_tracker.MemTracker`` recording every storage's lifetime.
The peak is the largest sum of live storages, weights and inputs included. Nothing is allocated:
``allow_fallback_kernels=False`` makes an op without a shape-only implementation fail instead of
running for real, and ``torch._scaled_mm`` (whose fake implementation would run the real kernel)
is replaced by its output allocation (:class:`_ShapeOnlyScaledMM`).

What the CPU trace does and does not contain, and how each part is accounted
    * Attention: on fake CPU tensors SDPA dispatches to ``_scaled_dot_product_flash_attention_for_cpu``,
      which allocates the output ``[B, N, L, Dh]`` and an fp32 log-sum-exp ``[B, N, L]``, the same
      as flash-attention 2/3 and cuDNN on the GPU (no ``L x L`` scores). :func:`attention_kernels`
      checks that no math-path softmax ran. The memory-efficient kernel's (padded) log-sum-exp is
      within 0.01% of it.
    * Sequence parallelism: the real :class:`~stepvideo.parallel.ulysses.UlyssesSequence` code runs
      with its two collectives replaced by no-ops (:func:`accounting_sequence`), so its send /
      receive buffers are traced exactly; rank 0 holds the largest token chunk.
    * Tensor parallelism: the block linears get their shard shapes (:func:`shard_blocks`); the
      row-parallel all-reduce is in place on NCCL and adds nothing.
    * CFG parallelism: each rank runs batch 1 (the gathered output, latent-sized, is traced too
      small to matter: 11 MiB at full size).
    * FP8: the chunked quantisation of :mod:`stepvideo.fp8_linear` runs as on the GPU
      (``FP8Linear.scaled_mm = True``).
    * Block offload: device-resident weights are the non-block weights plus two blocks (the one
      running and the one being prefetched); activations are those of the resident run. This is
      exact for the lifetime structure of :mod:`stepvideo.perf.offload` (derived, stated as such).
    * Outside PyTorch's allocator (stated constants, checked by ``scripts/gpu_check.sh``):
      :data:`CUDA_CONTEXT_BYTES`, :data:`CUDA_WORKSPACE_BYTES`, :data:`NCCL_BYTES` (only with more
      than one rank) and :data:`ALLOCATOR_RESERVE` (fraction of the allocated peak the caching
      allocator keeps as fragmentation).

Everything returns bytes; :data:`GIB` converts.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from ..fp8_linear import FP8, FP8Linear, block_linears
from ..models import rope
from ..models.dit import StepVideoModel
from ..models.token_chunks import set_token_chunk
from ..models.vae import AutoencoderKL
from ..parallel.tensor import TensorParallelPlan
from ..parallel.ulysses import UlyssesSequence
from ..text_encoders.step_llm import Step1Config, Step1Model

GIB = 1024 ** 3
MIB = 1024 ** 2

# ---- stated constants (not measurable on CPU) -----------------------------------------------
CUDA_CONTEXT_BYTES = int(0.6 * GIB)     # CUDA context + kernels images, outside the allocator (H100, CUDA 12)
CUDA_WORKSPACE_BYTES = 64 * MIB         # cuBLAS / cuBLASLt workspaces of the default and one side stream
NCCL_BYTES = int(0.5 * GIB)             # NCCL communicator buffers, only with more than one rank
ALLOCATOR_RESERVE = 0.03                # caching-allocator fragmentation, fraction of the allocated peak

T2V_TEXT_TOKENS = 320                   # Step-LLM tokens per prompt
CLIP_TOKENS = 77


def overhead_bytes(allocated_peak: float, world_size: int = 1) -> float:
    """Device bytes beyond the allocated peak: context, workspaces, NCCL, allocator reserve."""
    return (CUDA_CONTEXT_BYTES + CUDA_WORKSPACE_BYTES + (NCCL_BYTES if world_size > 1 else 0)
            + ALLOCATOR_RESERVE * allocated_peak)


# ---------------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------------
class _ShapeOnlyScaledMM(torch.utils._python_dispatch.TorchDispatchMode):
    """Answers ``aten._scaled_mm`` with its output allocation (the fake kernel would run the op)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten._scaled_mm:
            out = kwargs.get("out")
            if out is not None:
                return out
            a, b = args[0], args[1]
            dtype = kwargs.get("out_dtype") or (args[6] if len(args) > 6 and args[6] is not None else a.dtype)
            return torch.empty((a.shape[0], b.shape[1]), dtype=dtype, device=a.device)
        return func(*args, **kwargs)


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the names of the attention ops that ran (see :func:`attention_kernels`)."""

    def __init__(self):
        super().__init__()
        self.ops: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if "attention" in name or "softmax" in name:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_mode() -> Iterator[None]:
    """Shape-only tensors on CPU, inference mode; ops without a shape implementation raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # rope keeps a module-level cache of small index tensors: give the trace its own (fake)
    # entries and put the real ones back afterwards, so no fake tensor leaks into real runs
    saved = dict(rope._PARTNERS)
    rope._PARTNERS.clear()
    try:
        with FakeTensorMode(allow_fallback_kernels=False), _ShapeOnlyScaledMM(), torch.no_grad():
            yield
    finally:
        rope._PARTNERS.clear()
        rope._PARTNERS.update(saved)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (``.to()`` cannot swap fake parameters)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@dataclass
class Trace:
    """Result of :func:`trace_peak`: bytes live before, at the peak, after; attention ops seen."""

    before: int
    peak: int
    after: int
    ops: Dict[str, int] = field(default_factory=dict)

    @property
    def transient(self) -> int:
        return self.peak - self.before


def _total(snapshot: dict) -> int:
    return sum(dev.get("Total", 0) for dev in snapshot.values())


def _storage_tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class StorageTracker(MemTracker):
        """MemTracker without its per-module statistics (which refuse modules called twice, as
        the VAE's are, and hook every parameter for gradients): storages only, which is all the
        peak needs. Parameters are registered through ``track_external``."""

        def _pre_fw_hook(self, module, inputs) -> None:
            return None

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            return None

    return StorageTracker


def _StorageTracker():
    return _storage_tracker_class()()


def trace_peak(fn: Callable[[], object], *external) -> Tuple[Trace, object]:
    """Run ``fn()`` under a MemTracker; ``external`` (modules, tensors) count from the start.

    Works on fake and on real tensors (the real mode is what the CPU calibration test compares
    against the process's resident memory).
    """
    external = [e for e in external if e is not None]
    tracker = _StorageTracker()
    recorder = _OpRecorder()
    tracker.track_external(*external)
    with tracker, torch.no_grad():
        before = _total(tracker.get_tracker_snapshot("current"))
        with recorder:
            result = fn()
        after = _total(tracker.get_tracker_snapshot("current"))
    peak = max(_total(tracker.get_tracker_snapshot("peak")), before, after)
    return Trace(before, peak, after, recorder.ops), result


def attention_kernels(trace: Trace) -> str:
    """Which attention allocation the trace used; raises if the math path (L x L scores) ran."""
    if any(name.startswith("_softmax") or name == "softmax" for name in trace.ops) and not trace.ops.get(
            "_scaled_dot_product_flash_attention_for_cpu"):
        raise RuntimeError(f"attention ran the math path (L x L scores) in the memory trace: {trace.ops}")
    return "flash-equivalent (output + fp32 log-sum-exp)"


def module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage()._cdata if hasattr(t, "untyped_storage") else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# the DiT
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoShape:
    """Pixel size of a generation; latent grid ``F x h x w`` and tokens follow."""

    height: int = 544
    width: int = 992
    num_frames: int = 204

    @property
    def latent(self) -> Tuple[int, int, int]:
        return self.num_frames // 17 * 3, self.height // 16, self.width // 16

    @property
    def tokens(self) -> int:
        f, h, w = self.latent
        return f * h * w

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.num_frames}"


@dataclass(frozen=True)
class DiTLayout:
    """One rank's share: Ulysses degree, tensor-parallel degree, CFG parallel (batch 1 per rank)."""

    sp: int = 1
    tp: int = 1
    cfg_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.sp * self.tp * (2 if self.cfg_parallel else 1)

    @property
    def batch(self) -> int:
        return 1 if self.cfg_parallel else 2

    def __str__(self) -> str:
        return f"SP{self.sp} TP{self.tp}" + (" CFG2" if self.cfg_parallel else "")


def accounting_sequence(world_size: int, rank: int = 0):
    """A :class:`UlyssesSequence` for rank ``rank`` of ``world_size`` without a process group: the
    real split / attention / gather code, collectives replaced by no-ops (the buffers are still
    allocated, so their lifetimes are traced)."""

    class AccountingSequence(UlyssesSequence):
        def __init__(self):                                   # no process group needed
            self.group = None
            self.world_size = world_size
            self.rank = rank
            self._lengths = None

        def _all_to_all(self, recv, send, *, output_split_sizes, input_split_sizes) -> None:
            return None

        def _all_gather(self, parts, x) -> None:
            return None

    return AccountingSequence()


def shard_blocks(model: nn.Module, tp: int) -> None:
    """Give every block linear its tensor-parallel shard shape (rank 0 of ``tp``)."""
    if tp == 1:
        return

    plan = TensorParallelPlan.of(model)                 # the model class's _tp_plan
    for name, old in list(model.named_modules()):
        style = plan.style(name)
        if style is None:
            continue
        parent_name, _, child = name.rpartition(".")
        out_f, in_f = old.out_features, old.in_features
        if style == "colwise":
            out_f //= tp
        else:
            in_f //= tp
        setattr(model.get_submodule(parent_name), child, nn.Linear(in_f, out_f, bias=old.bias is not None))


def fp8_blocks(model: nn.Module) -> None:
    """Replace the block linears by :class:`FP8Linear` with fp8 weights (shape-only, as
    ``quantize_blocks`` does), forcing the scaled-matmul path the GPU runs."""
    for _, module, child_name, child in block_linears(model):
        q = torch.empty(child.out_features, child.in_features, dtype=FP8)
        layer = FP8Linear(q, torch.empty(child.out_features, dtype=torch.float32), child.bias)
        layer.scaled_mm = True
        setattr(module, child_name, layer)


def build_dit(layers: int = 48, *, ti2v: bool = False, tp: int = 1, fp8: bool = False,
              dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The real-width DiT (inside :func:`fake_mode`)."""

    with default_dtype(dtype):
        model = StepVideoModel(num_layers=layers, use_additional_conditions=ti2v, attention_backend="sdpa")
        shard_blocks(model, tp)
    if fp8:
        fp8_blocks(model)
    return model.eval()


def block_bytes(model: nn.Module) -> int:
    return module_bytes(model.transformer_blocks[0])


@dataclass(frozen=True)
class DiTWeights:
    """Weight bytes of the real-width DiT (traced shapes, nothing allocated)."""

    other: int                # outside the blocks (bf16)
    block_bf16: int
    block_fp8: int
    largest: int              # the largest single tensor (bf16): the loader's one tensor in flight
    layers: int = 48

    @property
    def total_bf16(self) -> int:
        return self.other + self.layers * self.block_bf16


def dit_weights(ti2v: bool = False, layers: int = 48) -> DiTWeights:
    """Bytes of the DiT's parts in bf16 and with fp8 block linears (one block built, shape-only)."""
    with fake_mode():
        bf16 = build_dit(1, ti2v=ti2v)
        f8 = build_dit(1, ti2v=ti2v, fp8=True)
        block = block_bytes(bf16)
        largest = max(t.numel() * t.element_size() for t in bf16.state_dict().values())
        return DiTWeights(other=module_bytes(bf16) - block, block_bf16=block, block_fp8=block_bytes(f8),
                          largest=largest, layers=layers)


@dataclass
class StepMeasurement:
    """One denoising step (CFG batch) on one rank."""

    weights: int              # all DiT weights on this rank
    block: int                # one block's weights
    peak: int                 # allocated peak during the step, weights and inputs included
    attention: str


def measure_step(video: VideoShape = VideoShape(), layout: DiTLayout = DiTLayout(), *, fp8: bool = False,
                 ti2v: bool = False, layers: int = 1, total_layers: int = 48,
                 text_tokens: int = T2V_TEXT_TOKENS, token_chunk: Optional[int] = None) -> StepMeasurement:
    """Trace one CFG denoising step of the real DiT: latents, CFG input, forward, guidance, Euler.

    ``layers`` blocks are traced; the other ``total_layers - layers`` are added as weights. That
    is exact: all blocks are alive the whole step, each block's activations die before the next
    block's peak, and the blocks are identical (checked in tests/test_memory_accounting.py).
    The text is the longest possible (77 CLIP + 320 LLM tokens, no mask: the mask is bytes).
    ``token_chunk``: the blocks run token-chunked (:mod:`stepvideo.models.token_chunks`)."""
    if 48 % (layout.sp * layout.tp):
        raise ValueError(f"48 heads are not divisible by SP {layout.sp} x TP {layout.tp}")
    f, h, w = video.latent
    b = layout.batch
    with fake_mode():
        model = build_dit(layers, ti2v=ti2v, tp=layout.tp, fp8=fp8)
        set_token_chunk(model, token_chunk)
        if layout.sp > 1:
            model.set_sequence_parallel(accounting_sequence(layout.sp, 0))
        latents = torch.empty(1, f, 64, h, w, dtype=torch.bfloat16)
        y = torch.empty(b, text_tokens, 6144, dtype=torch.bfloat16)
        clip = torch.empty(b, CLIP_TOKENS, 1024, dtype=torch.bfloat16)
        condition = torch.empty(b, f, 64, h, w, dtype=torch.bfloat16) if ti2v else None

        def step():
            model_input = torch.cat([latents] * b)
            timestep = torch.empty(b, dtype=torch.bfloat16)
            extra = {"condition_hidden_states": condition, "motion_score": 5.0} if ti2v else {}
            out = model(hidden_states=model_input, timestep=timestep, encoder_hidden_states=y,
                        encoder_hidden_states_2=clip, encoder_attention_mask=None, return_dict=False, **extra)
            del model_input
            if b == 1:          # CFG parallel: the other half arrives by all-gather
                out = torch.cat([out, torch.empty_like(out)])
            cond, uncond = out.chunk(2)
            guided = uncond + 9.0 * (cond - uncond)
            del out, cond, uncond
            return latents.float() + 0.01 * guided.float()       # the Euler update in fp32

        trace, _ = trace_peak(step, model, latents, y, clip, condition)
        one_block = block_bytes(model)
        extra = one_block * (total_layers - layers)          # untraced blocks: weights only
        weights = module_bytes(model) + extra
    return StepMeasurement(weights=weights, block=one_block, peak=trace.peak + extra,
                           attention=attention_kernels(trace))


# ---------------------------------------------------------------------------------------------
# text encoders
# ---------------------------------------------------------------------------------------------
CLIP_BERT_CONFIG = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=47020, max_position_embeddings=512, type_vocab_size=2)
"""HunyuanCLIP's ``clip_text_encoder/config.json`` (BERT-large, Chinese vocabulary), as published
with HunyuanDiT; the checkpoint is not on this machine, so these values are stated."""


@dataclass
class EncodeMeasurement:
    llm_weights: int
    llm_layer: int            # one Step-LLM layer's weights (streaming unit)
    llm_other: int            # embedding (and anything outside the layers)
    clip_weights: int
    llm_peak: int             # Step-LLM forward, its weights included
    clip_peak: int            # CLIP forward, its weights included


def measure_encode(prompts: int = 2, text_tokens: int = T2V_TEXT_TOKENS) -> EncodeMeasurement:
    """Trace Step-LLM (real config, bf16) and HunyuanCLIP (BERT-large, fp32) on ``prompts`` prompts."""
    from transformers import BertConfig, BertModel

    config = Step1Config()
    with fake_mode():
        # one layer traced, the other 47 added as weights: every layer has the same lifetime
        # structure and only its output survives it (exact; see tests/test_memory_accounting.py)
        with default_dtype(torch.bfloat16):
            llm = Step1Model(Step1Config(**{**config.to_dict(), "num_layers": 1})).eval()
        ids = torch.zeros(prompts, text_tokens, dtype=torch.int64)
        llm_trace, _ = trace_peak(functools.partial(llm, ids), llm, ids)   # bound now: `llm` is deleted below
        layer = module_bytes(llm.transformer.layers[0])
        other = module_bytes(llm) - layer
        llm_weights = other + layer * config.num_layers
        llm_peak = llm_trace.peak + layer * (config.num_layers - 1)
        del llm
        with default_dtype(torch.float32):
            # pad_token_id=None and eager attention skip two data-dependent mask checks that fake
            # tensors cannot answer (the 77 x 77 scores are 0.7 MiB)
            config = BertConfig(**CLIP_BERT_CONFIG, pad_token_id=None)
            config._attn_implementation = "eager"
            bert = BertModel(config, add_pooling_layer=False).eval()
        clip_ids = torch.zeros(prompts, CLIP_TOKENS, dtype=torch.int64)
        # no attention mask: its [B, 1, 77, 77] form is a few KiB and the all-ones check is data-dependent
        clip_trace, _ = trace_peak(lambda: bert(clip_ids).last_hidden_state, bert, clip_ids)
        clip_weights = module_bytes(bert)
    return EncodeMeasurement(llm_weights=llm_weights, llm_layer=layer, llm_other=other, clip_weights=clip_weights,
                             llm_peak=llm_peak, clip_peak=clip_trace.peak)


# ---------------------------------------------------------------------------------------------
# the Video-VAE
# ---------------------------------------------------------------------------------------------
@dataclass
class DecodeMeasurement:
    weights: int
    peak: int                 # full decode: preallocated video + one chunk (or tile) in flight
    output: int               # the decoded video [1, T, 3, H, W]
    tile: Optional[int]


def measure_decode(video: VideoShape = VideoShape(), *, tile: Optional[int] = None, overlap: int = 8,
                   chunks: Optional[int] = None, dtype: torch.dtype = torch.bfloat16) -> DecodeMeasurement:
    """Trace ``AutoencoderKL.decode`` at the real widths on the latents of ``video``.

    ``chunks`` limits the traced latent chunks (each chunk's lifetime is identical and the output
    is preallocated, so one chunk gives the same peak as all of them)."""

    f, h, w = video.latent
    if chunks is not None:
        f = min(f, 3 * chunks)
    with fake_mode():
        with default_dtype(dtype):
            vae = AutoencoderKL().eval()
        if tile is not None:
            vae.enable_tiling(tile, overlap)
        z = torch.empty(1, f, 64, h, w, dtype=dtype)
        trace, out = trace_peak(lambda: vae.decode(z), vae, z)
        weights = module_bytes(vae)
        output = out.numel() * out.element_size()
        # the full video's output buffer is preallocated: add the frames a shortened trace skipped
        full = VideoShape(video.height, video.width, video.num_frames)
        full_out = 1 * (full.latent[0] // 3 * 17) * 3 * full.height * full.width * out.element_size()
    return DecodeMeasurement(weights=weights, peak=trace.peak + max(0, full_out - output), output=full_out, tile=tile)


def measure_encode_video(video: VideoShape = VideoShape(height=544, width=992, num_frames=1),
                         dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak of ``AutoencoderKL.encode`` (default: the TI2V first image, one frame), weights included."""

    with fake_mode():
        with default_dtype(dtype):
            vae = AutoencoderKL().eval()
        x = torch.empty(1, video.num_frames, 3, video.height, video.width, dtype=dtype)
        trace, _ = trace_peak(lambda: vae.encode_mean(x), vae, x)
    return trace.peak


def linear_peaks(tokens: int, k: int, n: int) -> Tuple[Trace, Trace]:
    """Traces of one ``k -> n`` block linear on a bf16 input ``[2, tokens, k]`` (CFG batch 2):
    ``(bf16 F.linear, FP8Linear with scaled matmul)``; inputs and weights included."""

    with fake_mode():
        x = torch.empty(2, tokens, k, dtype=torch.bfloat16)
        with default_dtype(torch.bfloat16):
            linear = nn.Linear(k, n, bias=False)
        q = FP8Linear(torch.empty(n, k, dtype=FP8), torch.empty(n))
        q.scaled_mm = True
        bf16, _ = trace_peak(lambda: linear(x), linear, x)
        f8, _ = trace_peak(lambda: q(x), q, x)
    return bf16, f8


def gib(x: float) -> float:
    return x / GIB


def ceil_gib(x: float, digits: int = 1) -> float:
    scale = 10 ** digits
    return math.ceil(x / GIB * scale) / scale
