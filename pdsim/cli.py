"""``pdproxy sim``: run one simulated vLLM instance until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal

from pdsim.config import (
    DEFAULT_KV_LEASE_SECONDS,
    DEFAULT_MODEL,
    DEFAULT_SIDE_CHANNEL_PORT,
    SimConfig,
    Timing,
)
from pdsim.faults import Faults
from pdsim.kvevents import KvEventsConfig
from pdsim.lmcache import cli as lmcache_cli
from pdsim.profile import TIMING_KEYS, build_timing, load_profile, shipped
from pdsim.server import start_sim

_T = Timing()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's options to ``parser``."""
    a = parser.add_argument
    a(
        "--role",
        choices=("prefill", "decode", "both"),
        default="both",
        help="Label only: every instance serves both NIXL roles, like vLLM kv_both.",
    )
    a("--host", default="127.0.0.1", help="Listen address (default 127.0.0.1).")
    a("--port", type=int, default=8000, help="HTTP port (0 picks a free one; default 8000).")
    a("--model", default=DEFAULT_MODEL, help=f"Served model name (default {DEFAULT_MODEL}).")
    a("--max-model-len", type=int, default=16384, help="Context length (default 16384).")
    a("--max-num-seqs", type=int, default=256, help="Max running sequences (default 256).")
    a(
        "--max-num-batched-tokens",
        type=int,
        default=8192,
        help="Prefill token budget per engine step (default 8192).",
    )
    a("--num-gpu-blocks", type=int, default=32768, help="KV blocks of 16 tokens (default 32768).")
    a(
        "--side-channel-host",
        default="127.0.0.1",
        help="Host returned as remote_host (VLLM_NIXL_SIDE_CHANNEL_HOST; default 127.0.0.1).",
    )
    a(
        "--side-channel-port",
        type=int,
        default=None,
        help="KV side-channel port (vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT, read when this is not "
        f"given; vLLM's default is {DEFAULT_SIDE_CHANNEL_PORT}). Given neither, a free port is "
        "taken and printed: it travels in kv_transfer_params, so instances started side by side "
        "need no flags. 0 = pick free.",
    )
    a(
        "--kv-lease-seconds",
        type=float,
        default=DEFAULT_KV_LEASE_SECONDS,
        help="How long a producer holds unread KV blocks (vLLM kv_connector_extra_config."
        "kv_lease_duration, formerly VLLM_NIXL_ABORT_REQUEST_TIMEOUT; default 30).",
    )
    a(
        "--kv-load-failure-policy",
        choices=("recompute", "fail"),
        default="fail",
        help="On a failed KV pull (unreachable prefiller, unknown request, freed blocks reused "
        "since): fail the request with a 500 (default, as vLLM 0.32's kv_load_failure_policy) or "
        "recompute the prompt. Like NIXL, re-reading blocks after a pull or lease expiry "
        "succeeds. Params missing remote_block_ids or a remote_* key always answer 500: they "
        "crash a real 0.32 decoder (which then exits; the sim stays up).",
    )
    a(
        "--no-kv-transfer",
        action="store_true",
        help="Run like vLLM started without --kv-transfer-config: kv_transfer_params in a "
        "request is ignored and every response carries kv_transfer_params=null.",
    )
    a(
        "--kv-params-on-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Hold KV and return kv_transfer_params when a producer request stops on EOS or a "
        "stop token id, as vLLM 0.32 does (default); --no-kv-params-on-eos: only on the length "
        "cap, as older vLLM. A stop string, an abort or an error always gives null.",
    )
    a(
        "--enable-request-id-headers",
        action="store_true",
        help="Answer with an X-Request-Id header (the client's, else a fresh uuid), as vLLM's flag "
        "of that name; by default, like vLLM, no such header.",
    )
    a(
        "--eos-probability",
        type=float,
        default=0.005,
        help="Chance that a generated token is EOS (default 0.005).",
    )
    a(
        "--token-per-chunk",
        action="store_true",
        help="With --speed-factor 0: stream each token as its own SSE event (as vLLM does at low "
        "load) instead of all tokens in one event; for overhead benchmarks.",
    )
    a(
        "--enable-prefix-caching",
        action="store_true",
        help="Reuse the computed blocks of earlier prompts sharing a prefix (prefill time only; "
        "vLLM's --enable-prefix-caching). Off by default here.",
    )
    a(
        "--scheduling-policy",
        choices=("fcfs", "priority"),
        default="fcfs",
        help="Order of waiting requests (vLLM's --scheduling-policy): arrival (default), or the "
        "request's `priority` (lower first, arrival within one). Either way `priority` is "
        "accepted, as vLLM 0.32 does.",
    )
    a("--engine-id", default=None, help="NIXL engine id (default: a random UUID).")
    g = parser.add_argument_group(
        "timing (defaults: Llama-3.1-8B bf16 on one H100, estimated; --timing-profile for measured)"
    )
    g.add_argument(
        "--timing-profile",
        metavar="NAME|FILE",
        help="Load the delays from a timing profile: one shipped "
        f"({', '.join(shipped())}) or a JSON file; the flags below override it.",
    )
    g.add_argument(
        "--speed-factor",
        type=float,
        default=1.0,
        help="Multiplies every delay; 0 = no delay at all (default 1).",
    )
    g.add_argument(
        "--prefill-ms-per-token",
        type=float,
        default=None,
        help=f"Prefill cost per prompt token (default {_T.prefill_ms_per_token}).",
    )
    g.add_argument(
        "--prefill-overhead-ms",
        type=float,
        default=None,
        help=f"Fixed cost of a step with prefill (default {_T.prefill_overhead_ms}).",
    )
    g.add_argument(
        "--decode-base-ms",
        type=float,
        default=None,
        help=f"Fixed cost of an engine step (default {_T.decode_base_ms}).",
    )
    g.add_argument(
        "--decode-ms-per-seq",
        type=float,
        default=None,
        help=f"Step cost per decoding sequence (default {_T.decode_ms_per_seq}).",
    )
    g.add_argument(
        "--xfer-overhead-ms",
        type=float,
        default=None,
        help=f"Fixed cost of one KV pull (default {_T.xfer_overhead_ms}).",
    )
    g.add_argument(
        "--xfer-ms-per-block",
        type=float,
        default=None,
        help=f"Pull cost per 16-token block (default {_T.xfer_ms_per_block}).",
    )
    f = parser.add_argument_group("faults (same keys as POST /_sim/faults)")
    f.add_argument(
        "--fault-count",
        type=int,
        default=None,
        help="Faults apply to this many generation requests (default: all).",
    )
    f.add_argument(
        "--fault-status",
        type=int,
        default=None,
        help="Answer generation requests with this HTTP status and an OpenAI error.",
    )
    f.add_argument(
        "--fault-stall-seconds", type=float, default=0.0, help="Stall this long before answering."
    )
    f.add_argument(
        "--fault-drop-after-chunks",
        type=int,
        default=None,
        help="Drop the connection after this many stream chunks.",
    )
    f.add_argument(
        "--fault-exit-after-chunks",
        type=int,
        default=None,
        help="Die (SIGKILL of the whole engine process) after this many stream chunks.",
    )
    f.add_argument(
        "--fault-error-event-after-chunks",
        type=int,
        default=None,
        help='Send a data: {"error": ...} event after this many chunks.',
    )
    f.add_argument("--fault-garbage-body", action="store_true", help="Send a non-JSON body.")
    f.add_argument("--fault-truncate-body", action="store_true", help="Send half a body.")
    f.add_argument("--fault-unhealthy", action="store_true", help="/health answers 503.")
    f.add_argument(
        "--fault-kv-xfer-gbps",
        type=float,
        default=None,
        metavar="GBPS",
        help="As a decoder, pull KV at this many GB/s (8B-shape KV: 128 KiB per token), as over "
        "TCP; seen in vllm:nixl_bytes_transferred and vllm:nixl_xfer_time_seconds.",
    )
    f.add_argument(
        "--fault-side-channel-error", action="store_true", help="Every side-channel read fails."
    )
    a("--log-level", default="INFO", help="Logging level (default INFO).")
    a(
        "--kv-events-config",
        default=None,
        help='vLLM\'s KV-cache events, as JSON: {"enable_kv_cache_events": true, "publisher": '
        '"zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"} (pdsim.kvevents).',
    )
    lmcache_cli.add_arguments(parser)


