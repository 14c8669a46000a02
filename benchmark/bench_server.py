"""Overhead of the generation server per job, against a direct ``VideoGenerator.generate`` call.

    python benchmark/bench_server.py [--jobs 5] [--nproc 1] [--poll 0.5]

On the tiny model (CPU), with a real caption/VAE service on 127.0.0.1:

1. direct: ``VideoGenerator.generate`` in this process (1 rank);
2. server: ``run_parallel.py --serve`` (``--nproc`` ranks; 1 runs without torchrun) and the Python
   client: submit, long-poll (``?wait=--poll``), download. The job's own ``timings.total_s`` is the
   generation inside the server.
   Direct and server jobs alternate, ``--jobs`` of each after one warm-up round;
3. the cancel flag every step broadcasts on 2 gloo ranks (the per-step cost of cancellation).

Prints milliseconds per job: ``server - direct`` (same ranks only) and ``wall - generate``
(the HTTP, queue, broadcast, polling and download around each job, whatever the ranks).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = {"num_frames": 17, "height": 64, "width": 64, "num_inference_steps": 2}
PROMPT = "a cat walks on the moon"


def _flag_round_trip(steps: int) -> float:
    """Seconds per ControlChannel.flag on this rank (run under run_on_cpu_ranks)."""
    from stepvideo.parallel.state import ParallelConfig, ParallelState
    from stepvideo.job_server.worker import ControlChannel

    state = ParallelState.from_env(ParallelConfig(ulysses_degree=2))
    channel = ControlChannel(state)
    channel.flag(False)
    start = time.perf_counter()
    for _ in range(steps):
        channel.flag(False)
    return (time.perf_counter() - start) / steps


def make_generator(model_dir: Path, url: str):
    from stepvideo.parallel.state import ParallelState
    from stepvideo.runtime.generator import RuntimeConfig, VideoGenerator

    return VideoGenerator(RuntimeConfig(model_dir=str(model_dir), dtype="fp32", vae_url=url, caption_url=url),
                          ParallelState.single())


def direct_job(generator, seed: int, out: Path) -> float:
    from stepvideo.config import OutputConfig, get_preset

    sampling = get_preset("t2v").with_overrides(seed=seed, **TINY)
    start = time.perf_counter()
    generator.generate(PROMPT, sampling, OutputConfig(output_path=str(out / f"direct-{seed}.mp4")), progress=False)
    return (time.perf_counter() - start) * 1000


def server_job(client, seed: int, poll: float, out: Path):
    """(client wall ms, the job's own generate ms)."""
    start = time.perf_counter()
    job = client.submit(PROMPT, seed=seed, **TINY)
    job = client.wait(job["id"], poll=poll, progress=False)
    client.download(job["id"], out / f"server-{seed}.mp4")
    return (time.perf_counter() - start) * 1000, job["timings"]["total_s"] * 1000


def compare(model_dir: Path, url: str, jobs: int, nproc: int, poll: float, root: Path):
    """Direct and server jobs alternate, so load changes on the machine hit both alike."""
    from stepvideo.job_server.client import VideoClient
    from stepvideo.parallel.launch import free_port

    port = free_port()
    args = ["--serve", "--port", str(port), "--state_dir", str(root / "state"), "--model_dir", str(model_dir),
            "--vae_url", url, "--caption_url", url, "--dtype", "fp32", "--ulysses_degree", str(nproc)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(REPO / "run_parallel.py"), *args]
    else:
        cmd = [sys.executable, str(REPO / "run_parallel.py"), *args]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        generator = make_generator(model_dir, url)
        client = VideoClient(f"http://127.0.0.1:{port}")
        client.wait_ready(timeout=600, abort=lambda: None if proc.poll() is None else "the server exited")
        direct, walls, inside = [], [], []
        for i in range(jobs + 1):               # the first round is a warm-up
            d = direct_job(generator, i, root)
            w, g = server_job(client, i, poll, root)
            if i:
                direct.append(d)
                walls.append(w)
                inside.append(g)
        return direct, walls, inside
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1, help="server ranks (1: no torchrun)")
    parser.add_argument("--poll", type=float, default=0.5,
                        help="client poll interval in seconds (long polls: the end of a job is seen at once)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from stepvideo.cli.demo import process_exited, stop
    from stepvideo.caption_service.client import wait_ready
    from stepvideo.parallel.launch import free_port, run_on_cpu_ranks
    from stepvideo.testing.tiny import write_tiny_model_dir

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        root = Path(tmp)
        model_dir = write_tiny_model_dir(root / "tiny", variant="t2v")
        port = free_port()
        service = subprocess.Popen([sys.executable, str(REPO / "api" / "call_remote_server.py"), "--model_dir",
                                    str(model_dir), "--port", str(port), "--device", "cpu", "--torch_threads",
                                    str(args.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout=300, abort=process_exited(service))
            direct, walls, inside = compare(model_dir, url, args.jobs, args.nproc, args.poll, root)
        finally:
            stop(service)
    flag_ms = statistics.median(run_on_cpu_ranks(_flag_round_trip, world_size=2, args=(200,))) * 1000

    med = statistics.median
    print(f"tiny model, {TINY['num_inference_steps']} steps, {TINY['num_frames']} frames at "
          f"{TINY['height']}x{TINY['width']}, {args.jobs} jobs (median), client poll {args.poll * 1000:.0f} ms")
    print(f"direct VideoGenerator.generate (1 rank):   {med(direct):8.1f} ms per job")
    print(f"server, client wall ({args.nproc} rank(s)):          {med(walls):8.1f} ms per job")
    print(f"server, generate inside the job:           {med(inside):8.1f} ms per job")
    print(f"server overhead (wall - generate):         {med(walls) - med(inside):8.1f} ms per job")
    if args.nproc == 1:
        print(f"server overhead (wall - direct):           {med(walls) - med(direct):8.1f} ms per job")
    print(f"cancel-flag broadcast per step (2 gloo ranks): {flag_ms:6.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
