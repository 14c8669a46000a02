"""Safetensors checkpoints: find files, validate them, stream them into meta-built models.

The loaders here never hold two copies of a model: the module is built on the ``meta``
device, then every tensor of every shard is read one at a time (``safe_open``), cast to the
target dtype, moved to the target device and assigned in place of the meta parameter.
Peak host memory is therefore about one tensor plus the model itself.

All key problems (missing, unexpected, wrong shape) are collected over all shards and
reported together in one :class:`CheckpointKeyError`.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec"


class CheckpointError(RuntimeError):
    """Base class for every checkpoint problem reported by stepvideo."""


class CorruptCheckpointError(CheckpointError):
    """A weight file is a git-lfs pointer, truncated, or not a safetensors file."""


class CheckpointKeyError(CheckpointError):
    """The checkpoint's tensors do not match the model's parameters."""

    def __init__(self, where: str, missing: Sequence[str], unexpected: Sequence[str],
                 mismatched: Sequence[Tuple[str, tuple, tuple]]):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [f"checkpoint {where} does not match the model:"]
        if self.missing:
            lines.append(f"  missing tensors ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"  unexpected tensors ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for name, got, want in self.mismatched:
            lines.append(f"  shape mismatch for {name}: checkpoint {list(got)}, model {list(want)}")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------
# Finding and validating files
# ----------------------------------------------------------------------------------------

def find_weight_files(folder: os.PathLike, weights_name: str) -> List[Path]:
    """Return the safetensors files of one component, in shard order.

    Looks for ``<weights_name>.safetensors.index.json`` (sharded) first, then
    ``<weights_name>.safetensors`` (single file), then a folder holding exactly one
    ``*.safetensors`` file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    index = folder / f"{weights_name}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CorruptCheckpointError(f"{index} is not a valid safetensors index ({err})") from err
        names: List[str] = []
        for shard in weight_map.values():
            if shard not in names:
                names.append(shard)
        names.sort()
        files = [folder / n for n in names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {', '.join(absent)}")
        return files
    single = folder / f"{weights_name}.safetensors"
    if single.is_file():
        return [single]
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {index.name}, {single.name} or a single *.safetensors file"
        + (f" (found {len(candidates)} candidates: {', '.join(c.name for c in candidates)})" if candidates else "")
    )


def check_safetensors_file(path: os.PathLike) -> Dict[str, dict]:
    """Validate a safetensors file without reading its tensors; return its header.

    Raises :class:`CorruptCheckpointError` for git-lfs pointer files (the weights were never
    downloaded), truncated files and files that are not safetensors at all.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head.startswith(LFS_POINTER_PREFIX[:8]) and (head + fh.read(64)).startswith(LFS_POINTER_PREFIX):
            raise CorruptCheckpointError(
                f"{path} is a git-lfs pointer file, not the weights: the large files were not downloaded. "
                "Run `git lfs pull` in the checkpoint repository or download it with huggingface_hub."
            )
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 0 or 8 + header_len > size:
            raise CorruptCheckpointError(
                f"{path} is truncated or not a safetensors file: header claims {header_len} bytes, "
                f"file has {size} bytes")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as err:
            raise CorruptCheckpointError(f"{path} has an unreadable safetensors header ({err})") from err
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CorruptCheckpointError(
            f"{path} is truncated: tensors need {8 + header_len + data_end} bytes, the file has {size}. "
            "Download it again.")
    return header


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


def iter_safetensors(path: os.PathLike) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` pairs of one file, one tensor in memory at a time (CPU).

    Under an active ``FakeTensorMode`` (``benchmark/rehearse.py``) the tensors are shape-only,
    made from the file's header; no data is read."""
    from safetensors import safe_open
    from torch._guards import detect_fake_mode

    header = check_safetensors_file(path)
    if detect_fake_mode() is not None:
        for key, entry in header.items():
            if key != "__metadata__":
                yield key, torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        return
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        for key in fh.keys():
            yield key, fh.get_tensor(key)


# ----------------------------------------------------------------------------------------
# Streaming into a meta model
# ----------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What :func:`load_into_model` did."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)


def _named_tensors(model: nn.Module) -> Dict[str, Tuple[nn.Module, str, bool]]:
    """Map state-dict key -> (owning module, attribute name, is_parameter)."""
    out: Dict[str, Tuple[nn.Module, str, bool]] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in module._parameters.items():
            if p is not None:
                out[prefix + name] = (module, name, True)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                out[prefix + name] = (module, name, False)
    return out


