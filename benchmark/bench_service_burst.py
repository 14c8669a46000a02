"""Overload burst against the caption/VAE service: concurrent slow decodes, ``/health`` polled meanwhile.

    python benchmark/bench_service_burst.py --model_dir /tmp/tiny                    # 24 requests, 1 s each
    python benchmark/bench_service_burst.py --model_dir DIR --requests 24 --delay 0 --latents 1,3,8,4,4

Starts ``api/call_remote_server.py`` (default settings: ``--threads 16 --queue_size 16``) on a
free port, with ``--test_delay DELAY`` so every model call holds the device for at least that
long, fires ``--requests`` concurrent ``POST /vae-api`` requests and polls ``GET /health``
every 50 ms until they are all answered. Prints the status counts of the decodes (and whether
each 503 carried ``Retry-After``) and the ``/health`` latencies::

    decodes: 200 x 16, 503 x 8 (Retry-After on 8/8)
    health: n=... p50=... ms p95=... ms max=... ms
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--delay", type=float, default=1.0, help="--test_delay of the server (seconds per model call)")
    p.add_argument("--latents", default="1,1,8,1,1", help="latent shape B,F,C,h,w of each decode")
    p.add_argument("server_args", nargs="*", help="extra server flags after --, e.g. -- --threads 8")
    args = p.parse_args(argv)

    import requests
    import torch

    from stepvideo.caption_service.client import wait_ready
    from stepvideo.caption_service.protocol import TENSOR_CONTENT_TYPE, encode_tensors

    cmd = [sys.executable, str(REPO / "api" / "call_remote_server.py"), "--model_dir", args.model_dir, "--port", "0",
           "--device", "cpu", "--no_caption", "--log_level", "WARNING", "--test_delay", str(args.delay),
           *args.server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        url = line.split("listening on ", 1)[1].split()[0].rstrip(",")
        wait_ready(url, timeout=120)
        shape = [int(x) for x in args.latents.split(",")]
        body = encode_tensors({"samples": torch.randn(*shape)})
        answers: list = []

        def post():
            r = requests.post(url + "/vae-api", data=body, headers={"Content-Type": TENSOR_CONTENT_TYPE},
                              timeout=600)
            answers.append((r.status_code, "Retry-After" in r.headers))

        threads = [threading.Thread(target=post) for _ in range(args.requests)]
        start = time.monotonic()
        for t in threads:
            t.start()
        latencies, slow = [], []
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            requests.get(url + "/health", timeout=600).raise_for_status()
            latencies.append(time.perf_counter() - t0)
            if latencies[-1] > 0.1:
                slow.append(f"{1000 * latencies[-1]:.0f} ms at {time.monotonic() - start:.1f} s")
            time.sleep(0.05)
        for t in threads:
            t.join()
        codes = collections.Counter(code for code, _ in answers)
        busy = [hint for code, hint in answers if code == 503]
        print(f"decodes: {', '.join(f'{c} x {n}' for c, n in sorted(codes.items()))} "
              f"(Retry-After on {sum(busy)}/{len(busy)}), burst took {time.monotonic() - start:.1f} s")
        ms = sorted(1000 * x for x in latencies)
        print(f"health: n={len(ms)} p50={statistics.median(ms):.1f} ms "
              f"p95={ms[int(0.95 * (len(ms) - 1))]:.1f} ms max={ms[-1]:.1f} ms")
        print(f"health over 100 ms: {len(slow)} ({', '.join(slow[:8])})")
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
