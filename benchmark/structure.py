"""How much of the package one generation walks through: files entered and call depth at the mp4 write.

    python benchmark/structure.py [--model_dir DIR] [--json out.json]

Runs ``run_parallel.py --no_service`` in this process on the tiny model (written to a temporary
folder unless ``--model_dir`` is given; 17 frames at 64x64, 2 steps, fp32) under a
``sys.setprofile`` hook and prints:

* ``files``: files of ``stepvideo/`` and ``run_parallel.py`` in which at least one function ran
  (module and class bodies run by imports are not counted), and ``functions``: distinct functions
  entered;
* ``write_depth``: frames of ``stepvideo/`` and ``run_parallel.py`` on the stack when
  ``stepvideo/io/video.py:write_mp4`` is entered.

The targets of issue 19 are ``files <= 45`` and ``write_depth <= 12`` (``tests/test_layers.py``
does not run this; ``tests/test_structure.py`` does, on the tiny model).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import runpy
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(REPO / "stepvideo") + os.sep
ENTRY = str(REPO / "run_parallel.py")
WRITE = (str(REPO / "stepvideo" / "io" / "video.py"), "write_mp4")
TARGETS = {"files": 45, "write_depth": 12}


def _ours(filename: str) -> bool:
    return filename.startswith(PACKAGE) or filename == ENTRY


def measure(model_dir: Path, out_dir: Path) -> Dict[str, object]:
    """Run one tiny ``--no_service`` generation here and return the counts (see the module docstring)."""
    functions, depth = set(), {}

    def profile(frame, event, arg):
        if event != "call":
            return
        code = frame.f_code
        if not _ours(code.co_filename) or not code.co_flags & inspect.CO_OPTIMIZED:
            return                       # module and class bodies (import time) are not function calls
        caller = frame.f_back.f_code if frame.f_back is not None else None
        if caller is not None and (caller.co_name == "<module>" or caller.co_filename.startswith("<frozen")):
            return                       # nor what an import runs: comprehensions of a module body, module __getattr__
        functions.add((code.co_filename, code.co_firstlineno, code.co_name))
        if (code.co_filename, code.co_name) == WRITE and "write_depth" not in depth:
            count, f = 0, frame
            while f is not None:
                count += _ours(f.f_code.co_filename)
                f = f.f_back
            depth["write_depth"] = count

    argv = [ENTRY, "--no_service", "--model_dir", str(model_dir), "--prompt", "a cat", "--num_frames", "17",
            "--height", "64", "--width", "64", "--infer_steps", "2", "--dtype", "fp32", "--save_path", str(out_dir),
            "--memory_profile", "none"]
    saved_argv, code = sys.argv, None
    sys.argv = argv
    sys.setprofile(profile)
    try:
        runpy.run_path(ENTRY, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.setprofile(None)
        sys.argv = saved_argv
    if code not in (None, 0):
        raise RuntimeError(f"the tiny run failed (exit code {code})")
    files = sorted({os.path.relpath(f, REPO) for f, _, _ in functions})
    return {"files": len(files), "functions": len(functions), "write_depth": depth.get("write_depth"),
            "file_list": files, "targets": TARGETS}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="a tiny model dir (default: write one to a temp folder)")
    parser.add_argument("--json", default=None, help="also write the numbers (and the file list) here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from stepvideo.testing.tiny import write_tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else write_tiny_model_dir(Path(tmp) / "tiny")
        result = measure(model_dir, Path(tmp) / "out")
    print(f"files entered: {result['files']} (target <= {TARGETS['files']}), functions: {result['functions']}, "
          f"stack depth at the mp4 write: {result['write_depth']} (target <= {TARGETS['write_depth']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
