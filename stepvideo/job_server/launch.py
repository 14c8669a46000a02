"""``run_parallel.py --serve``: the generation server's flags and launcher (every rank runs :func:`serve`).

    torchrun --nproc_per_node 2 run_parallel.py --serve --port 8000 --state_dir ./server-state \\
        --model_dir ckpts --caption_url http://127.0.0.1:8080 --vae_url http://127.0.0.1:8080

Start-up, failing before any weight is read: rank 0 opens (and reconciles) the state dir,
checks the caption and VAE services' ``/ready``, binds the port and starts HTTP in waitress
threads; every rank learns the outcome. Then every rank loads the DiT once and enters the job
loop (:mod:`.worker`). Sampling flags given at launch (``--infer_steps``, ``--num_frames``, ...)
are the defaults of every job, job fields win. Stop with Ctrl-C or SIGTERM: the job in
progress is re-queued at the next start.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import fields
from typing import Optional

from ..caption_service.client import ServiceError, wait_ready
from ..caption_service.config import ServiceConfig
from ..caption_service.connections import add_connection_args
from ..config import DiTConfig
from ..errors import UserError
from ..parallel.agree import on_main
from ..process import debug_requested, exit_now, report
from ..runtime.generator import VideoGenerator
from ..sampling import sampling_from_options, sampling_options
from ..text_encoders.prompt_length import PromptLengthCounter
from .capacity import JobLimits, free_memory_bytes, service_decode_limits, tokens_that_fit
from .config import TOKEN_ENV, MiB, ServerConfig
from .jobs import JobStore, StateDirBusy
from .openai_fields import served_model_name
from .requests import ModelInfo
from .worker import ControlChannel, Dispatcher, serve_jobs

logger = logging.getLogger("stepvideo.job_server")


_SERVER = {f.name: f.default for f in fields(ServerConfig)}      # the --serve flags' defaults

def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The ``--serve`` group of ``run_parallel.py``."""
    g = parser.add_argument_group("generation server (--serve; see docs/server.md)")
    g.add_argument("--serve", action="store_true",
                   help="load the DiT once and serve POST /v1/videos jobs over HTTP instead of one --prompt")
    g.add_argument("--host", default=_SERVER["host"],
                   help="interface to bind (default %(default)s; 0.0.0.0 exposes the server: set a token)")
    g.add_argument("--port", type=int, default=_SERVER["port"], help="TCP port (default %(default)s; 0 = any free)")
    g.add_argument("--state_dir", default=_SERVER["state_dir"],
                   help="job database and videos; jobs survive restarts on the same dir (default %(default)s)")
    g.add_argument("--max_queue", type=int, default=_SERVER["max_queue"],
                   help="queued jobs before 429 (default %(default)s)")
    g.add_argument("--token", default=None,
                   help=f"clients must send 'Authorization: Bearer <token>' (default ${TOKEN_ENV}; prefer the "
                        "environment variable: command lines are visible to other users)")
    g.add_argument("--http_threads", type=int, default=_SERVER["threads"],
                   help="HTTP worker threads (default %(default)s)")
    add_connection_args(g)
    g.add_argument("--job_memory_check", choices=("on", "off"), default="on" if _SERVER["memory_check"] else "off",
                   help="422 for jobs whose DiT tokens the memory model says this layout cannot hold in the memory "
                        "free after loading (default %(default)s)")
    g.add_argument("--max_steps", type=int, default=_SERVER["max_steps"],
                   help="most denoising steps per job (default %(default)s)")
    g.add_argument("--max_tokens", type=int, default=_SERVER["max_tokens"],
                   help="most DiT tokens (latent frames x h/16 x w/16) per job (default %(default)s: 204 frames "
                        "at 544x992)")
    g.add_argument("--max_body_mb", type=float, default=_SERVER["max_body_bytes"] // MiB,
                   help="largest request body in MiB (default %(default)s)")
    g.add_argument("--no_ui", action="store_true", help="do not serve the page in the browser at /")
    g.add_argument("--served_model_name", default=None,
                   help="the model id of the API's 'model' field (default: stepvideo-t2v, stepvideo-t2v-turbo or "
                        "stepvideo-ti2v, from the checkpoint and --preset)")


