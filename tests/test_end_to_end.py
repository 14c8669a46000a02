"""End to end: the real service on 127.0.0.1, 2 torchrun ranks (Ulysses 2, gloo), real mp4 files.

Also runs the README's main job (``stepvideo.cli.demo``, what ``scripts/demo.sh`` calls).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stepvideo.cli.demo import process_exited, stop
from stepvideo.parallel.launch import free_port
from stepvideo.caption_service.client import wait_ready
from stepvideo.io.video import read_mp4
from stepvideo.testing.tiny import write_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2", "--dtype", "fp32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return {v: write_tiny_model_dir(root / v, variant=v) for v in ("t2v", "ti2v")}


@pytest.fixture(scope="module")
def service(models):
    """The caption/VAE service (its parts are identical in the t2v and ti2v tiny dirs)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "api" / "call_remote_server.py"), "--model_dir",
                             str(models["t2v"]), "--port", str(port), "--device", "cpu", "--torch_threads", "1"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=180, abort=process_exited(proc))
        yield url
    finally:
        stop(proc)


def _torchrun(model_dir, url, save_path, *extra, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / "run_parallel.py"), "--model_dir",
           str(model_dir), "--vae_url", url, "--caption_url", url, "--ulysses_degree", str(nproc),
           "--save_path", str(save_path), *TINY_ARGS, *extra]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return Path(res.stdout.strip().splitlines()[-1]), res.stderr


def test_t2v_two_ranks_through_the_service(models, service, tmp_path):
    path, _ = _torchrun(models["t2v"], service, tmp_path, "--prompt", "一只猫在月球上散步", "--seed", "7")
    assert path.parent == tmp_path and path.suffix == ".mp4" and "seed7" in path.name
    frames, meta = read_mp4(path)
    assert frames.shape == (17, 64, 64, 3)
    assert meta["fps"] == 25
    assert frames.std() > 0                            # not a blank video
    assert not list(tmp_path.glob(".*partial*"))       # no temporary file left behind
    # automatic names never overwrite: same prompt and seed again -> a second file
    again, _ = _torchrun(models["t2v"], service, tmp_path, "--prompt", "一只猫在月球上散步", "--seed", "7")
    assert again != path and again.is_file() and path.is_file()
    np.testing.assert_array_equal(read_mp4(again)[0], frames)      # same seed, same video


def test_ti2v_two_ranks_with_an_image(models, service, tmp_path):
    from PIL import Image

    image = tmp_path / "first.png"
    yy, xx = np.mgrid[0:80, 0:120]
    Image.fromarray(np.stack([xx * 2, yy * 3, (xx + yy)], -1).astype(np.uint8)).save(image)
    out = tmp_path / "out" / "ti2v.mp4"
    path, log = _torchrun(models["ti2v"], service, tmp_path, "--prompt", "a gradient comes alive",
                          "--first_image_path", str(image), "--motion_score", "5", "--seed", "3",
                          "--output_path", str(out))
    assert path == out                                 # an explicit output path is honoured
    # 120x80 into 64x64: one pre-flight warning line, from rank 0 only
    fit = [line for line in log.splitlines() if "WARNING" in line and "--first_image_path" in line]
    assert len(fit) == 1 and "resized to 96x64 and centre-cropped to 64x64, cutting 33% of its width" in fit[0], log
    frames, _ = read_mp4(path)
    assert frames.shape == (17, 64, 64, 3)


def test_errors_before_loading(models, service, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "run_parallel.py"), "--model_dir", str(models["t2v"]), "--prompt", "x",
           "--ulysses_degree", "4", *TINY_ARGS]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "must equal ulysses_degree" in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "run_parallel.py"), "--model_dir", str(models["t2v"]),
                          "--prompt", "x", "--caption_url", "http://127.0.0.1:9", *TINY_ARGS],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "127.0.0.1:9" in res.stderr


def test_readme_main_job(tmp_path):
    """``scripts/demo.sh`` runs ``python -m stepvideo.cli.demo``: tiny model, service, 2 ranks, an mp4."""
    # run outside the repository: the demo finds the service and the generator as modules
    res = subprocess.run([sys.executable, "-m", "stepvideo.cli.demo", "--save_path", str(tmp_path)],
                         env={**ENV, "STEPVIDEO_CACHE": str(tmp_path / "cache")},
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == tmp_path
    assert read_mp4(path)[0].shape == (17, 64, 64, 3)


def test_demo_ti2v_animates_the_demo_image(models, tmp_path):
    """``bash scripts/demo.sh --ti2v``: the packaged demo image, the tiny TI2V model behind the
    service, 2 ranks, the ti2v preset's 102 frames; the mp4's path is the last line."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny-model-ti2v").symlink_to(models["ti2v"])        # the module's tiny TI2V dir, not a new one
    res = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), "--ti2v", "--save_path", str(tmp_path)],
                         env={**ENV, "STEPVIDEO_CACHE": str(cache), "STEPVIDEO_PY": sys.executable},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == tmp_path
    assert "assets/demo.png" in res.stderr                         # the image the demo says it animates
    warnings = [line for line in res.stderr.splitlines() if "WARNING" in line]
    assert not [line for line in warnings if "--first_image_path" in line], warnings    # the image fits as is
    frames = read_mp4(path)[0]
    assert frames.shape == (102, 64, 112, 3) and frames.std() > 0
