"""Kept import path of decode saved latents (`python -m stepvideo.decode`, console script stepvideo-decode): the code is :mod:`stepvideo.cli.decode`."""
import sys

from .cli.decode import build_parser, local_decoder, main, remote_decoder  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
