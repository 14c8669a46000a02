"""The frame of the small command-line tools (``benchmark/compare.py``, ``score.py``,
``lossless.py``, ``python -m stepvideo.vae``): the parser, logging, and one line per user error.

    def main(argv=None) -> int:
        return run_tool(build_parser().parse_args(argv), work, (ValueError, FileNotFoundError))

The listed errors (the user's to fix) print ``error: <message>`` and exit 2; with ``--debug`` or
``STEPVIDEO_DEBUG=1`` they raise with the traceback. Anything else raises as it is.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Tuple, Type

from .process import debug_requested

EXIT_USER_ERROR = 2


def tool_parser(doc: str, **kwargs) -> argparse.ArgumentParser:
    """A parser showing the module docstring ``doc`` as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def add_debug_flag(parser) -> None:
    """``--debug`` on ``parser`` (or an argument group)."""
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def run_tool(args: argparse.Namespace, body: Callable[[argparse.Namespace], int],
             user_errors: Tuple[Type[BaseException], ...]) -> int:
    """Set up logging and return ``body(args)``; ``user_errors`` become one ``error:`` line and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return body(args)
    except user_errors as err:
        if debug_requested(args.debug):
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
