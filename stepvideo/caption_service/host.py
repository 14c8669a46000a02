"""``ServiceServer``: the HTTP host around the app (waitress, or Flask's development server).

The socket is bound at construction, so :attr:`port` is known (``config.port = 0`` picks a
free one) before serving starts, and a busy port fails before any model is loaded.
:meth:`start` serves from a background thread; the launcher's main thread loads the models and
then waits for a signal, so signals only ever interrupt code that expects them.

Threads: waitress runs ``config.threads`` + :data:`~.config.STATUS_THREADS` workers. Model
requests beyond ``config.threads`` are refused by the app's admission check (503 at once), so
at least ``STATUS_THREADS`` workers are always free for ``/health``, ``/ready`` and refusals.
Connections: :mod:`.connections` (``connection_limit``, ``channel_timeout``), so idle or slow
connections cannot hold every slot.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

from flask import Flask

from .config import STATUS_THREADS, ServiceConfig
from .connections import waitress_options

logger = logging.getLogger(__name__)


class ServiceServer:
    """A bound HTTP server for ``app``."""

    def __init__(self, app: Flask, config: ServiceConfig):
        self.config = config
        self._thread: Optional[threading.Thread] = None
        if config.dev_server:
            from werkzeug.serving import make_server

            self._server = make_server(config.host, config.port, app, threaded=True)
            self.port = self._server.server_port
        else:
            from waitress import create_server

            self._server = create_server(
                app, host=config.host, port=config.port, threads=config.threads + STATUS_THREADS,
                ident="stepvideo",
                # the app answers oversized bodies with a JSON 413; waitress's own limit is a backstop
                max_request_body_size=config.max_body_bytes + (1 << 20),
                inbuf_overflow=min(config.max_body_bytes, 64 << 20),   # typical requests stay in memory
                clear_untrusted_proxy_headers=True,
                **waitress_options(config.connection_limit, config.channel_timeout))
            self.port = self._server.effective_port

    def run(self) -> None:
        """Serve in this thread until :meth:`close` (or KeyboardInterrupt in the main thread)."""
        if self.config.dev_server:
            try:
                self._server.serve_forever()
            except KeyboardInterrupt:
                pass
        else:
            self._server.run()

    def start(self) -> "ServiceServer":
        """Serve from a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="stepvideo-http", daemon=True)
        self._thread.start()
        return self

    def wait(self, poll: float = 0.5) -> None:
        """Block until the serving thread ends; signals reach the caller between polls."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(poll)

    def close(self) -> None:
        """Stop serving and release the port. Runs the socket teardown on the serving thread's
        own loop (waitress' trigger), so that thread never polls a closed socket."""
        serving = self._thread is not None and self._thread.is_alive()
        try:
            if self.config.dev_server:
                if serving:
                    self._server.shutdown()
                self._server.server_close()
            elif serving:
                from waitress import wasyncore

                self._server.trigger.pull_trigger(lambda: wasyncore.close_all(self._server._map))
                self._thread.join(5)
                self._server.task_dispatcher.shutdown(timeout=1)
            else:
                self._server.close()
                self._server.task_dispatcher.shutdown(timeout=1)
        except Exception:  # noqa: BLE001 - closing is best effort
            logger.debug("closing the server failed", exc_info=True)