def _convert(t: torch.Tensor, dtype: Optional[torch.dtype], device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def load_state_into_model(
    model: nn.Module,
    tensors: Iterable[Tuple[str, torch.Tensor]],
    *,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
    rename: Optional[Callable[[str], str]] = None,
    strict: bool = True,
    where: str = "state dict",
    keep_dtype: Collection[str] = (),
) -> LoadReport:
    """Assign ``tensors`` to the parameters/buffers of ``model`` (which may live on ``meta``).

    Floating tensors are cast to ``dtype`` (``None`` keeps the stored dtype) and moved to
    ``device`` one at a time; the names in ``keep_dtype`` (after ``rename``) keep their stored
    dtype (fp8 weights and their fp32 scales). Problems are collected; with ``strict`` they raise one
    :class:`CheckpointKeyError` at the end, and floating parameters that stay on ``meta`` are
    reported as missing.
    """
    targets = _named_tensors(model)
    report = LoadReport()
    seen = set()
    for key, tensor in tensors:
        name = rename(key) if rename is not None else key
        if name not in targets:
            report.unexpected.append(key)
            continue
        module, attr, is_param = targets[name]
        current = getattr(module, attr)
        if tuple(current.shape) != tuple(tensor.shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(current.shape)))
            seen.add(name)   # present, but wrong: reported as mismatched, not missing
            continue
        value = _convert(tensor, None if name in keep_dtype else dtype, device)
        if is_param:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
        seen.add(name)
        report.loaded.append(name)
    report.missing = [k for k in targets if k not in seen]
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointKeyError(where, report.missing, report.unexpected, report.mismatched)
    return report


def load_files_into_model(
    model: nn.Module,
    files: Sequence[os.PathLike],
    *,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
    rename: Optional[Callable[[str], str]] = None,
    strict: bool = True,
    progress: bool = False,
) -> LoadReport:
    """Stream every tensor of ``files`` (safetensors shards) into ``model``; see
    :func:`load_state_into_model`. Every file is validated before anything is read."""
    files = [Path(f) for f in files]
    for f in files:
        check_safetensors_file(f)

    def tensors():
        iterator = files
        if progress and len(files) > 1:
            from tqdm.auto import tqdm
            iterator = tqdm(files, desc="loading shards", unit="shard")
        for f in iterator:
            yield from iter_safetensors(f)

    where = str(files[0].parent) if files else "(no files)"
    return load_state_into_model(model, tensors(), dtype=dtype, device=device, rename=rename,
                                 strict=strict, where=where)


def assert_materialized(model: nn.Module, what: str) -> None:
    """Raise if any parameter or buffer of ``model`` is still on the meta device."""
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: tensors left uninitialised on the meta device: {', '.join(left)}")


# ----------------------------------------------------------------------------------------
# Writing (tiny-model factory, conversions)
# ----------------------------------------------------------------------------------------

def save_sharded(state_dict: Mapping[str, torch.Tensor], folder: os.PathLike, weights_name: str,
                 num_shards: int = 1) -> List[Path]:
    """Write ``state_dict`` in the Hugging Face layout used by the official checkpoints.

    ``num_shards == 1`` writes ``<weights_name>.safetensors``; more writes
    ``<weights_name>-0000k-of-0000n.safetensors`` plus ``<weights_name>.safetensors.index.json``.
    Keys keep their insertion order and are split into contiguous groups of equal key count.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = [(k, v.detach().contiguous().cpu()) for k, v in state_dict.items()]
    if num_shards <= 1:
        path = folder / f"{weights_name}.safetensors"
        save_file(dict(items), str(path), metadata={"format": "pt"})
        return [path]
    num_shards = min(num_shards, len(items))
    total = sum(v.numel() * v.element_size() for _, v in items)
    # contiguous groups of (almost) equal key count; deterministic and never empty
    base, extra = divmod(len(items), num_shards)
    groups: List[List[Tuple[str, torch.Tensor]]] = []
    start = 0
    for i in range(num_shards):
        stop = start + base + (1 if i < extra else 0)
        groups.append(items[start:stop])
        start = stop
    n = len(groups)
    weight_map = {}
    paths = []
    for i, group in enumerate(groups, start=1):
        name = f"{weights_name}-{i:05d}-of-{n:05d}.safetensors"
        save_file(dict(group), str(folder / name), metadata={"format": "pt"})
        paths.append(folder / name)
        weight_map.update({k: name for k, _ in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------

def read_json(path: os.PathLike) -> dict:
    """Read a JSON config file with an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def constructor_kwargs(cls, config: Mapping) -> dict:
    """Keep the entries of ``config`` that ``cls.__init__`` accepts (unknown keys are ignored,
    as the official configs carry diffusers/transformers bookkeeping such as ``_class_name``)."""
    params = inspect.signature(cls.__init__).parameters
    accepted = {n for n, p in params.items() if n != "self" and p.kind in
                (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    ignored = sorted(k for k in config if k not in accepted)
    if ignored:
        logger.debug("%s: ignoring config keys %s", cls.__name__, ignored)
    return {k: v for k, v in config.items() if k in accepted}


DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def parse_dtype(value) -> torch.dtype:
    """Accept a torch dtype or one of ``bf16/fp16/fp32`` (and long names)."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "").lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of bf16, fp16, fp32")
    return DTYPES[key]
