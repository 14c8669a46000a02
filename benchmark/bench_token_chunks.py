"""Simulated step time of the DiT with and without token-chunked blocks (H100 roofline).

    python benchmark/bench_token_chunks.py                      # 544x992x204, chunks of 8192 tokens
    python benchmark/bench_token_chunks.py --chunks 4096 8192 16384
    python benchmark/bench_token_chunks.py --grid 3 4 4 --layers 2 --chunks 8

Runs the project's developer simulator (``../shared/tools/roofline.py``, or ``--roofline PATH``;
not part of this repository) once on the whole block and once per chunk size, with every
``StepVideoModel`` it builds switched to :class:`~stepvideo.models.token_chunks.TokenChunkedBlock`.
Prints roofline's tables (seconds per CFG step at peak and achievable H100 figures); the last
line per chunk size is ``chunk=<tokens> step_s=<x> unchunked_s=<y> ratio=<x/y>`` (peak hardware).
These are simulated, not measured.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepvideo.models import dit  # noqa: E402
from stepvideo.models.token_chunks import DEFAULT_TOKEN_CHUNK, set_token_chunk  # noqa: E402


def load_roofline(path: Path):
    spec = importlib.util.spec_from_file_location("roofline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["roofline"] = module              # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def simulate(roofline, size, tokens):
    """Step seconds (peak hardware) of roofline's ``ours`` model, blocks chunked by ``tokens``."""
    original = dit.StepVideoModel

    class Chunked(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            set_token_chunk(self, tokens)

    dit.StepVideoModel = Chunked if tokens else original        # roofline imports it from here
    try:
        rec = roofline.run_ours(size, 1)[0]
    finally:
        dit.StepVideoModel = original
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--roofline", default=str(ROOT.parent / "shared" / "tools" / "roofline.py"))
    p.add_argument("--chunks", nargs="+", type=int, default=[DEFAULT_TOKEN_CHUNK])
    p.add_argument("--grid", nargs=3, type=int, default=[36, 34, 62], metavar=("F", "H", "W"))
    p.add_argument("--layers", type=int, default=48)
    args = p.parse_args(argv)
    path = Path(args.roofline)
    if not path.is_file():
        p.error(f"--roofline {path}: no such file (the project's developer tools, ../shared/tools/roofline.py)")
    roofline = load_roofline(path)
    size = roofline.Size(frames=args.grid[0], height=args.grid[1], width=args.grid[2], layers=args.layers)
    launch = 5e-6
    results = {"whole block": simulate(roofline, size, None)}
    for tokens in args.chunks:
        results[f"chunks of {tokens}"] = simulate(roofline, size, tokens)
    text, js = roofline.report(results, args.layers, launch, top=6)
    print(text)
    base = js["peak"]["whole block"]["step_s"]
    for tokens in args.chunks:
        step = js["peak"][f"chunks of {tokens}"]["step_s"]
        print(f"chunk={tokens} step_s={step:.3f} unchunked_s={base:.3f} ratio={step / base:.4f} (simulated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
