"""``ServerConfig``: network, security and limits of the generation server."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional

TOKEN_ENV = "STEPVIDEO_SERVER_TOKEN"
DEFAULT_PORT = 8000
MiB = 1 << 20
# 204 frames at 544x992: 36 latent frames x 34 x 62 patches, the largest preset job
DEFAULT_MAX_TOKENS = 36 * 34 * 62


@dataclass(frozen=True)
class ServerConfig:
    """Generation-server settings (every field has a ``--serve`` flag of the same name).

    host, port: where rank 0 listens (loopback by default; ``0.0.0.0`` exposes the server).
    token: when set, every request must send ``Authorization: Bearer <token>``.
    state_dir: the job database (``jobs.sqlite3``) and the videos (``videos/``).
    max_queue: queued jobs accepted before ``POST /v1/videos`` answers 429.
    threads: HTTP worker threads.
    max_steps, max_tokens: the largest job accepted (denoising steps; DiT tokens ``F * h * w``),
        so every request's cost is bounded before it is queued.
    max_prompt_chars, max_body_bytes, max_image_pixels: input size limits.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: Optional[str] = None
    state_dir: str = "./stepvideo-server"
    max_queue: int = 16
    threads: int = 8
    max_steps: int = 100
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_chars: int = 8192
    max_body_bytes: int = 32 * MiB
    max_image_pixels: int = 4096 * 4096

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("--host must be an interface address such as 127.0.0.1 or 0.0.0.0, got ''")
        if self.token is not None and not self.token.strip():
            raise ValueError("--token must be a non-empty string (or unset for no token)")
        for name in ("max_queue", "threads", "max_steps", "max_tokens", "max_prompt_chars", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max_body_mb must be at least 1 KiB, got {self.max_body_bytes} bytes")
        if not self.state_dir:
            raise ValueError("--state_dir must name a folder")

    @property
    def exposed(self) -> bool:
        """True when the bind address is reachable from other hosts."""
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"
