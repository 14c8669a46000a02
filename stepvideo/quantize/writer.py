"""Write an fp8 copy of a model folder, shard by shard, atomically.

The DiT's block linears are quantised with :func:`stepvideo.fp8_linear.quantize_weight` (the
numbers ``--fp8`` computes at load time) and written in the layout of
:mod:`stepvideo.loading.fp8_checkpoint`; every other file of the folder is hard-linked (or
copied / symlinked) unchanged. One source shard is read, quantised and written at a time, so
host memory stays at about one shard.

Atomic: everything goes into a hidden sibling ``.<OUT>.quantizing-<pid>`` holding the
:data:`~stepvideo.loading.fp8_checkpoint.INCOMPLETE_MARKER` file and, until the very end, no
``transformer/config.json``; only a finished folder is renamed to ``OUT``. A run killed midway
leaves the hidden folder, which no loader accepts and the next run removes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..loading import checkpoint as ckpt
from ..loading import fp8_checkpoint as fmt8
from ..loading import layout
from ..fp8_linear import FP8, block_linears, quantize_weight
from ..models.dit import StepVideoModel

logger = logging.getLogger(__name__)

LINK_MODES = ("hard", "symlink", "copy")
HASH_CHUNK = 16 * 2 ** 20


@dataclass
class QuantizeReport:
    """What :func:`quantize_model_dir` wrote and what it cost."""

    out_dir: Path
    linears: int
    source_bytes: int            # DiT shards read
    written_bytes: int           # DiT shards written
    seconds: float
    peak_rss_bytes: int          # this process's peak resident set (ru_maxrss)
    largest_shard_bytes: int


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Remove what killed runs for the same ``out`` left behind (their process is gone)."""
    for partial in out.parent.glob(f".{out.name}.quantizing-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s, left by an interrupted run", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _place(src: Path, dst: Path, link: str) -> str:
    """Put ``src`` at ``dst`` unchanged; returns how (a hard link falls back to a copy across
    file systems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "hard":
        try:
            os.link(src, dst)
            return "hard"
        except OSError:
            link = "copy"
    if link == "symlink":
        dst.symlink_to(src.resolve())
        return "symlink"
    shutil.copy2(src, dst)
    return "copy"


def _other_files(root: Path, transformer: Path, dit_files: List[Path]) -> List[Path]:
    """Every file under ``root`` but the DiT weights, their index and the DiT config."""
    skip = {f.resolve() for f in dit_files}
    skip |= {(transformer / f"{layout.TRANSFORMER_WEIGHTS}.safetensors.index.json").resolve(),
             (transformer / layout.TRANSFORMER_CONFIG).resolve()}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.resolve() not in skip
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _quantize_shard(src: Path, dst: Path, linears: set, fmt: str, first: bool,
                    advance: Callable[[int], None]) -> Dict[str, str]:
    """Read ``src`` one tensor at a time, quantise the block linears, write ``dst``; returns
    the shard's ``key -> file name`` map."""
    from safetensors.torch import save_file

    out: Dict[str, torch.Tensor] = {}
    if fmt == "comfy" and first:
        out[fmt8.COMFY_MARKER] = torch.empty(0, dtype=FP8)
    for key, tensor in ckpt.iter_safetensors(src):
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name in linears:
            q, scale = quantize_weight(tensor)
            out[key] = q
            out[fmt8.scale_key(name, fmt)] = scale if fmt == "stepvideo" else scale[:, None].contiguous()
        else:
            out[key] = tensor
        advance(tensor.numel() * tensor.element_size())
        del tensor
    save_file(out, str(dst), metadata={"format": "pt", "stepvideo_quantization": fmt8.METHOD})
    return {k: dst.name for k in out}


def quantize_model_dir(model_dir: os.PathLike, out_dir: os.PathLike, fmt: str = "stepvideo", *,
                       link: str = "hard", progress: bool = True) -> QuantizeReport:
    """Write ``out_dir``: ``model_dir`` with its DiT block linears in fp8 (format ``fmt``)."""

    if fmt not in fmt8.FORMATS:
        raise ValueError(f"--format must be one of {', '.join(fmt8.FORMATS)}, got {fmt!r}")
    if link not in LINK_MODES:
        raise ValueError(f"--link must be one of {', '.join(LINK_MODES)}, got {link!r}")
    root = Path(model_dir)
    transformer = root / layout.TRANSFORMER_DIR
    if not (transformer / layout.TRANSFORMER_CONFIG).is_file():
        raise FileNotFoundError(f"{root} is not a model folder: {transformer / layout.TRANSFORMER_CONFIG} is missing")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose another --out or delete it")
    if out.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"--out {out} is inside the model folder {root}: write it beside the folder")
    config = ckpt.read_json(transformer / layout.TRANSFORMER_CONFIG)
    if fmt8.is_fp8_config(config):
        raise ValueError(f"{root} is already an fp8 checkpoint (written by python -m stepvideo.quantize)")
    files = ckpt.find_weight_files(transformer, layout.TRANSFORMER_WEIGHTS)
    for f in files:
        ckpt.check_safetensors_file(f)
    with torch.device("meta"):
        model = StepVideoModel.from_config(config)
    linears = {name for name, *_ in block_linears(model)}
    del model

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.quantizing-{os.getpid()}"
    tmp.mkdir()
    start = time.perf_counter()
    try:
        (tmp / fmt8.INCOMPLETE_MARKER).write_text(f"python -m stepvideo.quantize {root} --out {out}: running\n")
        how = {}
        for src in _other_files(root, transformer, files):
            kind = _place(src, tmp / src.relative_to(root), link)
            how[kind] = how.get(kind, 0) + 1
        logger.info("other files: %s", ", ".join(f"{n} {k}" for k, n in sorted(how.items())) or "none")
        source_bytes = sum(f.stat().st_size for f in files)
        bar = _progress_bar(source_bytes, progress)
        weight_map: Dict[str, str] = {}
        hashes: Dict[str, str] = {}
        dit_out = tmp / layout.TRANSFORMER_DIR
        dit_out.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            hashes[f.name] = sha256_file(f)
            weight_map.update(_quantize_shard(f, dit_out / f.name, linears, fmt, i == 0, bar.update))
        bar.close()
        written = [dit_out / f.name for f in files]
        if len(files) > 1:
            total = sum(p.stat().st_size for p in written)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (dit_out / f"{layout.TRANSFORMER_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        combined = hashlib.sha256("".join(f"{n} {h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()
        config[fmt8.CONFIG_KEY] = {
            "method": fmt8.METHOD, "format": fmt, "scale_layout": fmt8.SCALE_LAYOUT, "scale_dtype": "float32",
            "modules": "plain nn.Linear in transformer_blocks", "linears": len(linears),
            "quantized_from_dtype": _stored_dtype(files[0], linears),
            "source": {"model_dir": str(root.resolve()), "sha256": combined, "shards_sha256": hashes},
            "tool": "python -m stepvideo.quantize",
        }
        (dit_out / layout.TRANSFORMER_CONFIG).write_text(json.dumps(config, indent=2))   # last: marks completion
        (tmp / fmt8.INCOMPLETE_MARKER).unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeReport(out_dir=out, linears=len(linears), source_bytes=source_bytes,
                          written_bytes=sum((out / layout.TRANSFORMER_DIR / f.name).stat().st_size for f in files),
                          seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(),
                          largest_shard_bytes=max(f.stat().st_size for f in files))


def _stored_dtype(shard: Path, linears: set) -> Optional[str]:
    """The stored dtype of the block linears (safetensors name, e.g. ``BF16``)."""
    for key, info in ckpt.check_safetensors_file(shard).items():
        if key.endswith(".weight") and key[: -len(".weight")] in linears:
            return info["dtype"]
    return None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm      # optional progress bar (tqdm ships with transformers)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="quantising DiT shards")
