"""One-GPU mode (``run_parallel.py --no_service``, old spelling ``--local``) end to end on CPU with a tiny model dir."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--local"], ["--no_service", "--use-cpu-offload", "--fp8"]],
                         ids=["resident", "offload+fp8"])
def test_local_mode_writes_mp4(tmp_path, extra):
    from stepvideo.io.video import read_mp4
    from stepvideo.testing.tiny import write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path / "tiny")
    save = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "run_parallel.py"), "--model_dir", str(model_dir),
           "--prompt", "x", "--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2",
           "--dtype", "fp32", "--save_path", str(save), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.suffix == ".mp4"
    frames, _ = read_mp4(path)
    assert frames.shape == (17, 64, 64, 3)