def side_channel_port(given: int | None) -> int:
    """The flag, else VLLM_NIXL_SIDE_CHANNEL_PORT as vLLM reads it, else 0 (a free port)."""
    if given is not None:
        return given
    env = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT")
    if env is None:
        return 0
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"VLLM_NIXL_SIDE_CHANNEL_PORT={env!r} is not a port number") from None


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build a ``SimConfig`` from parsed options."""
    profile = load_profile(args.timing_profile) if args.timing_profile else None
    timing = build_timing(profile, {k: getattr(args, k) for k in TIMING_KEYS}, args.speed_factor)
    faults = Faults(
        count=args.fault_count,
        error_status=args.fault_status,
        stall_seconds=args.fault_stall_seconds,
        drop_after_chunks=args.fault_drop_after_chunks,
        exit_after_chunks=args.fault_exit_after_chunks,
        error_event_after_chunks=args.fault_error_event_after_chunks,
        garbage_body=args.fault_garbage_body,
        truncate_body=args.fault_truncate_body,
        unhealthy=args.fault_unhealthy,
        side_channel_error=args.fault_side_channel_error,
        kv_xfer_gbps=args.fault_kv_xfer_gbps,
    )
    return SimConfig(
        role=args.role,
        host=args.host,
        port=args.port,
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_gpu_blocks=args.num_gpu_blocks,
        side_channel_host=args.side_channel_host,
        side_channel_port=side_channel_port(args.side_channel_port),
        kv_lease_seconds=args.kv_lease_seconds,
        kv_load_failure_policy=args.kv_load_failure_policy,
        kv_params_on_eos=args.kv_params_on_eos,
        request_id_headers=args.enable_request_id_headers,
        kv_transfer=not args.no_kv_transfer,
        eos_probability=args.eos_probability,
        token_per_chunk=args.token_per_chunk,
        prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        engine_id=args.engine_id,
        timing=timing,
        faults=faults,
        lmcache=lmcache_cli.config_from_args(args),
        kv_events=KvEventsConfig.parse(args.kv_events_config) if args.kv_events_config else None,
    )


async def _main(config: SimConfig) -> None:
    server = await start_sim(config)
    print(
        f"pdsim {config.role} serving {config.model} on {server.url} "
        f"(side channel {config.side_channel_host}:{server.side_channel_port}, "
        f"engine {server.engine_id})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await server.close()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status."""
    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"pdsim: invalid options: {e}")
        return 2
    try:
        asyncio.run(_main(config))
    except OSError as e:
        print(f"pdsim: cannot listen: {e}")
        return 1
    return 0