def server_config(args: argparse.Namespace) -> ServerConfig:
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    return ServerConfig(host=args.host, port=args.port, token=token, state_dir=args.state_dir,
                        max_queue=args.max_queue, threads=args.http_threads, max_steps=args.max_steps,
                        connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
                        memory_check=args.job_memory_check == "on",
                        max_tokens=args.max_tokens, max_body_bytes=int(args.max_body_mb * (1 << 20)),
                        ui=not args.no_ui, served_model_name=args.served_model_name)


def _die_with_launcher() -> None:
    """Linux, under torchrun: this rank gets SIGKILL when its torchrun agent dies, so a killed
    launcher never leaves a rank holding the port, the GPU or the state dir's lock. (Without
    torchrun the parent is a shell, which may well go away while the server keeps running.)"""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:             # the agent died before the line above
        os._exit(1)


def _check_services(runtime) -> dict:
    """The caption and VAE services answer ``/ready`` with the parts we need (waiting up to
    ``runtime.service_wait`` (:data:`stepvideo.caption_service.client.READY_TIMEOUT_S`, capped by
    ``--dist_timeout``) for one that is still starting or loading). Returns the VAE service's
    decode limits (:func:`.capacity.service_decode_limits`)."""

    urls, limits = {}, {}
    urls.setdefault(runtime.caption_url, []).append("caption")
    urls.setdefault(runtime.vae_url, []).append("vae")
    for url, parts in urls.items():
        logger.info("checking the %s service at %s (GET /ready, waiting up to %.0f s)", " and ".join(parts), url,
                    runtime.service_wait)
        try:
            info = wait_ready(url, token=runtime.service_token, timeout=runtime.service_wait)
        except (ServiceError, ValueError) as err:
            raise ValueError(f"the caption/VAE service is not ready: {err}") from None
        missing = [p for p in parts if not info.get(p)]
        if missing:
            raise ValueError(f"the service at {url} does not serve {' and '.join(missing)}; point "
                             f"--{'caption' if 'caption' in missing else 'vae'}_url at one that does")
        if "vae" in parts:
            limits = service_decode_limits(info)
    logger.info("the VAE service decodes at most %s", limits or "(no limits reported)")
    return limits


def serve(args: argparse.Namespace, start_ranks) -> int:
    """Every rank: start-up checks, load the DiT, run jobs until stopped. Returns the exit code.
    ``start_ranks(args)``: the command line's config builder (``stepvideo.cli.start_ranks``)."""
    if getattr(args, "prompt", None):
        raise UserError("--prompt is not used with --serve; POST prompts to /v1/videos (see docs/server.md)")
    config = server_config(args)
    options = sampling_options(args)
    sampling_from_options(options)         # the launch's sampling flags are valid
    (_, output, _, runtime), state = start_ranks(args)
    _die_with_launcher()

    channel = ControlChannel(state)
    holder = {}
    try:
        on_main(state, lambda: _start_http(config, runtime, options, holder))
        generator = VideoGenerator(runtime, state)         # applies --compile like a one-shot run
    except Exception as err:           # shared by every rank already (parallel.agree): one line each
        _stop_http(holder)
        if not state.distributed:
            raise                      # run_main prints it and picks the exit code
        exit_now(report(err, debug_requested(args.debug)))    # never tear down a possibly broken group
    ctx = holder.get("ctx")
    # Ctrl-C / SIGTERM reach every rank (torchrun forwards them): rank 0 stops the loop at the
    # next step boundary and tells the others, which ignore the signal and leave with it
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, (lambda *_: ctx.dispatcher.stop()) if state.is_main else signal.SIG_IGN)
    if state.is_main:
        _mark_ready(ctx, generator, state, holder.get("decode_limits", {}))
        print(f"stepvideo generation server ready on {holder['url']} (state dir {config.state_dir})", flush=True)

    try:
        serve_jobs(generator, state, channel, output, ctx)
    finally:
        _stop_http(holder)
        state.destroy()
    return 0


