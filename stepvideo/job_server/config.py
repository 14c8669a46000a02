"""``ServerConfig``: network, security and limits of the generation server."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import geometry
from ..caption_service.address import check_listen, is_exposed
from ..caption_service.connections import DEFAULT_CHANNEL_TIMEOUT, DEFAULT_CONNECTION_LIMIT, check_connection_options
from ..config import PRESETS

TOKEN_ENV = "STEPVIDEO_SERVER_TOKEN"
DEFAULT_PORT = 8000
MiB = 1 << 20
# the largest preset job: 204 frames at 544x992, 36 latent frames x 34 x 62 patches
DEFAULT_MAX_TOKENS = geometry.token_count(PRESETS["t2v"].height, PRESETS["t2v"].width, PRESETS["t2v"].num_frames)


@dataclass(frozen=True)
class ServerConfig:
    """Generation-server settings (every field has a ``--serve`` flag of the same name).

    host, port: where rank 0 listens (loopback by default; ``0.0.0.0`` exposes the server).
    token: when set, every request must send ``Authorization: Bearer <token>``.
    state_dir: the job database (``jobs.sqlite3``) and the videos (``videos/``).
    max_queue: queued jobs accepted before ``POST /v1/videos`` answers 429.
    threads: HTTP worker threads.
    connection_limit, channel_timeout: open connections served at once, and seconds an idle one
        is kept (:mod:`stepvideo.caption_service.connections`).
    max_steps, max_tokens: the largest job accepted (denoising steps; DiT tokens ``F * h * w``),
        so every request's cost is bounded before it is queued.
    max_prompt_chars, max_body_bytes, max_image_pixels: input size limits.
    ui: serve the page in the browser at ``/`` (``--no_ui`` turns it off).
    served_model_name: the model id of the API (``model``); None: derived from the checkpoint.
    memory_check: refuse (422) jobs whose tokens the memory model says this layout cannot hold
        in the memory free after loading (:mod:`.capacity`).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: Optional[str] = None
    state_dir: str = "./stepvideo-server"
    max_queue: int = 16
    threads: int = 8
    connection_limit: int = DEFAULT_CONNECTION_LIMIT
    channel_timeout: int = DEFAULT_CHANNEL_TIMEOUT
    max_steps: int = 100
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_chars: int = 8192
    max_body_bytes: int = 32 * MiB
    max_image_pixels: int = 4096 * 4096
    ui: bool = True
    served_model_name: Optional[str] = None
    memory_check: bool = True

    def __post_init__(self):
        check_listen(self.host, self.port, self.token, flag="--", no_token="unset")
        for name in ("max_queue", "threads", "max_steps", "max_tokens", "max_prompt_chars", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        check_connection_options(self.connection_limit, self.channel_timeout)
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max_body_mb must be at least 1 KiB, got {self.max_body_bytes} bytes")
        if not self.state_dir:
            raise ValueError("--state_dir must name a folder")

    @property
    def exposed(self) -> bool:
        """True when the bind address is reachable from other hosts."""
        return is_exposed(self.host)
