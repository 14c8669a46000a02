"""The README's main job: the whole decoupled system, end to end.

    bash scripts/demo.sh [--model_dir DIR] [--prompt TEXT] [--nproc 2] [--first_image_path IMG]
    bash scripts/demo.sh --ti2v # image-to-video: animates assets/demo.png (102 frames)
    stepvideo-demo ...          # the same from an installed package (python -m stepvideo.cli.demo)

1. Without ``--model_dir``, writes the built-in tiny model dir (once, cached under
   ``$STEPVIDEO_CACHE`` or ``~/.cache/stepvideo``): the TI2V one with ``--ti2v`` or
   ``--first_image_path``, else the T2V one.
2. Starts the caption/VAE service (``python -m stepvideo.cli.service``) on a free loopback port
   and waits for ``/ready``.
3. Runs ``torchrun --nproc_per_node N -m stepvideo.cli.generate ...`` with Ulysses degree N
   (gloo on CPU, NCCL on GPUs), pointing it at the service.
4. Stops the service and prints the mp4's path as the last line.

Nothing is looked up relative to the repository: the demo works from an installed package
(``--ti2v`` takes the demo image packaged with it, see :mod:`stepvideo.io.demo_image`).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from ..caption_service.client import wait_ready
from ..io.demo_image import demo_image_path
from ..parallel.launch import free_port
from ..testing.tiny import write_tiny_model_dir

CACHE_ENV = "STEPVIDEO_CACHE"
DEFAULT_PROMPT = "一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光"
TI2V_PROMPT = "夕阳下的湖面，一艘帆船缓缓驶过，树叶随风摇动，水面波光粼粼"
# tiny-model generation settings: seconds on a CPU. TI2V keeps its preset's 102 frames, at the
# demo image's aspect ratio (64x112 vs 544x992: a 4% crop, no resize warning)
TINY_ARGS = ["--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2"]
TINY_TI2V_ARGS = ["--height", "64", "--width", "112", "--infer_steps", "2"]


def cache_dir() -> Path:
    """``$STEPVIDEO_CACHE`` or ``~/.cache/stepvideo``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "stepvideo")


def ensure_tiny_model(cache: Path, variant: str) -> Path:
    folder = cache / f"tiny-model-{variant}"
    if not (folder / "tiny_model.json").is_file():
        print(f"[demo] writing the tiny {variant} model to {folder}", file=sys.stderr)
        write_tiny_model_dir(folder, variant=variant, overwrite=True)
    return folder


def process_exited(proc: subprocess.Popen):
    """An ``abort`` callable for :func:`stepvideo.caption_service.client.wait_ready`: stop waiting once
    the service process ``proc`` has exited."""
    def exited() -> Optional[str]:
        return None if proc.poll() is None else f"the service exited with code {proc.returncode}"

    return exited


def service_command(model_dir, port: int, device: Optional[str] = None) -> List[str]:
    """``python -m stepvideo.cli.service`` for ``model_dir`` on 127.0.0.1:``port``."""
    cmd = [sys.executable, "-m", "stepvideo.cli.service", "--model_dir", str(model_dir), "--port", str(port)]
    return cmd + (["--device", device] if device else [])


def generate_command(nproc: int, *flags: str) -> List[str]:
    """``torchrun --nproc_per_node N -m stepvideo.cli.generate FLAGS`` on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "stepvideo.cli.generate",
            *flags]


def stop(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="real checkpoint (default: the built-in tiny model)")
    parser.add_argument("--prompt", default=None, help="default: a Chinese prompt that suits the mode")
    parser.add_argument("--first_image_path", default=None, help="run image-to-video with this image")
    parser.add_argument("--ti2v", action="store_true",
                        help="image-to-video with the packaged demo image (assets/demo.png)")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun ranks (Ulysses degree)")
    parser.add_argument("--save_path", default="results", help="output folder (default %(default)s)")
    parser.add_argument("--service_device", default=None, help="device of the service (default: auto)")
    parser.add_argument("--ready_timeout", type=float, default=600.0)
    args, passthrough = parser.parse_known_args(argv)

    if args.ti2v and not args.first_image_path:
        args.first_image_path = str(demo_image_path())
    tiny = args.model_dir is None
    variant = "ti2v" if args.first_image_path else "t2v"
    prompt = args.prompt or (TI2V_PROMPT if args.first_image_path else DEFAULT_PROMPT)
    model_dir = ensure_tiny_model(cache_dir(), variant) if tiny else Path(args.model_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    server_cmd = service_command(model_dir, port, args.service_device or ("cpu" if tiny else None))
    print(f"[demo] starting the service: {' '.join(server_cmd)}", file=sys.stderr)
    server = subprocess.Popen(server_cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
    try:
        wait_ready(url, timeout=args.ready_timeout, abort=process_exited(server))
        print(f"[demo] service ready at {url}", file=sys.stderr)
        worker_cmd = generate_command(args.nproc, "--model_dir", str(model_dir), "--vae_url", url, "--caption_url",
                                      url, "--ulysses_degree", str(args.nproc), "--prompt", prompt,
                                      "--save_path", args.save_path)
        if args.first_image_path:
            worker_cmd += ["--first_image_path", args.first_image_path]
        if tiny:
            worker_cmd += (TINY_TI2V_ARGS if args.first_image_path else TINY_ARGS) + ["--dtype", "fp32"]
        worker_cmd += list(passthrough)
        print(f"[demo] running: {' '.join(worker_cmd)}", file=sys.stderr)
        result = subprocess.run(worker_cmd, env=env, stdout=subprocess.PIPE, text=True)
        sys.stderr.write(result.stdout)
        if result.returncode != 0:
            print(f"[demo] the generation failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
        videos = [line.strip() for line in result.stdout.splitlines() if line.strip().endswith(".mp4")]
        if not videos or not Path(videos[-1]).is_file():
            print("[demo] the generation did not report an mp4", file=sys.stderr)
            return 1
    finally:
        stop(server)
    print(videos[-1])
    return 0


main = run


if __name__ == "__main__":
    sys.exit(run())
