"""TCP connection limits of both HTTP servers (the caption/VAE service and the generation server).

waitress's defaults let about 99 idle connections (no bytes, no token) block every other
client, ``/health`` included: at ``connection_limit`` it stops accepting. Both servers set the
limits deliberately instead:

* ``connection_limit`` (:data:`DEFAULT_CONNECTION_LIMIT`): open connections served at once,
  far above what the clients of one deployment hold (the DiT ranks, a few API clients, probes),
  so idle or slow connections have to number in the thousands before they delay anyone. The
  process's open-file limit is raised to fit it when the hard limit allows (else the limit is
  lowered to fit, with a warning); waitress polls with ``poll()``, which has no 1024-descriptor
  ceiling.
* ``channel_timeout`` (:data:`DEFAULT_CHANNEL_TIMEOUT`): a connection with no request in
  progress and no bytes for this long is closed (checked every ``cleanup_interval``, a quarter
  of it), so idle connections give their slot back. A request being served (a long poll, a
  decode) is never cut by it.

What these limits cannot stop (thousands of connections from one address) is a job for a
reverse proxy in front of an exposed server; docs/server.md and docs/service.md say so.
"""
from __future__ import annotations

import argparse
import logging
from typing import Dict

logger = logging.getLogger(__name__)

DEFAULT_CONNECTION_LIMIT = 1000
DEFAULT_CHANNEL_TIMEOUT = 60          # seconds an idle connection is kept
_SPARE_FILES = 128                    # descriptors kept for the database, videos, logs, models


def add_connection_args(group: argparse._ArgumentGroup) -> None:
    """``--connection_limit`` and ``--channel_timeout`` (both servers)."""
    group.add_argument("--connection_limit", type=int, default=DEFAULT_CONNECTION_LIMIT,
                       help="open TCP connections served at once (default %(default)s; waitress's own default "
                            "of 100 lets idle connections block /health)")
    group.add_argument("--channel_timeout", type=int, default=DEFAULT_CHANNEL_TIMEOUT,
                       help="seconds an idle connection (no request in progress) is kept open "
                            "(default %(default)s)")


def check_connection_options(connection_limit: int, channel_timeout: int) -> None:
    if connection_limit < 10:
        raise ValueError(f"--connection_limit must be >= 10, got {connection_limit}")
    if channel_timeout < 1:
        raise ValueError(f"--channel_timeout must be >= 1 second, got {channel_timeout}")


def waitress_options(connection_limit: int, channel_timeout: int) -> Dict[str, object]:
    """waitress ``create_server`` keyword arguments for these limits (raising the open-file limit)."""
    limit = _fit_open_files(connection_limit)
    return {"connection_limit": limit, "channel_timeout": channel_timeout,
            "cleanup_interval": max(1, channel_timeout // 4), "asyncore_use_poll": True}


def _fit_open_files(connection_limit: int) -> int:
    try:
        import resource  # POSIX only
    except ImportError:
        return connection_limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connection_limit + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(10, soft - _SPARE_FILES)
        logger.warning("--connection_limit %d lowered to %d: the open-file limit is %d (raise it with ulimit -n)",
                       connection_limit, fitted, soft)
        return fitted
    return connection_limit
