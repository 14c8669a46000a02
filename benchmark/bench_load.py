"""Seconds and peak host RSS of loading the DiT: bf16 + load-time fp8 quantisation vs an fp8 folder.

    python benchmark/bench_load.py --model_dir ./ckpts                  # quantises into --work_dir first
    python benchmark/bench_load.py --model_dir ./ckpts --fp8_dir ./ckpts-fp8
    python benchmark/bench_load.py --real_width_blocks 2 --work_dir /tmp/bench-load   # random real-width DiT

Each load runs in a fresh process (``StepVideoModel.from_pretrained`` onto ``--device``, plus
``quantize_blocks`` for the bf16 folder: what ``--fp8`` / the 48g profile do at start-up, then
one byte of every page of every tensor is read, as the copy to the GPU would), its peak RSS
read with ``wait4`` (safetensors maps the files: the peak counts mapped file pages, which the
kernel can drop, as well as anonymous memory; both are printed as they are at the end). The
files are read once before each measurement (page cache warm for both). The one-off quantiser (``python -m stepvideo.quantize``) is measured the same way.

``--real_width_blocks N`` writes a DiT of the released width (48 x 128, the default
``DiTConfig``) with N blocks of random weights (bf16, the tiny factory's initialisation) and
measures it; the last lines extrapolate to the 48 blocks linearly in bytes (derived, not
measured). The checkpoint sizes on disk are derived from ``config.json`` by counting parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stepvideo.loading import checkpoint as ckpt  # noqa: E402
from stepvideo.loading import layout  # noqa: E402

GIB = 1024 ** 3
FULL_LAYERS = 48


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", help="bf16 model folder (or one holding transformer/)")
    p.add_argument("--fp8_dir", help="its fp8 copy (default: written by python -m stepvideo.quantize into --work_dir)")
    p.add_argument("--work_dir", default=None, help="where the fp8 copy / the real-width DiT are written "
                                                    "(default: a folder beside --model_dir)")
    p.add_argument("--real_width_blocks", type=int, default=0,
                   help="build and measure a released-width DiT with this many random blocks instead of --model_dir")
    p.add_argument("--dtype", default="bf16", help="load dtype of the non-quantised tensors")
    p.add_argument("--device", default="cpu", help="where the weights go (cpu: host RSS holds the model)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.child and not args.model_dir and not args.real_width_blocks:
        p.error("give --model_dir or --real_width_blocks")
    return args


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(kind: str, folder: str, dtype: str, device: str) -> None:
    """One measured load in this (fresh) process; prints one JSON line."""
    from stepvideo.models.dit import StepVideoModel
    from stepvideo.fp8_linear import quantize_blocks

    base = rss_bytes()
    start = time.perf_counter()
    model = StepVideoModel.from_pretrained(folder, torch_dtype=dtype, device=device)
    loaded = time.perf_counter()
    if kind == "bf16":
        quantize_blocks(model)
    quantised = time.perf_counter()
    touch(model)
    done = time.perf_counter()
    print(json.dumps({"load_s": loaded - start, "quantise_s": quantised - loaded, "touch_s": done - quantised,
                      "total_s": done - start, "rss_after_imports": base, **rss_parts()}))


def touch(model) -> None:
    """Read one byte of every page of every tensor: safetensors tensors are lazily mapped, and a
    copy to the GPU reads them all, so "loaded" means resident here for both kinds."""
    for t in list(model.parameters()) + list(model.buffers()):
        flat = t.detach().reshape(-1).view(torch.uint8) if t.numel() else None
        if flat is not None:
            int(flat[:: 4096].sum())


def rss_parts() -> dict:
    """Resident anonymous memory and mapped file pages of this process now (bytes)."""
    parts = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                parts[name] = int(value.split()[0]) * 1024
    return parts


def measure(cmd, stdout: Path = Path(os.devnull)) -> dict:
    """Run ``cmd`` (stdout to ``stdout``, stderr dropped) in a child whose peak RSS the kernel
    reports (``wait4``: ru_maxrss of that child alone); wall seconds include its imports."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:                                      # the child: redirect, then become the command
        try:
            os.dup2(os.open(str(stdout), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            os.execv(cmd[0], cmd)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {code}); run it by hand to see why")
    return {"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024}


def warm(folder: Path) -> None:
    """Read every file once so both loads start with the page cache warm."""
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * 2 ** 20):
                pass


def measured_load(kind: str, folder: Path, args, out_file: Path) -> dict:
    warm(folder)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(folder), "--dtype", args.dtype,
           "--device", args.device]
    result = measure(cmd, out_file)
    result.update(json.loads(out_file.read_text().strip().splitlines()[-1]))
    return result


def transformer_dir(folder: Path) -> Path:
    return folder / layout.TRANSFORMER_DIR if (folder / layout.TRANSFORMER_DIR).is_dir() else folder


def derived_sizes(config: dict, layers: int) -> dict:
    """Bytes of the DiT on disk, bf16 vs fp8 (block linears 1 byte + an fp32 scale per output
    row, the rest bf16), counted from the config with ``layers`` blocks (meta device)."""
    from stepvideo.models.dit import StepVideoModel
    from stepvideo.fp8_linear import block_linears

    with torch.device("meta"):
        model = StepVideoModel.from_config({**config, "num_layers": layers})
    quantised = {f"{name}.weight": linear.out_features for name, _, _, linear in block_linears(model)}
    bf16 = fp8 = 0
    params = 0
    for name, p in model.state_dict().items():
        params += p.numel()
        bf16 += 2 * p.numel()
        fp8 += p.numel() + 4 * quantised[name] if name in quantised else 2 * p.numel()
    return {"layers": layers, "params": params, "bf16_bytes": bf16, "fp8_bytes": fp8}


