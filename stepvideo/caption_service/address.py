"""Where a server listens: the checks both HTTP servers (caption/VAE service, generation server) share."""
from __future__ import annotations

import ipaddress
from typing import Optional


def is_exposed(host: str) -> bool:
    """True when the bind address ``host`` is reachable from other hosts."""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:        # a host name
        return host != "localhost"


def check_listen(host: str, port: int, token: Optional[str], *, flag: str = "", no_token: str = "None") -> None:
    """Refuse an empty bind ``host``, a ``port`` outside [0, 65535] or a blank ``token`` (also for
    ``stepvideo.job_server``); ``flag`` prefixes the names in the messages (``"--"`` for flags),
    ``no_token`` says how to run without a token."""
    if not 0 <= port <= 65535:
        raise ValueError(f"{flag}port must be in [0, 65535], got {port}")
    if not host:
        raise ValueError(f"{flag}host must be an interface address such as 127.0.0.1 or 0.0.0.0, got ''")
    if token is not None and not token.strip():
        raise ValueError(f"{flag}token must be a non-empty string (or {no_token} for no token)")
