"""Serialisation + loopback transfer time of real-size service payloads: our wire format
(safetensors + JSON header, ``stepvideo.caption_service.protocol``) vs. pickle (the reference's format).

    python benchmark/bench_service_protocol.py                 # all payloads, 3 repetitions
    python benchmark/bench_service_protocol.py --skip_video    # without the 660 MB video

A small echo service (Flask on waitress, like the real server) runs in a separate process on
127.0.0.1. For each payload and codec, one request is timed from the client:

* responses (caption embeddings, decoded video): the server encodes its tensors, sends them,
  the client reads and decodes them;
* requests (decode latents): the client encodes, sends, the server decodes.

``encode`` / ``decode`` are measured where they happen (the server reports its share in a
response header); ``transfer`` is the rest of the request time (HTTP + copies on loopback).
Both codecs use the same HTTP stack (requests client, waitress server, file-wrapper responses),
so the difference is the format alone. Medians over ``--reps`` runs.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import pickle
import socket
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from stepvideo.parallel.launch import free_port

CODECS = ("stepvideo", "pickle")
# name -> (direction, tensors); built identically (fixed seed) in both processes
PAYLOADS: Dict[str, Tuple[str, Callable[[], Dict[str, torch.Tensor]]]] = {
    "caption response (2 prompts)": ("response", lambda: {
        "y": _randn(2, 320, 6144).to(torch.bfloat16),
        "y_mask": torch.ones(2, 397, dtype=torch.int64),
        "clip_embedding": _randn(2, 77, 1024).to(torch.bfloat16)}),
    "decode request latents fp32": ("request", lambda: {"samples": _randn(1, 36, 64, 34, 62)}),
    "decode response video bf16": ("response", lambda: {"video": _randn(1, 204, 3, 544, 992).to(torch.bfloat16)}),
    "decode response video uint8": ("response", lambda: {
        "video": torch.randint(0, 256, (1, 204, 3, 544, 992), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))}),
}
VIDEO_PAYLOADS = ("decode response video bf16", "decode response video uint8")


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def encode(codec: str, tensors: Dict[str, torch.Tensor]) -> bytes:
    if codec == "pickle":
        return pickle.dumps(tensors)
    from stepvideo.caption_service.protocol import encode_tensors
    return encode_tensors(tensors)


def decode(codec: str, body: bytes) -> Dict[str, torch.Tensor]:
    if codec == "pickle":
        return pickle.loads(body)   # noqa: S301 - benchmark of the unsafe reference format
    from stepvideo.caption_service.protocol import decode_tensors
    return decode_tensors(body).tensors


# ----------------------------------------------------------------------------------------
# Echo service (separate process)
# ----------------------------------------------------------------------------------------

def _serve(port: int, names: List[str]) -> None:
    from flask import Flask, Response, request
    from waitress import serve
    from werkzeug.wsgi import wrap_file

    torch.set_num_threads(1)
    built = {name: PAYLOADS[name][1]() for name in names if PAYLOADS[name][0] == "response"}
    app = Flask("bench")

    @app.post("/<codec>/<int:index>")
    def handle(codec: str, index: int):
        name = names[index]
        if PAYLOADS[name][0] == "request":
            body = request.get_data(cache=False)      # reading the body counts as transfer
            start = time.perf_counter()
            decode(codec, body)
            return Response(b"ok", headers={"X-Server-Seconds": f"{time.perf_counter() - start:.6f}"})
        start = time.perf_counter()
        body = encode(codec, built[name])
        seconds = time.perf_counter() - start
        resp = Response(wrap_file(request.environ, io.BytesIO(body), 4 << 20), direct_passthrough=True,
                        headers={"X-Server-Seconds": f"{seconds:.6f}"})
        resp.content_length = len(body)
        return resp

    serve(app, host="127.0.0.1", port=port, threads=2, max_request_body_size=1 << 31, _quiet=True)


def _wait_for(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"echo server on port {port} did not start")


# ----------------------------------------------------------------------------------------
# Client side
# ----------------------------------------------------------------------------------------

def run_once(session, url: str, codec: str, direction: str, tensors) -> Dict[str, float]:
    """One timed request; returns encode/transfer/decode seconds and the body size."""
    if direction == "request":
        start = time.perf_counter()
        body = encode(codec, tensors)
        t_encode = time.perf_counter() - start
        start = time.perf_counter()
        resp = session.post(url, data=body, timeout=600)
        total = time.perf_counter() - start
        t_decode = float(resp.headers["X-Server-Seconds"])
        return {"bytes": len(body), "encode": t_encode, "transfer": total - t_decode, "decode": t_decode}
    start = time.perf_counter()
    resp = session.post(url, stream=True, timeout=600)
    data = resp.raw.read(decode_content=True)
    total = time.perf_counter() - start
    t_encode = float(resp.headers["X-Server-Seconds"])
    start = time.perf_counter()
    decode(codec, data)
    t_decode = time.perf_counter() - start
    return {"bytes": len(data), "encode": t_encode, "transfer": total - t_encode, "decode": t_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median reported)")
    parser.add_argument("--skip_video", action="store_true", help="leave out the 660 MB / 330 MB video payloads")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the client")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import requests

    names = [n for n in PAYLOADS if not (args.skip_video and n in VIDEO_PAYLOADS)]
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, names), daemon=True)
    server.start()
    try:
        _wait_for(port)
        session = requests.Session()
        session.trust_env = False
        print(f"loopback echo server on 127.0.0.1:{port}; torch {torch.__version__}; median of {args.reps} runs\n")
        header = f"{'payload':32s} {'codec':9s} {'MB':>8s} {'encode s':>9s} {'transfer s':>10s} {'decode s':>9s} " \
                 f"{'total s':>8s}"
        print(header)
        print("-" * len(header))
        for index, name in enumerate(names):
            direction, build = PAYLOADS[name]
            tensors = build() if direction == "request" else None
            for codec in CODECS:
                url = f"http://127.0.0.1:{port}/{codec}/{index}"
                run_once(session, url, codec, direction, tensors)          # warm-up (allocations, pools)
                runs = [run_once(session, url, codec, direction, tensors) for _ in range(args.reps)]
                med = {k: statistics.median(r[k] for r in runs) for k in ("encode", "transfer", "decode")}
                total = sum(med.values())
                print(f"{name:32s} {codec:9s} {runs[0]['bytes'] / 1e6:8.1f} {med['encode']:9.3f} "
                      f"{med['transfer']:10.3f} {med['decode']:9.3f} {total:8.3f}", flush=True)
            del tensors
    finally:
        server.terminate()
        server.join(10)


if __name__ == "__main__":
    main()
