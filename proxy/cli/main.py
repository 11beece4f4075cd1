"""Command line: `pdproxy serve`, `pdproxy sim`, `pdproxy demo`, `pdproxy workers`."""

from __future__ import annotations

import argparse
import logging
import sys
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
    parser.add_argument(
        "--kv-events",
        action="store_true",
        help="index prefixes from the engines' KV-cache events (kv_events.enabled)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--busy-poll",
        type=float,
        metavar="SECONDS",
        help="poll instead of sleeping while requests are in flight and SECONDS after the last "
        "one (0: only while in flight); costs a core while polling, saves a halted core's "
        "wake-ups at low concurrency (busy_poll)",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        metavar="N|auto",
        help="serving processes sharing the port (default 1: one process); auto: the usable "
        "cores less one",
    )


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or auto: {text!r}") from None


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
        kv_events={"enabled": True} if args.kv_events else None,
        log_level=args.log_level,
        workers=args.workers,
        busy_poll=args.busy_poll,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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
    if config.serving_processes > 1:
        from proxy.procs.supervisor import run_supervised

        return run_supervised(config)
    from proxy.cli.serve import run_server  # (uvicorn and the app: only to serve)

    return run_server(config)
