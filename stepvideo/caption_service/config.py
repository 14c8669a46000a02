"""``ServiceConfig``: everything the caption/VAE service needs besides the models themselves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..loading import layout
from .address import check_listen, is_exposed
from .connections import DEFAULT_CHANNEL_TIMEOUT, DEFAULT_CONNECTION_LIMIT, check_connection_options

DEFAULT_PORT = 8080                 # the reference's port; also what a bare --vae_url host means
TOKEN_ENV = "STEPVIDEO_SERVICE_TOKEN"
MiB = 1 << 20
GiB = 1 << 30
STATUS_THREADS = 4                  # HTTP threads kept for /health, /ready and quick refusals


@dataclass(frozen=True)
class ServiceConfig:
    """Caption/VAE service settings.

    Network and security:
        host: interface to bind. Loopback by default; ``"0.0.0.0"`` exposes the service.
        port: TCP port (0 = any free port, handy in tests).
        token: shared secret; when set every request must send ``Authorization: Bearer <token>``.
        dev_server: run Flask's development server instead of waitress.
        threads: model requests (caption, decode, encode) admitted at once, running or waiting
            for their device; one more gets 503 + Retry-After at once. The HTTP host runs
            ``threads`` + :data:`STATUS_THREADS` worker threads, so ``/health`` and ``/ready``
            always find a free thread.
        connection_limit, channel_timeout: open connections served at once, and seconds an idle
            one is kept (:mod:`.connections`: set so idle connections cannot block ``/health``).

    Limits (bad input gets a 4xx JSON error):
        max_body_bytes: largest request body accepted (413 above).
        max_prompts, max_prompt_chars: bounds on a caption request.
        queue_size: requests that may wait for a busy device (503 + Retry-After when full).
        queue_timeout: seconds a request waits for its device before 503.
        max_memory_bytes: the most memory one model call may use beyond the loaded weights
            (predicted from the request's shape before it runs; 413 above). None: a fraction of
            the device's free memory once the models are loaded (see :mod:`.cost`).
        max_json_depth: deepest JSON nesting accepted in a body or a tensor header (400 above).
        test_delay: testing only: seconds every model call sleeps while it holds its device
            (makes overload tests cheap on the tiny model). 0 in production.

    Models:
        model_dir: checkpoint folder or Hub repo id; llm_dir, clip_dir, vae_dir: its sub-folders.
        caption_device, vae_device: torch device strings (``"cuda:3"``, ``"cpu"``).
        dtype: Step-LLM and VAE dtype (bf16 like the reference); HunyuanCLIP stays float32.
        load_caption, load_vae: serve only one half of the service when False.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: Optional[str] = None
    dev_server: bool = False
    threads: int = 16
    connection_limit: int = DEFAULT_CONNECTION_LIMIT
    channel_timeout: int = DEFAULT_CHANNEL_TIMEOUT
    max_body_bytes: int = 512 * MiB
    max_prompts: int = 16
    max_prompt_chars: int = 8192
    queue_size: int = 16
    queue_timeout: float = 900.0
    max_memory_bytes: Optional[int] = None
    max_json_depth: int = 32
    test_delay: float = 0.0
    model_dir: Optional[str] = None
    llm_dir: str = layout.LLM_DIR
    clip_dir: str = layout.CLIP_DIR
    vae_dir: str = layout.VAE_DIR
    caption_device: str = "cpu"
    vae_device: str = "cpu"
    dtype: str = "bfloat16"
    load_caption: bool = True
    load_vae: bool = True

    def __post_init__(self):
        check_listen(self.host, self.port, self.token)
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check_connection_options(self.connection_limit, self.channel_timeout)
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.max_prompt_chars < 1:
            raise ValueError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")
        if self.queue_timeout <= 0:
            raise ValueError(f"queue_timeout must be > 0 seconds, got {self.queue_timeout}")
        if self.max_memory_bytes is not None and self.max_memory_bytes < MiB:
            raise ValueError(f"max_memory_bytes must be >= 1 MiB (or None for the default), got {self.max_memory_bytes}")
        if self.max_json_depth < 2:
            raise ValueError(f"max_json_depth must be >= 2, got {self.max_json_depth}")
        if self.test_delay < 0:
            raise ValueError(f"test_delay must be >= 0 seconds, got {self.test_delay}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not (self.load_caption or self.load_vae):
            raise ValueError("load_caption and load_vae are both False: the service would serve nothing")

    @property
    def exposed(self) -> bool:
        """True when the bind address is reachable from other hosts."""
        return is_exposed(self.host)
