"""How an entry point ends: one line per failure, exit codes, and never outliving its launcher.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        return run_main(lambda: work(args), debug=args.debug)

Exit codes: 0 success, 2 a user error (one line ``error: ...``; see :mod:`stepvideo.errors`),
1 anything else (one line, plus the traceback with ``--debug`` / ``STEPVIDEO_DEBUG=1``),
130 interrupted.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Callable, Optional

from .errors import DEBUG_ENV, is_user_error, one_line

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` or ``STEPVIDEO_DEBUG`` set to anything but empty/0/false."""
    env = os.environ.get(DEBUG_ENV, "").strip().lower()
    return bool(flag) or env not in ("", "0", "false", "no")


def report(exc: BaseException, debug: bool = False) -> int:
    """Print ``exc`` as one ``error:`` line (traceback first with ``debug``); return the exit code."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    user = is_user_error(exc)
    line = f"error: {one_line(exc)}"
    if not user and not debug:
        line += f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
    _print_line(line)
    return EXIT_USER_ERROR if user else EXIT_FAILURE


def _print_line(line: str) -> None:
    """One write per line: ranks share the launcher's stderr, and ``print`` writes the text and
    the newline separately, so two ranks' lines could interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_main(body: Callable[[], int], debug: bool = False) -> int:
    """Call ``body`` and turn any exception into one line and an exit code."""
    debug = debug_requested(debug)
    try:
        return body()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:            # the one place where every failure becomes a line and a code
        return report(exc, debug)


def exit_now(code: int) -> None:
    """Flush and leave without running C++ destructors of a possibly broken process group
    (a plain ``sys.exit`` after a failed collective can end in SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def watch_launcher(interval: float = 1.0, on_exit: Optional[Callable[[], None]] = None) -> Optional[threading.Thread]:
    """Under torchrun: exit this worker when its launcher dies (the parent PID changes).

    A daemon thread polls ``os.getppid()``; when the launcher is gone (killed with SIGKILL, so
    it could not stop its workers) the worker prints one line and exits with code 1 at once.
    Files are written atomically, so nothing half-written is left behind. Returns the thread,
    or None when not launched by torchrun.
    """
    if not under_torchrun():
        return None
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                rank = os.environ.get("RANK", "?")
                _print_line(f"error: rank {rank}: the torchrun launcher (pid {parent}) is gone; stopping this worker")
                if on_exit is not None:
                    on_exit()
                exit_now(EXIT_FAILURE)

    thread = threading.Thread(target=watch, name="stepvideo-launcher-watch", daemon=True)
    thread.start()
    return thread


def run_ranks(state, body: Callable[[], object], debug: bool = False):
    """Run ``body`` on this rank, then tear the process group down.

    A failure in a multi-rank run has already been shared by every rank (see
    :mod:`stepvideo.parallel.agree`): each rank prints the same line and leaves at once, without
    tearing down a group that may be broken. At world size 1 the exception propagates to
    :func:`run_main`.
    """
    try:
        result = body()
    except Exception as exc:
        if not state.distributed:
            raise
        exit_now(report(exc, debug_requested(debug)))
    state.destroy()
    return result
