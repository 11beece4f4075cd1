"""Running one proxy under uvicorn until a signal stops it (`pdproxy serve`, `pdproxy demo`)."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import types
from typing import Any, Protocol

import uvicorn

from proxy import __version__
from proxy.app import ProxyApp, build_app
from proxy.config import ConfigError, ProxyConfig
from proxy.serve.busypoll import polling


class Drains(Protocol):
    """An app that drains on a signal (proxy.app.ProxyApp, proxy.procs.serving.ServingApp)."""

    def begin_drain(self) -> None: ...


class Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT the app drains before uvicorn stops."""

    def __init__(self, uv_config: uvicorn.Config, proxy: Drains) -> None:
        super().__init__(uv_config)
        self.proxy = proxy
        self.stopped_by: int | None = None  # the first signal that stopped it

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        self.stopped_by = self.stopped_by or sig
        self.proxy.begin_drain()
        super().handle_exit(sig, frame)


def uvicorn_config(app: Any, config: ProxyConfig) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        loop=config.event_loop,
        http="httptools",
        proxy_headers=False,  # no X-Forwarded-* rewriting: the proxy never uses the address
        lifespan="on",
        access_log=False,
        log_level=config.log_level,
        # in-flight requests get drain_timeout, then end with an error event (ProxyApp)
        timeout_graceful_shutdown=int(config.drain_timeout) + 5,
    )


def log_start(config: ProxyConfig) -> None:
    logging.getLogger("pdproxy").info(
        "pdproxy %s on http://%s:%d  loop=%s  connector=%s  prefill=%s  decode=%s%s",
        __version__,
        config.host,
        config.port,
        config.event_loop,
        config.connector,
        ",".join(w.url for w in config.prefill),
        ",".join(w.url for w in config.decode),
        f"  pool={','.join(w.url for w in config.pool)} ({config.pool_mode})"
        if config.pool
        else "",
    )


def build_and_bind(config: ProxyConfig) -> tuple[ProxyApp, list[socket.socket]] | None:
    """The app and its listening sockets; None, with the reason on stderr, when the config is
    unusable or the address cannot be had."""
    try:
        return build_app(config), bind(config)
    except ConfigError as exc:
        print(f"pdproxy: {exc}", file=sys.stderr)
        return None


def run_server(config: ProxyConfig) -> int:
    """Serve until stopped; the exit status says what stopped it (2: the config is unusable)."""
    built = build_and_bind(config)
    if built is None:
        return 2
    app, sockets = built
    log_start(config)
    return serve(Server(uvicorn_config(polling(app, config), config), app), sockets)


def bind(config: ProxyConfig) -> list[socket.socket]:
    """`listen` on the configured address; ConfigError saying what to change when it cannot."""
    try:
        return listen(config.host, config.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            why = f"port {config.port} is taken on {config.host}; pass --port N"
        else:
            why = f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        raise ConfigError(why) from None


def serve(server: Server, sockets: list[socket.socket]) -> int:
    """Run `server` on `sockets` until a signal stops it; the exit status says which."""
    # uvicorn restores the handlers it found and re-raises the signal that stopped it, once it has
    # shut down gracefully: turn SIGTERM, like Ctrl+C, into an exception, so that callers' clean-up
    # (the demo stopping its engines) runs instead of the process dying at the default action.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    # uvicorn re-raises the signal once it has shut down, but asyncio's runner can swallow a
    # re-raised SIGINT when its task is already ending: the exit status still says what stopped it
    return 0 if server.stopped_by is None else 128 + server.stopped_by


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` resolves to, as uvicorn's own start would bind them
    (asyncio's create_server); bound before anything starts, so that a port in use is one clear
    line, not a started lifespan, uvicorn's log and exit status 3. OSError when one cannot be
    bound."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Terminated(Exception):
    """SIGTERM arrived (and uvicorn has already drained and stopped)."""


def _terminated(signum: int, frame: types.FrameType | None) -> None:
    raise _Terminated
