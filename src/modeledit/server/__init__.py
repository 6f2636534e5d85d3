"""The edit service: a FastAPI app over a model and its ledger, and a static web page (no build step).

    modeledit serve --model default --db edits.db           # http://127.0.0.1:8000/

See ``app.py`` for the endpoints and the concurrency design.
"""

from __future__ import annotations

import copy
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .app import MIN_TOKEN_CHARS, TOKEN_ENV, Limits, check_bind, create_app, is_loopback, token_fingerprint

__all__ = [
    "MIN_TOKEN_CHARS",
    "TOKEN_ENV",
    "Limits",
    "PathOnly",
    "ServerThread",
    "check_bind",
    "create_app",
    "is_loopback",
    "log_config",
    "serve",
    "token_fingerprint",
]


class PathOnly(logging.Filter):
    """Drop the query string from uvicorn's access log lines: a secret sent as ``?token=`` is not logged.

    uvicorn logs ``'%s - "%s %s HTTP/%s" %d'`` with (client, method, path?query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, with ``PathOnly`` on its access logger."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["path_only"] = {"()": PathOnly}
    config["loggers"]["uvicorn.access"]["filters"] = ["path_only"]
    return config


def serve(
    model,
    tokenizer,
    db: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
) -> None:
    """Replay the ledger onto the model and serve until interrupted."""
    import uvicorn

    from ..ledger import Ledger

    check_bind(host, token)
    ledger = Ledger(db)
    # On loopback, only Host headers naming this machine (no DNS rebinding from a web page); IPv6 literals in
    # Host headers are not parsed by the middleware, so an IPv6 bind is left unchecked.
    allowed = ["localhost", "127.0.0.1", host] if is_loopback(host) and ":" not in host else None
    app = create_app(model, tokenizer, ledger, token=token, limits=limits, allowed_hosts=allowed)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=log_config())
    finally:
        ledger.close()


class ServerThread:
    """Run an app with uvicorn in a background thread on a free loopback port (tests, benchmarks).

    with ServerThread(app) as server:
        httpx.get(server.url + "/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, **config: Any):
        """``config``: more ``uvicorn.Config`` settings (e.g. ``log_level``, ``log_config``)."""
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        settings = {"log_level": "warning", "lifespan": "off"} | config
        self.server = uvicorn.Server(uvicorn.Config(app, **settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
