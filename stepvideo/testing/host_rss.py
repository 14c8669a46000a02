"""Real host memory of loading and streaming a DiT on CPU, next to what the host accounting says.

    python -m stepvideo.testing.host_rss DIT_DIR             # a transformer/ folder (config.json + safetensors)
    python -m stepvideo.testing.host_rss DIT_DIR --write 48 2 # first write a random bf16 DiT: 48 heads (real width), 2 blocks

Prints one JSON line. ``rss_*`` are growths of the process's anonymous resident memory
(``RssAnon``: what the host must really hold; mapped checkpoint pages are file-backed and
reclaimable, so they are left out) at stage points; ``*_hwm`` are peak RSS growths (``VmHWM``
after a reset, file pages included) over a stretch. Run it in a fresh process with glibc's mmap
threshold pinned (``MALLOC_MMAP_THRESHOLD_=65536``) so freed buffers go back to the kernel at once.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

from ..loading import checkpoint as ckpt
from ..loading import layout
from ..models.dit import StepVideoModel
from ..perf import host_memory
from ..perf.disk_stream import load_dit_from_disk
from ..perf.memory_accounting import default_dtype
from ..perf.memory_profiles import PROFILES
from ..perf.offload import enable_block_offload


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _inputs(model: StepVideoModel, grid=(1, 4, 4)):
    f, h, w = grid
    config = model.config
    return dict(hidden_states=torch.randn(2, f, config.in_channels, h, w, dtype=torch.bfloat16),
                encoder_hidden_states=torch.randn(2, 8, config.llm_channels, dtype=torch.bfloat16),
                encoder_hidden_states_2=torch.randn(2, 77, config.clip_channels, dtype=torch.bfloat16),
                timestep=torch.tensor([0.5, 0.5]), return_dict=False)


def _held(folder: Path) -> int:
    """Anonymous resident bytes plus the resident pages mapped from files under ``folder`` (the
    checkpoint; shared-library pages, which fault in on first use, are left out)."""
    total, mapped_here = _status("RssAnon"), False
    folder = str(folder.resolve())
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            mapped_here = len(head) >= 6 and head[5].startswith(folder)
        elif mapped_here and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def measure(dit_dir: Path, disk_only: bool = False) -> dict:
    torch.set_num_threads(1)
    sizes = host_memory.sizes_from_checkpoint(dit_dir.parent, PROFILES["24g"], 16, 16, 17)
    out = {"block": sizes.dit_block, "dit_loaded": sizes.dit_loaded, "dit_other": sizes.dit_other,
           "disk_bound": int(host_memory.DISK_BLOCKS_IN_FLIGHT * sizes.dit_block)}
    with torch.no_grad():
        warm = StepVideoModel(num_attention_heads=1, num_layers=1, in_channels=8, out_channels=8,
                              caption_channels=[16, 8], attention_backend="sdpa").to(torch.bfloat16).eval()
        warm(**_inputs(warm))                                  # kernels, thread pools, RoPE partner cache
        with torch.device("meta"):                            # building the model class allocates once (~65 MiB)
            StepVideoModel.from_config(StepVideoModel.locate_checkpoint(dit_dir)[1], attention_backend="sdpa")
        del warm
        gc.collect()
        if not disk_only:
            base = _held(dit_dir)
            model = StepVideoModel.from_pretrained(dit_dir, torch_dtype=torch.bfloat16, attention_backend="sdpa")
            enable_block_offload(model, "cpu", pin_memory=False, blocks=model.transformer_blocks)
            model(**_inputs(model))                            # every weight page touched
            out["held_streaming_in_ram"] = _held(dit_dir) - base
            del model
            gc.collect()
        base = _held(dit_dir)
        model, source = load_dit_from_disk(dit_dir, torch_dtype=torch.bfloat16, attention_backend="sdpa")
        out["held_disk_after_load"] = _held(dit_dir) - base
        enable_block_offload(model, "cpu", pin_memory=False, blocks=model.transformer_blocks, source=source)
        inputs = _inputs(model)
        rss = _status("VmRSS")
        _reset_hwm()
        for _ in range(3):
            model(**inputs)
        out["disk_step_hwm"] = _status("VmHWM") - rss          # blocks in flight, mapped pages, activations
        out["disk_bytes_read"] = source.bytes_read
        out["disk_blocks_loaded"] = model._block_streamer.loads
    return out


def write_dit(folder: Path, heads: int, layers: int) -> None:
    """A random bf16 DiT of ``heads`` x 128 width and ``layers`` blocks in the official layout (2 shards)."""
    config = dict(num_attention_heads=heads, attention_head_dim=128, num_layers=layers, in_channels=8,
                  out_channels=8, caption_channels=[64, 32])
    with default_dtype(torch.bfloat16):
        model = StepVideoModel(**config, attention_backend="sdpa")
    ckpt.save_sharded(model.state_dict(), folder, layout.TRANSFORMER_WEIGHTS, num_shards=2)
    (folder / layout.TRANSFORMER_CONFIG).write_text(json.dumps(config))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dit_dir", type=Path)
    p.add_argument("--disk-only", action="store_true")
    p.add_argument("--write", nargs=2, type=int, metavar=("HEADS", "LAYERS"), help="write a random DiT there first")
    args = p.parse_args(argv)
    if args.write:
        write_dit(args.dit_dir, *args.write)
    print(json.dumps(measure(args.dit_dir, args.disk_only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
