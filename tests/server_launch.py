"""``GenerationServer``: a real ``run_parallel.py --serve`` launch for the tests (torchrun with gloo
ranks on CPU, or one plain process), in its own session so teardown stops every rank."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stepvideo.job_server.client import VideoClient
from stepvideo.parallel.launch import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2", "--dtype", "fp32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TOKEN = "s3cret-token"


def torchrun(*args, nproc: int = 2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), str(REPO / "run_parallel.py"), *args]


class GenerationServer:
    """``--serve`` on the tiny model with token :data:`TOKEN`; ``nproc`` 1 runs without torchrun."""

    def __init__(self, model_dir, service_url, state_dir, log_path, nproc: int = 2, max_queue: int = 2,
                 extra=(), env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")
        flags = ["--serve", "--port", str(self.port), "--state_dir", str(state_dir), "--max_queue", str(max_queue),
                 "--model_dir", str(model_dir), "--vae_url", service_url, "--caption_url", service_url,
                 *(["--ulysses_degree", str(nproc)] if nproc > 1 else []), *TINY, *extra]
        cmd = torchrun(*flags, nproc=nproc) if nproc > 1 else [sys.executable, str(REPO / "run_parallel.py"), *flags]
        self.proc = subprocess.Popen(cmd, env={**ENV, **(env or {}), "STEPVIDEO_SERVER_TOKEN": TOKEN}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.client = VideoClient(self.url, token=TOKEN)

    def wait_ready(self, timeout=240.0):
        def exited():
            return None if self.proc.poll() is None else f"the server exited with code {self.proc.returncode}"

        return self.client.wait_ready(timeout=timeout, interval=0.3, abort=exited)

    def kill_launcher(self):
        """``kill -9`` of torchrun alone; its ranks must go away by themselves."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        raise AssertionError("the ranks outlived their killed launcher")

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def running_server(model_dir, service, root, **kwargs):
    """A ready :class:`GenerationServer` on ``service`` (``(url, token)``, the session's tiny
    caption/VAE service) with its state and log under ``root``; stopped on exit."""
    url, token = service
    server = GenerationServer(model_dir, url, root / "state", root / "server.log",
                              env={"STEPVIDEO_SERVICE_TOKEN": token}, **kwargs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
