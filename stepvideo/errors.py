"""Which failures are the user's to fix, and how to say them in one line.

Entry points print user errors as one line ``error: ...`` and exit with code 2; anything else
is a bug or an environment failure: one line too, exit code 1, and the traceback only with
``--debug`` or ``STEPVIDEO_DEBUG=1``.

User errors: bad arguments and configuration (``ValueError``, ``TypeError`` from our checks),
files and paths (``OSError``: not found, a directory, no permission), checkpoints
(``CheckpointError`` and its ``CheckpointKeyError`` / ``CorruptCheckpointError``), services
(``ServiceError``, ``ServiceConnectionError``, ...), and :class:`UserError` raised anywhere.
"""
from __future__ import annotations


DEBUG_ENV = "STEPVIDEO_DEBUG"


class UserError(Exception):
    """Something the user can fix (a flag, a file, a service); printed as one line, exit 2."""


class PreflightError(UserError, ValueError):
    """A pre-flight check failed before any weight was read."""


class GenerationError(RuntimeError):
    """A generation failed for a reason the user can act on (service down, bad image, ...)."""


class GenerationCancelled(RuntimeError):
    """``should_cancel`` asked to stop; raised on every rank at the same step boundary."""


def _named(exc: BaseException, *names: str) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def is_user_error(exc: BaseException) -> bool:
    """True for the failures a user acts on (see the module docstring)."""
    if isinstance(exc, (UserError, ValueError, OSError)):
        return True
    # matched by name so that importing this module never imports torch or the service client
    return _named(exc, "CheckpointError", "ServiceError", "GenerationError", "RankFailure") and \
        getattr(exc, "user_error", True)


def is_service_error(exc: BaseException) -> bool:
    """The exception, or one it was raised from, is a caption/VAE service failure."""
    seen = 0
    while exc is not None and seen < 10:
        if _named(exc, "ServiceError") or getattr(exc, "service_error", False):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def one_line(exc: BaseException) -> str:
    """``message`` for our own and OS errors, ``Type: message`` otherwise; always a single line."""
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    if not text:
        text = type(exc).__name__
    elif not (isinstance(exc, (UserError, OSError, ValueError)) or _named(
            exc, "CheckpointError", "ServiceError", "GenerationError", "RankFailure")):
        text = f"{type(exc).__name__}: {text}"
    return " ".join(text.split())