def build_real_width(blocks: int, dest: Path) -> Path:
    """A model folder (``transformer/`` only) of the released width with ``blocks`` random blocks."""
    from stepvideo.config import DiTConfig
    from stepvideo.models.dit import StepVideoModel
    from stepvideo.testing.init import init_random_weights

    if (dest / layout.TRANSFORMER_DIR / layout.TRANSFORMER_CONFIG).is_file():
        return dest
    config = DiTConfig(num_layers=blocks, extra={"_class_name": "StepVideoModel"})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = StepVideoModel.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    init_random_weights(model, seed=0)
    folder = dest / layout.TRANSFORMER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.save_sharded(model.state_dict(), folder, layout.TRANSFORMER_WEIGHTS, num_shards=max(2, blocks))
    config.to_json(folder / layout.TRANSFORMER_CONFIG)
    return dest


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.dtype, args.device)
        return 0
    if args.real_width_blocks:
        work = Path(args.work_dir or "bench-load")
        print(f"building a released-width DiT with {args.real_width_blocks} random blocks in {work} ...", flush=True)
        model_dir = build_real_width(args.real_width_blocks, work / f"real-width-{args.real_width_blocks}")
    else:
        model_dir = Path(args.model_dir)
        work = Path(args.work_dir) if args.work_dir else model_dir.resolve().parent
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    fp8_dir = Path(args.fp8_dir) if args.fp8_dir else work / f"{model_dir.resolve().name}-bench-fp8"
    if not args.fp8_dir:
        if fp8_dir.exists():
            import shutil
            shutil.rmtree(fp8_dir)
        warm(transformer_dir(model_dir))
        rows["quantise"] = measure([sys.executable, "-m", "stepvideo.quantize", str(model_dir), "--out", str(fp8_dir),
                                    "--no_progress"])
    out_file = work / ".bench_load_child.json"
    rows["bf16"] = measured_load("bf16", model_dir, args, out_file)
    rows["fp8"] = measured_load("fp8", fp8_dir, args, out_file)
    out_file.unlink(missing_ok=True)

    config = ckpt.read_json(transformer_dir(model_dir) / layout.TRANSFORMER_CONFIG)
    layers = int(config.get("num_layers", FULL_LAYERS))
    sizes = {"this": derived_sizes(config, layers), "full": derived_sizes(config, FULL_LAYERS)}
    disk = {k: sum(f.stat().st_size for f in transformer_dir(d).glob("*.safetensors"))
            for k, d in (("bf16", model_dir), ("fp8", fp8_dir))}
    print(f"DiT {model_dir} ({layers} blocks, {args.dtype} on {args.device}; page cache warm; fresh process each)")
    for key, label in (("bf16", "bf16 folder + load-time fp8"), ("fp8", "fp8 folder (stepvideo.quantize)")):
        r = rows[key]
        print(f"  {label:<32} load {r['load_s']:7.2f} s  quantise {r['quantise_s']:7.2f} s  read "
              f"{r['touch_s']:5.2f} s  total {r['total_s']:7.2f} s  peak host RSS {r['peak_rss'] / GIB:6.2f} GiB "
              f"(after imports {r['rss_after_imports'] / GIB:.2f}; at the end anonymous "
              f"{r.get('RssAnon', 0) / GIB:.2f} + mapped files {r.get('RssFile', 0) / GIB:.2f} GiB)")
    if "quantise" in rows:
        q = rows["quantise"]
        print(f"  {'quantiser, once':<32} wall {q['wall_s']:7.2f} s (imports included)  peak host RSS "
              f"{q['peak_rss'] / GIB:6.2f} GiB")
    speedup = rows["bf16"]["total_s"] / max(rows["fp8"]["total_s"], 1e-9)
    print(f"  fp8 folder loads {speedup:.1f}x faster; DiT files on disk: bf16 {disk['bf16'] / GIB:.2f} GiB, "
          f"fp8 {disk['fp8'] / GIB:.2f} GiB")
    this = sizes["this"]
    print(f"  derived from config.json ({layers} blocks, {this['params'] / 1e9:.3f} B parameters): "
          f"bf16 {this['bf16_bytes'] / GIB:.2f} GiB, fp8 {this['fp8_bytes'] / GIB:.2f} GiB")
    if args.real_width_blocks:
        full = sizes["full"]
        ratio = full["bf16_bytes"] / this["bf16_bytes"]
        print(f"  derived from config.json at {FULL_LAYERS} blocks ({full['params'] / 1e9:.2f} B parameters): "
              f"bf16 {full['bf16_bytes'] / GIB:.2f} GiB, fp8 {full['fp8_bytes'] / GIB:.2f} GiB on disk")
        extrapolated = {}
        for key in ("bf16", "fp8"):
            r = rows[key]
            extrapolated[key] = {"total_s": r["total_s"] * ratio,
                                 "peak_rss": r["rss_after_imports"] + (r["peak_rss"] - r["rss_after_imports"]) * ratio}
            print(f"  extrapolated to {FULL_LAYERS} blocks (x{ratio:.1f} the bytes, linear; derived): {key} "
                  f"{extrapolated[key]['total_s']:.0f} s, peak host RSS {extrapolated[key]['peak_rss'] / GIB:.1f} GiB")
        rows["extrapolated"] = extrapolated
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "sizes": sizes, "disk": disk}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
