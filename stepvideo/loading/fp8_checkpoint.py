"""fp8 DiT checkpoints written by ``python -m stepvideo.quantize``: their layout, and loading them.

An fp8 model folder is the official layout (:mod:`stepvideo.loading.layout`) with the DiT's
block linears (every plain ``nn.Linear`` in ``transformer_blocks``, :func:`stepvideo.fp8_linear.block_linears`)
stored quantised, sharded like the source. ``transformer/config.json`` carries a ``quantization``
record (:func:`quantization_record`); without one a folder is bf16 and loads as before.

Tensor layouts, per quantised linear ``L`` with ``weight [out, in]``:

========== ================================= =====================================================
format     weight                            scale
========== ================================= =====================================================
stepvideo  ``L.weight`` float8_e4m3fn        ``L.weight_scale`` float32 ``[out]``
           ``[out, in]``                     (the :class:`~stepvideo.fp8_linear.FP8Linear` buffers)
comfy      ``L.weight`` float8_e4m3fn        ``L.scale_weight`` float32 ``[out, 1]``, plus one
           ``[out, in]``                     marker tensor ``scaled_fp8`` (float8_e4m3fn ``[0]``)
========== ================================= =====================================================

In both, ``weight ~= q.float() * scale`` row by row, with the numbers of
:func:`stepvideo.fp8_linear.quantize_weight`: loading gives bit for bit the model that
``--fp8`` / the 48g profile builds by quantising the source at load time. The ``comfy`` names
are those of ComfyUI's "scaled fp8" checkpoints (see docs/performance.md for the loader version).

Loading (:func:`load_fp8_into_model`) checks the safetensors headers first (every quantised
weight is fp8, every scale present, float32, of the right shape), then streams the tensors
as stored onto the device (no host quantisation) and checks every scale's values (finite,
positive) as it arrives; all of that happens inside ``from_pretrained``, before any step.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..fp8_linear import FP8, install_fp8_shells
from . import checkpoint as ckpt
from . import layout

logger = logging.getLogger(__name__)

CONFIG_KEY = "quantization"
METHOD = "fp8_e4m3fn"
SCALE_LAYOUT = "per_output_channel"
FORMATS = ("stepvideo", "comfy")
SCALE_SUFFIX = {"stepvideo": ".weight_scale", "comfy": ".scale_weight"}
COMFY_MARKER = "scaled_fp8"
# present in a folder while ``stepvideo.quantize`` is still writing it; a loader refuses such a folder
INCOMPLETE_MARKER = ".stepvideo-quantize-incomplete"
SAFETENSORS_DTYPES = {"F8_E4M3": FP8, "F32": torch.float32}


class FP8CheckpointError(ckpt.CheckpointError):
    """An fp8 checkpoint is incomplete, corrupt, or used where bf16 weights are needed."""


def quantization_record(config: Mapping) -> Optional[dict]:
    """The ``quantization`` record of a ``transformer/config.json`` (None: a bf16 checkpoint)."""
    record = config.get(CONFIG_KEY)
    return dict(record) if isinstance(record, Mapping) else None


def is_fp8_config(config: Mapping) -> bool:
    return quantization_record(config) is not None


def scale_key(linear: str, fmt: str) -> str:
    """The scale tensor's key of the block linear ``linear`` in format ``fmt``."""
    return linear + SCALE_SUFFIX[fmt]


def _record_format(record: Mapping, folder: Path) -> str:
    fmt = record.get("format")
    if record.get("method") != METHOD or record.get("scale_layout") != SCALE_LAYOUT or fmt not in FORMATS:
        raise FP8CheckpointError(
            f"{folder}: unsupported quantization record in {layout.TRANSFORMER_CONFIG} "
            f"(method {record.get('method')!r}, scale layout {record.get('scale_layout')!r}, format {fmt!r}); "
            f"this stepvideo reads method {METHOD}, scale layout {SCALE_LAYOUT}, formats {', '.join(FORMATS)}")
    return fmt


def check_complete(folder: Path) -> None:
    """Refuse a folder an interrupted ``stepvideo.quantize`` left behind."""
    for parent in (folder, folder.parent):
        if (parent / INCOMPLETE_MARKER).exists():
            raise FP8CheckpointError(
                f"{parent} is an unfinished `python -m stepvideo.quantize` output (the run was interrupted): "
                "delete it and run the quantiser again")


def refuse(config: Mapping, folder, needs: str,
           instead: str = "use --memory_profile 48g (or none) with this folder") -> None:
    """Raise one clear line when ``folder`` holds fp8 weights and ``needs`` (what the run does)
    needs bf16 ones; the line names the folder and the ways out (``instead``, or the bf16 folder)."""
    record = quantization_record(config)
    if record is None:
        return
    source = record.get("source", {}).get("model_dir")
    where = f"the bf16 checkpoint it was made from ({source})" if source else "the bf16 checkpoint"
    raise FP8CheckpointError(
        f"{folder} holds fp8 DiT weights (written by python -m stepvideo.quantize), but {needs} needs bf16 "
        f"weights: {instead}, or point --model_dir at {where}")


def check_memory_profile(config: Mapping, folder, requested: str, dit_fp8: bool) -> None:
    """An fp8 folder under an explicitly chosen profile whose DiT is bf16 (141g, 80g, 24g) is
    refused before any weight is read; ``auto``, ``none`` and 48g take it as it is."""
    if requested not in ("auto", "none") and not dit_fp8:
        refuse(config, folder, f"--memory_profile {requested} (a bf16 DiT)")


