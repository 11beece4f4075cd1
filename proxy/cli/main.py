"""Command line: `pdproxy serve`, `pdproxy sim`, `pdproxy demo`, `pdproxy workers`."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import socket
import sys
import types
from collections.abc import Sequence

from proxy import __version__
from proxy.config import ConfigError, ProxyConfig, load_config


def _serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file; flags override its values")
    parser.add_argument(
        "--prefill", action="append", metavar="URL", help="prefiller base URL (repeatable)"
    )
    parser.add_argument(
        "--decode", action="append", metavar="URL", help="decoder base URL (repeatable)"
    )
    parser.add_argument(
        "--pool",
        action="append",
        metavar="URL",
        help="base URL of an engine that prefills and decodes, NIXL kv_both (repeatable)",
    )
    parser.add_argument(
        "--pool-mode",
        choices=["adaptive", "colocated"],
        help="adaptive (default): the planner splits requests into prefill and decode per "
        "request; colocated: every request whole on one engine, no PD",
    )
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 9100)")
    parser.add_argument("--connector", help="KV-transfer protocol: nixl (default) | lmcache")
    policies = "round_robin | least_loaded (default) | load_aware | prefix_aware"
    parser.add_argument("--prefill-policy", help=policies)
    parser.add_argument("--decode-policy", help=policies)
    parser.add_argument(
        "--stats-interval", type=float, help="seconds between latency log blocks; 0 = off"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    stats = {"interval": args.stats_interval} if args.stats_interval is not None else None
    return load_config(
        args.config,
        prefill=args.prefill,
        decode=args.decode,
        pool=args.pool,
        pool_mode=args.pool_mode,
        host=args.host,
        port=args.port,
        connector=args.connector,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        stats=stats,
        log_level=args.log_level,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def run_server(config: ProxyConfig) -> int:
    import uvicorn

    from proxy.app import ProxyApp, build_app

    class Server(uvicorn.Server):
        """uvicorn, plus: on SIGTERM/SIGINT the app drains before uvicorn stops."""

        def __init__(self, uv_config: uvicorn.Config, proxy: ProxyApp) -> None:
            super().__init__(uv_config)
            self.proxy = proxy
            self.stopped_by: int | None = None  # the first signal that stopped it

        def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
            self.stopped_by = self.stopped_by or sig
            self.proxy.begin_drain()
            super().handle_exit(sig, frame)

    try:
        app = build_app(config)
    except ConfigError as exc:
        print(f"pdproxy: {exc}", file=sys.stderr)
        return 2
    try:
        sockets = listen(config.host, config.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"pdproxy: port {config.port} is taken on {config.host}; pass --port N",
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"pdproxy: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
                  file=sys.stderr)  # fmt: skip
        return 2
    logging.getLogger("pdproxy").info(
        "pdproxy %s on http://%s:%d  connector=%s  prefill=%s  decode=%s%s",
        __version__,
        config.host,
        config.port,
        config.connector,
        ",".join(w.url for w in config.prefill),
        ",".join(w.url for w in config.decode),
        f"  pool={','.join(w.url for w in config.pool)} ({config.pool_mode})"
        if config.pool
        else "",
    )
    server = Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="uvloop",
            http="httptools",
            proxy_headers=False,  # no X-Forwarded-* rewriting: the proxy never uses the address
            lifespan="on",
            access_log=False,
            log_level=config.log_level,
            # in-flight requests get drain_timeout, then end with an error event (ProxyApp)
            timeout_graceful_shutdown=int(config.drain_timeout) + 5,
        ),
        app,
    )
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pdproxy", description="OpenAI-compatible prefill/decode proxy for vLLM"
    )
    parser.add_argument("--version", action="version", version=f"pdproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_args(commands.add_parser("serve", help="run the proxy in front of vLLM engines"))
    sim = commands.add_parser("sim", help="run a simulated vLLM engine")
    demo = commands.add_parser("demo", help="simulated prefiller + decoder + proxy, one command")
    demo.add_argument("--port", type=int, default=9100, help="proxy port (default 9100)")

    from pdsim import cli as sim_cli
    from proxy.cli import workers as workers_cli

    sim_cli.add_arguments(sim)
    workers_cli.add_arguments(
        commands.add_parser("workers", help="list, add or remove a running proxy's workers")
    )
    args = parser.parse_args(argv)

    if args.command == "sim":
        return sim_cli.run(args)
    if args.command == "workers":
        return workers_cli.run(args)
    if args.command == "demo":
        from proxy.cli.demo import run_demo

        setup_logging("info")
        return run_demo(args.port)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"pdproxy: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    return run_server(config)
