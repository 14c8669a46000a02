"""The generation path stays short: a one-process ``--no_service`` tiny run enters at most 45
files of ``stepvideo/`` + ``run_parallel.py``, and the stack at the mp4 write is at most 12 of their
frames deep (measured by ``benchmark/structure.py``, see docs/architecture.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_enters_few_files_and_writes_at_a_shallow_depth(tiny_model_dir, tmp_path):
    out = tmp_path / "structure.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmark" / "structure.py"), "--model_dir",
                           str(tiny_model_dir), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "stepvideo/io/video.py" in result["file_list"]            # the run really wrote its mp4
    assert result["files"] <= 45, result["file_list"]
    assert result["write_depth"] is not None and result["write_depth"] <= 12
