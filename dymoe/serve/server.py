"""Running the app under uvicorn: in the foreground (``dymoe serve``) or in a background thread (tests, load runs)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from dymoe.errors import InputError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one. Binding here turns "address in use" into one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only then, and without it Nagle's
    # algorithm holds each response body behind its headers for a delayed ACK (measured: 44 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, log_level: str = "info") -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, lifespan="on")
    return uvicorn.Server(config)


class BackgroundServer:
    """uvicorn in a daemon thread: ``with BackgroundServer(app) as server: server.url``.

    Port 0 (the default) picks a free one. ``on_exit`` runs when the server stops for any reason
    (``dymoe serve`` passes the scheduler's ``stop``, so the engine loop on the main thread ends too).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", on_exit=None):
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(app, log_level)
        self.on_exit = on_exit
        self.thread = threading.Thread(target=self._run, daemon=True, name="dymoe-http")

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
