"""Command-line options of the simulator's LMCache PD mode (names follow LMCache's YAML keys)."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from pdsim.lmcache.config import (
    DEFAULT_BUFFER_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SKIP_LAST_N_TOKENS,
    LMCacheSimConfig,
    Switches,
)

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated port list") from None
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"{text!r} has an invalid port")
    return ports


def _bytes(text: str) -> int:
    """A byte count: a number, or with a K/M/G/T suffix (powers of 1024), as the launcher's."""
    unit = text[-1:].upper() if text[-1:].isalpha() else ""
    number = text[: len(text) - len(unit)]
    try:
        value = int(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (e.g. 2147483648 or 2G)"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return value


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
    size = g.add_mutually_exclusive_group()
    size.add_argument(
        "--lmcache-buffer-size",
        type=_bytes,
        default=None,
        metavar="BYTES",
        help="pd_buffer_size per TP rank, cut into one-chunk pages (chunk_size tokens x 128 KiB "
        "/ TP for the 8B shape): the receiver's receive buffer, the sender's staging buffer. "
        f"Default as the launcher's: {DEFAULT_BUFFER_SIZE['receiver'] // 2**30} GiB for a "
        f"receiver (64 chunks of 256 tokens), {DEFAULT_BUFFER_SIZE['sender'] // 2**30} GiB for "
        "a sender (32).",
    )
    size.add_argument(
        "--lmcache-buffer-chunks",
        type=int,
        default=None,
        metavar="N",
        help="The same buffer given in chunks: N pages.",
    )
    g.add_argument(
        "--lmcache-skip-last-n-tokens",
        type=int,
        default=DEFAULT_SKIP_LAST_N_TOKENS,
        metavar="N",
        help="receiver: vLLM's kv_connector_extra_config.skip_last_n_tokens: a request looks "
        f"up its prompt less its last N tokens (default {DEFAULT_SKIP_LAST_N_TOKENS}, as the "
        "launcher's decoders). With 1, the last pushed chunk is never retrieved and its page "
        "never freed: the buffer fills, one page per request, and the prefiller then stalls. "
        "0 retrieves every pushed chunk.",
    )
    g.add_argument(
        "--lmcache-allocation-timeout",
        type=float,
        default=math.inf,
        metavar="SECONDS",
        help="pd_allocation_timeout_sec: how long a push or a save waits for free pages "
        "(default: forever, as LMCache's).",
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
    config = LMCacheSimConfig(
        role=args.lmcache_role,
        tp=args.tp,
        chunk_size=args.lmcache_chunk_size,
        proxy_host=args.pd_proxy_host,
        proxy_port=args.pd_proxy_port,
        peer_host=args.pd_peer_host,
        init_ports=args.pd_peer_init_port,
        alloc_ports=args.pd_peer_alloc_port,
        save_unfull_chunk=not args.lmcache_discard_partial_chunks,
        buffer_size=args.lmcache_buffer_size,
        skip_last_n_tokens=args.lmcache_skip_last_n_tokens,
        allocation_timeout=args.lmcache_allocation_timeout,
        switches=Switches(
            drop_notifications=args.lmcache_drop_notifications,
            delay_notifications=args.lmcache_delay_notifications,
        ),
    )
    if args.lmcache_buffer_chunks is not None:
        config = replace(config, buffer_size=args.lmcache_buffer_chunks * config.chunk_bytes)
    return config
