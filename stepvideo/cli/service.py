"""The caption/VAE service's command line: ``python -m stepvideo.cli.service`` / ``stepvideo-service``.

The service itself (parser, start-up, server) lives in :mod:`stepvideo.caption_service`; this module is
its entry point inside ``stepvideo.cli`` so that an installed package can start it without
the repository's ``api/`` folder. Same flags as ``python api/call_remote_server.py``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..caption_service.cli import main as service_main


def main(argv: Optional[Sequence[str]] = None) -> int:
    return service_main(argv)


if __name__ == "__main__":
    sys.exit(main())
