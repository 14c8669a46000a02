"""What a client is told about a failure on our side: a reference, never the exception.

Exception text names server paths, internal URLs and library internals; only the operator
should see it. :func:`internal_error` logs the traceback under a short reference and returns
the client's line, which carries the reference so the operator can find the log entry.
"""
from __future__ import annotations

import logging
import secrets


def internal_error(logger: logging.Logger, what: str) -> str:
    """Log the exception being handled (``what``: the request) under a new reference; the
    client's message. Call from an ``except`` block."""
    reference = "err_" + secrets.token_hex(4)
    logger.exception("%s failed [%s]", what, reference)
    return f"internal error (reference {reference}); the server log has the details"
