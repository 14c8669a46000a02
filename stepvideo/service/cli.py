"""Command line of the caption/VAE service (``python api/call_remote_server.py``).

The port is bound first and the models load in a background thread, so a busy port fails at
once, ``GET /health`` answers during a long load and ``GET /ready`` turns 200 when the models
are in. A failed load stops the process with exit code 1.
"""
from __future__ import annotations

import _thread
import argparse
import logging
import os
import socket
import sys
import threading
from concurrent.futures import Future
from typing import List, Optional, Sequence

from ..loading import layout
from .config import DEFAULT_PORT, TOKEN_ENV, ServiceConfig

logger = logging.getLogger("stepvideo.service")

_DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                  "fp32": "float32", "float32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python api/call_remote_server.py",
        description="Serve Step-LLM + HunyuanCLIP (/caption-api) and the Video-VAE (/vae-api, /vae-encode-api) "
                    "over HTTP for run_parallel.py. Safe wire format (safetensors + JSON, no pickle).")
    models = p.add_argument_group("models")
    models.add_argument("--model_dir", required=True, help="checkpoint folder or Hugging Face repo id")
    models.add_argument("--llm_dir", default=layout.LLM_DIR, help="Step-LLM sub-folder (default %(default)s)")
    models.add_argument("--clip_dir", default=layout.CLIP_DIR, help="HunyuanCLIP sub-folder (default %(default)s)")
    models.add_argument("--vae_dir", default=layout.VAE_DIR, help="VAE sub-folder (default %(default)s)")
    models.add_argument("--device", default=None,
                        help="device for all models (default: the last visible GPU, else cpu)")
    models.add_argument("--caption_device", default=None, help="device of the text encoders (overrides --device)")
    models.add_argument("--vae_device", default=None, help="device of the VAE (overrides --device)")
    models.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPE_ALIASES),
                        help="Step-LLM and VAE dtype (default %(default)s; HunyuanCLIP stays float32)")
    models.add_argument("--no_caption", action="store_true", help="do not load/serve the text encoders")
    models.add_argument("--no_vae", action="store_true", help="do not load/serve the VAE")

    net = p.add_argument_group("network and security")
    net.add_argument("--host", default="127.0.0.1",
                     help="interface to bind (default %(default)s, this machine only; 0.0.0.0 exposes the service)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s; 0 = any free)")
    net.add_argument("--token", default=None,
                     help=f"shared token clients must send as 'Authorization: Bearer ...' (default ${TOKEN_ENV}; "
                          "prefer the environment variable: command lines are visible to other users)")
    net.add_argument("--dev_server", action="store_true", help="use Flask's development server instead of waitress")
    net.add_argument("--threads", type=int, default=16, help="HTTP worker threads (default %(default)s)")

    lim = p.add_argument_group("limits")
    lim.add_argument("--max_body_mb", type=float, default=512, help="largest request body in MiB (default %(default)s)")
    lim.add_argument("--max_prompts", type=int, default=16, help="prompts per caption request (default %(default)s)")
    lim.add_argument("--max_prompt_chars", type=int, default=8192, help="characters per prompt (default %(default)s)")
    lim.add_argument("--queue_size", type=int, default=16,
                     help="requests that may wait for a busy device before 503 (default %(default)s)")
    lim.add_argument("--queue_timeout", type=float, default=900.0,
                     help="seconds a request waits for its device before 503 (default %(default)s)")

    misc = p.add_argument_group("process")
    misc.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads (CPU inference)")
    misc.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """Turn parsed arguments into a :class:`ServiceConfig` (devices resolved here, at run time)."""
    from .components import default_device

    device = args.device or default_device()
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    return ServiceConfig(
        host=args.host, port=args.port, token=token, dev_server=args.dev_server, threads=args.threads,
        max_body_bytes=int(args.max_body_mb * (1 << 20)), max_prompts=args.max_prompts,
        max_prompt_chars=args.max_prompt_chars, queue_size=args.queue_size, queue_timeout=args.queue_timeout,
        model_dir=args.model_dir, llm_dir=args.llm_dir, clip_dir=args.clip_dir, vae_dir=args.vae_dir,
        caption_device=args.caption_device or device, vae_device=args.vae_device or device,
        dtype=_DTYPE_ALIASES[args.dtype], load_caption=not args.no_caption, load_vae=not args.no_vae)


def advertised_urls(host: str, port: int) -> List[str]:
    """URLs under which clients can reach a server bound to ``host:port``."""
    def fmt(h: str) -> str:
        return f"[{h}]" if ":" in h else h

    if host in ("0.0.0.0", "::", ""):
        names = [socket.gethostname()]
        try:
            names += sorted({ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
                             if not ai[4][0].startswith("127.")})
        except OSError:
            pass
        return [f"http://{fmt(n)}:{port}" for n in names]
    return [f"http://{fmt(host)}:{port}"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.torch_threads:
        import torch
        torch.set_num_threads(args.torch_threads)

    from .components import load_components
    from .server import ServiceServer, create_app

    if config.exposed and config.token is None:
        logger.warning("binding %s without a token: anyone who can reach this port can use the models. "
                       "Set %s (or --token) on the server and the clients.", config.host, TOKEN_ENV)
    future: Future = Future()
    app = create_app(future, config)
    try:
        server = ServiceServer(app, config)
    except OSError as err:
        print(f"error: cannot listen on {config.host}:{config.port}: {err}", file=sys.stderr)
        return 2
    urls = advertised_urls(config.host, server.port)
    print(f"stepvideo service listening on {', '.join(urls)} (models loading; GET /ready answers 200 when done)",
          flush=True)

    def load() -> None:
        try:
            components = load_components(config, progress=True)
        except BaseException as err:  # noqa: BLE001 - reported, then the process stops
            future.set_exception(err)
            logger.error("loading the models failed: %s: %s", type(err).__name__, err)
            _thread.interrupt_main()
            return
        future.set_result(components)
        flags = (" --caption_url {0} --vae_url {0}" if config.load_caption and config.load_vae else
                 " --caption_url {0}" if config.load_caption else " --vae_url {0}")
        print(f"stepvideo service ready: caption on {components.caption_device if components.caption else '-'}, "
              f"VAE on {components.vae_device if components.vae else '-'}.\n"
              f"  pass to run_parallel.py:{flags.format(urls[0])}", flush=True)

    threading.Thread(target=load, name="stepvideo-load", daemon=True).start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if future.done() and future.exception() is not None:
        return 1
    return 0
