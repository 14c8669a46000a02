"""Predicted vs. real peak memory of caption/VAE service requests on CPU.

    python benchmark/bench_service_memory.py --model_dir /tmp/tiny          # default shapes
    python benchmark/bench_service_memory.py --model_dir DIR --shapes 1,3,8,16,16 --output uint8
    python benchmark/bench_service_memory.py --model_dir DIR --predict_only --shapes 1,2,8,64,64

For each latent shape, a fresh subprocess loads the VAE, then runs what ``POST /vae-api`` runs
(decode, optional uint8 conversion, the response body) and reports the rise of its peak RSS
(``VmHWM`` after ``/proc/self/clear_refs``) over the RSS before the request. The prediction is
:class:`stepvideo.caption_service.cost.VAECostModel` (fake-tensor trace, nothing allocated). Each line::

    decode [1, 3, 8, 16, 16] bf16->float  predicted 0.62 GiB  measured 0.60 GiB  error +3.1%

``--predict_only`` prints predictions alone (safe for shapes that would not fit this machine).
``--serve GIB`` instead starts the service (``api/call_remote_server.py --max_memory_gb GIB``),
sends each shape to ``/vae-api`` and prints the answer, its time and the server's peak RSS::

    python benchmark/bench_service_memory.py --model_dir DIR --serve 1.5 --shapes 1,2,8,64,64 1,3,8,4,4

Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import List, Sequence

GiB = 1 << 30
DEFAULT_SHAPES = ["1,3,8,8,8", "1,3,8,12,12", "1,3,8,16,16", "1,6,8,16,16", "1,3,8,24,24"]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(model_dir: str, shape: Sequence[int], dtype: str, output: str) -> dict:
    """Run in a fresh process: the real decode path of the service and its peak RSS rise."""
    import torch

    from stepvideo.io.frames import to_uint8_frames
    from stepvideo.models.vae import AutoencoderKL
    from stepvideo.caption_service.protocol import encode_tensors

    torch.set_num_threads(2)
    vae = AutoencoderKL.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    vae.decode(torch.zeros(1, 1, vae.z_channels, 1, 1))          # warm up kernels and thread pools
    z = torch.randn(*shape)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                              # reset VmHWM to the current RSS
    before = _status("VmRSS")
    with torch.inference_mode():
        video = vae.decode(z)
        video = to_uint8_frames(video) if output == "uint8" else video
        body = encode_tensors({"video": video}, {"output": output})
    return {"measured": _status("VmHWM") - before, "body": len(body)}


def predict(model_dir: str, shape: Sequence[int], dtype: str, output: str) -> int:
    import torch

    from stepvideo.models.vae import AutoencoderKL
    from stepvideo.caption_service.cost import VAECostModel

    vae = AutoencoderKL.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return VAECostModel(vae).decode_bytes(shape, torch.float32, output)


def serve(args) -> int:
    """Start the service with ``--max_memory_gb args.serve`` and send every shape to it."""
    import time
    from pathlib import Path

    import torch

    from stepvideo.caption_service.client import RemoteVAE, ServiceError, wait_ready

    launcher = Path(__file__).resolve().parents[1] / "api" / "call_remote_server.py"
    proc = subprocess.Popen([sys.executable, str(launcher), "--model_dir", args.model_dir, "--port", "0", "--device",
                             "cpu", "--no_caption", "--dtype", args.dtype, "--max_memory_gb", str(args.serve),
                             "--log_level", "WARNING"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def peak_rss() -> float:
        with open(f"/proc/{proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / (1 << 20)

    try:
        url = proc.stdout.readline().split("listening on ", 1)[1].split()[0].rstrip(",")
        wait_ready(url, timeout=300)
        print(f"ready: peak RSS {peak_rss():.3f} GiB, budget {args.serve:g} GiB per request")
        vae = RemoteVAE(url, retries=0)
        for text in args.shapes:
            shape = [int(x) for x in text.split(",")]
            start = time.monotonic()
            try:
                video = vae.decode(torch.randn(*shape), output=args.output)
                answer = f"200 video {list(video.shape)}"
            except ServiceError as err:
                answer = f"{err.status}: {str(err).split(': ', 1)[1][:160]}"
            print(f"decode {shape}: {time.monotonic() - start:.2f} s, {answer}; server peak RSS {peak_rss():.3f} GiB",
                  flush=True)
    finally:
        proc.kill()
        proc.wait()
    return 0


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="latent shapes B,F,C,h,w (fp32 on the wire)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--output", default="float", choices=["float", "uint8"])
    p.add_argument("--predict_only", action="store_true", help="print predictions without running the decodes")
    p.add_argument("--serve", type=float, metavar="GIB", help="send the shapes to a service with this budget")
    p.add_argument("--_measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        return serve(args)
    if args._measure:
        print(json.dumps(measure(args.model_dir, [int(x) for x in args._measure.split(",")], args.dtype, args.output)))
        return 0
    errors = []
    for text in args.shapes:
        shape = [int(x) for x in text.split(",")]
        predicted = predict(args.model_dir, shape, args.dtype, args.output)
        line = f"decode {shape} {args.dtype}->{args.output}  predicted {predicted / GiB:.3f} GiB"
        if not args.predict_only:
            out = subprocess.run([sys.executable, __file__, "--model_dir", args.model_dir, "--dtype", args.dtype,
                                  "--output", args.output, "--_measure", text], capture_output=True, text=True,
                                 check=True)
            measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
            errors.append(predicted / measured - 1)
            line += f"  measured {measured / GiB:.3f} GiB  error {100 * errors[-1]:+.1f}%"
        print(line, flush=True)
    if errors:
        print(f"max_abs_error={100 * max(abs(e) for e in errors):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