def _start_http(config: ServerConfig, runtime, options: dict, holder: dict) -> None:
    """Rank 0: state dir, services, port, HTTP thread (the model is not loaded yet)."""
    from ..caption_service.cli import advertised_urls             # flask/waitress and prometheus: imported only
    from ..caption_service.host import ServiceServer              # when rank 0 of --serve starts its HTTP server,
    from .app import ServingContext, create_app           # not by run_parallel.py's one-shot runs
    from .metrics import ServerMetrics                    # (prometheus_client)

    if config.exposed and config.token is None:
        logger.warning("binding %s without a token: anyone who can reach this port can queue jobs. Set %s "
                       "(or --token) on the server and the clients.", config.host, TOKEN_ENV)
    try:
        store = JobStore.open(config.state_dir)
    except StateDirBusy as err:
        raise ValueError(str(err)) from None
    holder["store"] = store
    if not runtime.local:
        holder["decode_limits"] = _check_services(runtime)
    ctx = ServingContext(store=store, config=config, metrics=ServerMetrics(store.counts),
                         dispatcher=Dispatcher(store), server_options=options)
    http = ServiceConfig(host=config.host, port=config.port, token=config.token, threads=config.threads,
                         max_body_bytes=config.max_body_bytes, connection_limit=config.connection_limit,
                         channel_timeout=config.channel_timeout)
    try:
        server = ServiceServer(create_app(ctx), http)
    except OSError as err:
        raise ValueError(f"cannot listen on {config.host}:{config.port}: {err}") from None
    holder.update(ctx=ctx, server=server, url=advertised_urls(config.host, server.port)[0])
    server.start()
    print(f"stepvideo generation server listening on {holder['url']} (loading the model; GET /ready answers "
          "200 when jobs run)", flush=True)


def _mark_ready(ctx, generator, state, decode_limits: dict) -> None:
    config = generator.transformer_config
    is_ti2v = generator.pipeline.is_ti2v
    name = served_model_name(is_ti2v, ctx.server_options.get("preset"), str(generator.root),
                             ctx.config.served_model_name)
    memory = free_memory_bytes(state.device)
    fits = tokens_that_fit(config, state.config, generator.runtime.dtype, state.device, memory)
    limits = JobLimits(**decode_limits, max_tokens_memory=fits if ctx.config.memory_check else None)
    logger.info("job limits: %s (memory model: %d tokens fit in %.1f GiB free per rank%s)", limits.as_dict(), fits,
                memory / (1 << 30), "" if ctx.config.memory_check else "; not enforced: --job_memory_check off")
    # no paths here: /ready is for clients
    ctx.model_summary = {"ti2v": is_ti2v, "job_limits": limits.as_dict(),
                         "world_size": state.world_size,
                         "layout": {"ulysses_degree": state.config.ulysses_degree,
                                    "tensor_parallel_degree": state.config.tensor_parallel_degree,
                                    "cfg_degree": state.config.cfg_degree}}
    ctx.model = ModelInfo(is_ti2v=is_ti2v, num_heads=DiTConfig.from_dict(config).num_attention_heads,
                          parallel=state.config, world_size=state.world_size, name=name, limits=limits,
                          prompt_length=PromptLengthCounter.from_model_dir(generator.root))


def _stop_http(holder: dict) -> None:
    server: Optional[object] = holder.get("server")
    if server is not None:
        server.close()
    if holder.get("store") is not None:
        holder["store"].close()
