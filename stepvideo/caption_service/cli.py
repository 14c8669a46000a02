"""Command line of the caption/VAE service (``python api/call_remote_server.py``).

The port is bound first and served from a background thread while the main thread loads the
models, so a busy port fails at once, ``GET /health`` answers during a long load and
``GET /ready`` turns 200 when the models are in. Every start-up failure (busy port, bad model
dir, failed load) prints one ``error: ...`` line and exits 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from concurrent.futures import Future
from typing import List, Optional, Sequence

from ..loading import layout
from .components import default_device, load_components
from .config import DEFAULT_PORT, TOKEN_ENV, ServiceConfig
from .connections import add_connection_args

logger = logging.getLogger("stepvideo.caption_service")

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
    net.add_argument("--threads", type=int, default=16,
                     help="model requests held at once, running or queued; one more gets 503 + Retry-After at once "
                          "(default %(default)s; a few extra HTTP threads always serve /health and /ready)")
    add_connection_args(net)

    lim = p.add_argument_group("limits")
    lim.add_argument("--max_body_mb", type=float, default=512, help="largest request body in MiB (default %(default)s)")
    lim.add_argument("--max_prompts", type=int, default=16, help="prompts per caption request (default %(default)s)")
    lim.add_argument("--max_prompt_chars", type=int, default=8192, help="characters per prompt (default %(default)s)")
    lim.add_argument("--queue_size", type=int, default=16,
                     help="requests that may wait for a busy device before 503 (default %(default)s)")
    lim.add_argument("--queue_timeout", type=float, default=900.0,
                     help="seconds a request waits for its device before 503 (default %(default)s)")
    lim.add_argument("--max_memory_gb", type=float, default=None,
                     help="most memory one model call may use beyond the weights, predicted from the request's "
                          "shape before it runs; 413 above (default: 0.9 of a GPU's free memory after loading, half "
                          "the host's on CPU)")
    lim.add_argument("--max_json_depth", type=int, default=32, help="deepest JSON nesting accepted (default %(default)s)")
    lim.add_argument("--test_delay", type=float, default=0.0,
                     help="testing only: seconds each model call sleeps while holding its device (default 0)")

    misc = p.add_argument_group("process")
    misc.add_argument("--torch_threads", type=int, default=None, help="torch.set_num_threads (CPU inference)")
    misc.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """Turn parsed arguments into a :class:`ServiceConfig` (devices resolved here, at run time)."""

    device = args.device or default_device()
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    return ServiceConfig(
        host=args.host, port=args.port, token=token, dev_server=args.dev_server, threads=args.threads,
        connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
        max_body_bytes=int(args.max_body_mb * (1 << 20)), max_prompts=args.max_prompts,
        max_prompt_chars=args.max_prompt_chars, queue_size=args.queue_size, queue_timeout=args.queue_timeout,
        max_memory_bytes=None if args.max_memory_gb is None else int(args.max_memory_gb * (1 << 30)),
        max_json_depth=args.max_json_depth, test_delay=args.test_delay,
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
    """Bind, load, serve. Exit codes: 0 after Ctrl-C / SIGTERM, 1 for any start-up failure (busy
    port, bad model dir, failed load; one ``error: ...`` line on stderr, no traceback unless
    ``--log_level DEBUG``), 2 for bad arguments, 130 for Ctrl-C during loading."""
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

    from .host import ServiceServer      # flask/waitress: imported when the service really starts
    from .server import create_app       # (flask app)

    if config.exposed and config.token is None:
        logger.warning("binding %s without a token: anyone who can reach this port can use the models. "
                       "Set %s (or --token) on the server and the clients.", config.host, TOKEN_ENV)
    future: Future = Future()
    app = create_app(future, config)
    try:
        server = ServiceServer(app, config)
    except OSError as err:
        print(f"error: cannot listen on {config.host}:{config.port}: {err}", file=sys.stderr)
        return 1
    urls = advertised_urls(config.host, server.port)
    print(f"stepvideo service listening on {', '.join(urls)} (models loading; GET /ready answers 200 when done)",
          flush=True)

    # Serve from a background thread and load here, in the main thread: the only
    # KeyboardInterrupt this thread can see is a real Ctrl-C (or SIGTERM, mapped below).
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    server.start()
    try:
        return _load_then_serve(config, future, server, urls[0], debug=args.log_level == "DEBUG")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _load_then_serve(config: ServiceConfig, future: Future, server, url: str, debug: bool) -> int:
    try:
        components = load_components(config, progress=True)
    except KeyboardInterrupt:
        future.set_exception(RuntimeError("interrupted while loading"))
        print("error: interrupted while loading the models", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, then exit 1
        future.set_exception(err)
        if debug:
            logger.exception("loading the models failed")
        print(f"error: loading the models failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    future.set_result(components)
    flags = (" --caption_url {0} --vae_url {0}" if config.load_caption and config.load_vae else
             " --caption_url {0}" if config.load_caption else " --vae_url {0}")
    print(f"stepvideo service ready: caption on {components.caption_device if components.caption else '-'}, "
          f"VAE on {components.vae_device if components.vae else '-'}.\n"
          f"  pass to run_parallel.py:{flags.format(url)}", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    return 0
