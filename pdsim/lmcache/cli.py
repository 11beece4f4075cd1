"""Command-line options of the simulator's LMCache PD mode (names follow LMCache's YAML keys)."""

from __future__ import annotations

import argparse

from pdsim.lmcache.config import DEFAULT_CHUNK_SIZE, LMCacheSimConfig, Switches


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated port list") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"{text!r} has an invalid port")
    return ports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LMCache PD mode (LMCacheConnectorV1, enable_pd)")
    g.add_argument(
        "--lmcache-role",
        choices=("sender", "receiver"),
        default=None,
        help="pd_role: sender (prefiller: pushes KV, notifies the proxy) or receiver (decoder). "
        "Unset: no LMCache mode.",
    )
    g.add_argument("--tp", type=int, default=1, help="Emulated tensor-parallel size (default 1).")
    g.add_argument(
        "--lmcache-chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"LMCache chunk_size in tokens (default {DEFAULT_CHUNK_SIZE}).",
    )
    g.add_argument("--pd-proxy-host", default="127.0.0.1", help="sender: pd_proxy_host.")
    g.add_argument("--pd-proxy-port", type=int, default=7500, help="sender: pd_proxy_port.")
    g.add_argument("--pd-peer-host", default="127.0.0.1", help="receiver: address to listen on.")
    g.add_argument(
        "--pd-peer-init-port",
        type=_ports,
        default=(7300,),
        help="receiver: pd_peer_init_port, comma-separated, one per TP rank (default 7300).",
    )
    g.add_argument(
        "--pd-peer-alloc-port",
        type=_ports,
        default=(7400,),
        help="receiver: pd_peer_alloc_port, comma-separated, one per TP rank (default 7400).",
    )
    g.add_argument(
        "--lmcache-discard-partial-chunks",
        action="store_true",
        help="sender: save full chunks only, so a prompt shorter than one chunk pushes nothing "
        "and never notifies (LMCache 0.3.12-0.4.1, #2510; discard_partial_chunks: true). "
        "Default: the partial last chunk is saved too, as PD mode does in other versions.",
    )
    g.add_argument(
        "--lmcache-drop-notifications",
        action="store_true",
        help="sender: never send ProxyNotif (tests; also POST /_sim/lmcache).",
    )
    g.add_argument(
        "--lmcache-delay-notifications",
        type=float,
        default=0.0,
        help="sender: seconds to wait before each ProxyNotif (tests).",
    )


def config_from_args(args: argparse.Namespace) -> LMCacheSimConfig | None:
    """The LMCache mode the options ask for; None without --lmcache-role."""
    if args.lmcache_role is None:
        return None
    return LMCacheSimConfig(
        role=args.lmcache_role,
        tp=args.tp,
        chunk_size=args.lmcache_chunk_size,
        proxy_host=args.pd_proxy_host,
        proxy_port=args.pd_proxy_port,
        peer_host=args.pd_peer_host,
        init_ports=args.pd_peer_init_port,
        alloc_ports=args.pd_peer_alloc_port,
        save_unfull_chunk=not args.lmcache_discard_partial_chunks,
        switches=Switches(
            drop_notifications=args.lmcache_drop_notifications,
            delay_notifications=args.lmcache_delay_notifications,
        ),
    )