def _header_problems(headers: Dict[str, dict], linears: Sequence[str], shapes: Mapping[str, Tuple[int, int]],
                     fmt: str) -> List[str]:
    problems = []
    for name in linears:
        weight = headers.get(name + ".weight")
        if weight is None:
            problems.append(f"{name}.weight is missing")
        elif weight["dtype"] != "F8_E4M3":
            problems.append(f"{name}.weight is {weight['dtype']}, not F8_E4M3")
        key = scale_key(name, fmt)
        scale = headers.get(key)
        out = shapes[name][0]
        want = [out] if fmt == "stepvideo" else [out, 1]
        if scale is None:
            problems.append(f"{key} (the scale of {name}) is missing")
        elif scale["dtype"] != "F32" or list(scale["shape"]) != want:
            problems.append(f"{key} is {scale['dtype']} {scale['shape']}, expected F32 {want}")
    return problems


def check_headers(folder: Path, files: Sequence[Path], model: nn.Module, linears: Sequence[str], fmt: str) -> None:
    """Every quantised weight fp8 and every scale present with the right dtype and shape, from
    the safetensors headers alone (nothing is read yet)."""
    headers: Dict[str, dict] = {}
    for f in files:
        headers.update({k: v for k, v in ckpt.check_safetensors_file(f).items() if k != "__metadata__"})
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in linears}
    problems = _header_problems(headers, linears, shapes, fmt)
    if fmt == "comfy" and COMFY_MARKER not in headers:
        problems.append(f"the {COMFY_MARKER!r} marker tensor is missing")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise FP8CheckpointError(f"fp8 checkpoint {folder} is incomplete or corrupt: {shown}. "
                                 "Write it again with python -m stepvideo.quantize")


def _checked_scale(key: str, scale: torch.Tensor, folder: Path) -> torch.Tensor:
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        raise FP8CheckpointError(
            f"fp8 checkpoint {folder} is corrupt: {key} has {int(bad.sum())} non-finite or non-positive "
            "values. Write it again with python -m stepvideo.quantize")
    return scale


def stored_tensors(files: Sequence[Path], fmt: str, folder: Path) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(model key, tensor)`` of every shard, one tensor at a time: comfy names become the
    :class:`FP8Linear` ones (``scale_weight [out, 1]`` -> ``weight_scale [out]``, marker
    dropped); every scale is checked."""
    suffix = SCALE_SUFFIX[fmt]
    for f in files:
        for key, tensor in ckpt.iter_safetensors(f):
            if fmt == "comfy" and key == COMFY_MARKER:
                continue
            if key.endswith(suffix):
                tensor = _checked_scale(key, tensor, folder)
                key = key[: -len(suffix)] + SCALE_SUFFIX["stepvideo"]
                tensor = tensor.reshape(-1)
            yield key, tensor


def load_fp8_into_model(model: nn.Module, folder: Path, config: Mapping, files: Sequence[Path], *,
                        dtype: Optional[torch.dtype], device, progress: bool = False) -> List[str]:
    """Fill a ``meta``-built ``StepVideoModel`` from an fp8 folder: block linears become
    :class:`FP8Linear` with the stored fp8 weights and fp32 scales (moved to ``device`` as they
    are), every other tensor is cast to ``dtype`` as usual. Returns the quantised linears' names."""
    folder = Path(folder)
    check_complete(folder)
    record = quantization_record(config)
    fmt = _record_format(record, folder)
    linears = install_fp8_shells(model)
    if record.get("linears") is not None and int(record["linears"]) != len(linears):
        raise FP8CheckpointError(f"fp8 checkpoint {folder} quantised {record['linears']} block linears, this "
                                 f"model has {len(linears)}: it was written for another model")
    check_headers(folder, files, model, linears, fmt)
    source = record.get("quantized_from_dtype")
    if source == "F32" and dtype in (torch.bfloat16, torch.float16):
        logger.warning("fp8: %s was quantised from fp32 weights; load-time quantisation at %s would round them "
                       "to %s first, so the numbers differ from --fp8 on the source folder", folder, dtype, dtype)
    keep = {n + ".weight" for n in linears} | {n + SCALE_SUFFIX["stepvideo"] for n in linears}
    tensors: Iterable = stored_tensors(files, fmt, folder)
    if progress and len(files) > 1:
        from tqdm.auto import tqdm      # optional progress bar, as in checkpoint.load_files_into_model
        tensors = tqdm(tensors, desc="loading fp8 tensors", unit="tensor")
    ckpt.load_state_into_model(model, tensors, dtype=dtype, device=device, strict=True, where=str(folder),
                               keep_dtype=keep)
    logger.info("fp8: loaded %d block linears as stored (%s format) from %s", len(linears), fmt, folder)
    return linears


def resident_bytes(folder: os.PathLike) -> Dict[str, int]:
    """DiT tensor bytes of a ``transformer/`` folder by stored dtype, from the headers alone:
    what the weights occupy once loaded as stored (fp8 folder) or cast (bf16 folder)."""
    folder = Path(folder)
    if not (folder / layout.TRANSFORMER_CONFIG).is_file() and (folder / layout.TRANSFORMER_DIR).is_dir():
        folder = folder / layout.TRANSFORMER_DIR
    sizes: Dict[str, int] = {}
    for f in ckpt.find_weight_files(folder, layout.TRANSFORMER_WEIGHTS):
        for key, info in ckpt.check_safetensors_file(f).items():
            if key != "__metadata__":
                start, stop = info["data_offsets"]
                sizes[info["dtype"]] = sizes.get(info["dtype"], 0) + stop - start
    return sizes
