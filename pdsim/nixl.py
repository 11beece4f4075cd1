"""The NIXL protocol as vLLM's NixlConnector (pull mode) speaks it, on both sides.

Producer: a request whose ``kv_transfer_params`` has ``do_remote_decode: true`` keeps its blocks
under lease when it finishes by the length cap, and answers with the params below (the shape of
``NixlPullConnectorScheduler.request_finished`` in vLLM 0.32, plus the scheduler's
``remote_prefill_cached_tokens``). Consumer: a request with ``do_remote_prefill: true`` reads
those blocks over the side channel, checks them against its own prompt, and skips that prefill.
A failed pull fails the request with a 500 (vLLM 0.32's default ``kv_load_failure_policy``,
"fail") or, with "recompute", recomputes the prompt. Params that lack ``remote_block_ids`` or
one of ``REQUIRED_KEYS`` crash a real 0.32 decoder (``assert num_external_tokens == 0`` or a
``KeyError`` in the EngineCore: 500, then the server exits); ``incomplete`` spots them so the
sim can answer that 500 without dying.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from pdsim.config import Timing
from pdsim.kvcache import block_contents, num_blocks_for
from pdsim.metrics import Metrics
from pdsim.shape import BLOCK_SIZE, KV_BYTES_PER_TOKEN, KV_DESCRIPTORS_PER_BLOCK
from pdsim.sidechannel import KvPullError, pull_blocks, release_blocks

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")
KvSource = Literal["local", "pulled", "recomputed"]


def incomplete(params: dict[str, Any]) -> bool:
    """True for ``do_remote_prefill`` params a real vLLM 0.32 decoder cannot even start on."""
    return bool(params.get("do_remote_prefill")) and (
        not params.get("remote_block_ids") or not all(k in params for k in REQUIRED_KEYS)
    )


def producer_params(
    *,
    engine_id: str,
    host: str,
    port: int,
    request_id: str,
    block_ids: list[int],
    num_tokens: int,
    single_step: bool,
) -> dict[str, Any]:
    """The ``kv_transfer_params`` a producer returns for blocks it now holds."""
    params: dict[str, Any] = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [block_ids],
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_host": host,
        "remote_port": port,
        "tp_size": 1,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": num_tokens,
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
    }
    if single_step:
        params["remote_prefill_cached_tokens"] = 0
    return params


@dataclass(frozen=True)
class KvLoad:
    """What a consumer got: ``loaded_tokens`` prompt tokens need no prefill."""

    source: KvSource
    loaded_tokens: int = 0
    failure: str | None = None


class KvLoadFailed(Exception):
    """Raised instead of recomputing when the failure policy is ``fail``."""


def _flat_block_ids(raw: Any) -> list[int] | None:
    if not isinstance(raw, list) or not raw:
        return None
    group = raw[0] if isinstance(raw[0], list) else raw
    if not group or not all(isinstance(b, int) and not isinstance(b, bool) for b in group):
        return None
    return list(group)


class NixlConsumer:
    """Loads remote KV for requests that carry ``do_remote_prefill: true``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timing: Timing,
        metrics: Metrics,
        fail: bool,
        slow_gbps: Callable[[], float | None] = lambda: None,
    ) -> None:
        self._session = session
        self._timing = timing
        self._metrics = metrics
        self._fail = fail
        self._slow_gbps = slow_gbps  # the kv_xfer_gbps fault, read at each pull
        self._releases: set[asyncio.Task[bool]] = set()

    def release_later(self, params: dict[str, Any]) -> None:
        """The request was aborted before its pull: notify the producer to free the blocks
        (vLLM 0.32 does this from `request_finished` for a request still marked
        do_remote_prefill), in the background since the request itself is gone."""
        if not all(params.get(k) is not None for k in REQUIRED_KEYS):
            return
        task = asyncio.create_task(
            release_blocks(
                self._session,
                str(params["remote_host"]),
                int(params["remote_port"]),
                str(params["remote_engine_id"]),
                str(params["remote_request_id"]),
            )
        )
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def load(self, params: dict[str, Any], prompt_ids: list[int]) -> KvLoad:
        """Pull the prompt's KV; a failure raises ``KvLoadFailed`` or recomputes, by policy."""
        block_ids = _flat_block_ids(params.get("remote_block_ids"))
        try:
            if block_ids is None or not all(params.get(k) is not None for k in REQUIRED_KEYS):
                raise KvPullError("invalid_params", f"Unusable KVTransferParams: {params}")
            return await self._pull(params, block_ids, prompt_ids)
        except KvPullError as e:
            self._metrics.failed_transfers += 1
            log.warning("KV load of %s failed: %s", params.get("remote_request_id"), e)
            if self._fail:
                raise KvLoadFailed(str(e)) from e
            self._metrics.recomputed_requests += 1
            return KvLoad("recomputed", failure=e.reason)

    async def _pull(
        self, params: dict[str, Any], block_ids: list[int], prompt_ids: list[int]
    ) -> KvLoad:
        remote_tokens = params.get("remote_num_tokens")
        if not isinstance(remote_tokens, int) or remote_tokens <= 0:
            remote_tokens = len(block_ids) * BLOCK_SIZE
        n_load = min(remote_tokens, len(prompt_ids))
        if remote_tokens > len(prompt_ids) and n_load % BLOCK_SIZE:
            n_load -= n_load % BLOCK_SIZE  # a partial block of a longer sequence cannot match
        n_blocks = num_blocks_for(n_load)
        if n_blocks == 0 or n_blocks > len(block_ids):
            raise KvPullError("bad_blocks", "Remote blocks do not cover the prompt")
        t = self._timing
        nbytes = n_blocks * BLOCK_SIZE * KV_BYTES_PER_TOKEN
        start = time.perf_counter()
        gbps = self._slow_gbps()
        if gbps is not None:  # a slow link, whatever the speed factor
            await asyncio.sleep(nbytes / (gbps * 1e9))
        elif t.enabled:
            delay_ms = t.xfer_overhead_ms + t.xfer_ms_per_block * n_blocks
            await asyncio.sleep(delay_ms * t.speed_factor / 1000.0)
        contents = await pull_blocks(
            self._session,
            str(params["remote_host"]),
            int(params["remote_port"]),
            str(params["remote_engine_id"]),
            str(params["remote_request_id"]),
            block_ids[:n_blocks],
        )
        if contents != block_contents(prompt_ids, n_load):
            raise KvPullError("content_mismatch", "Remote KV does not match this prompt")
        m = self._metrics
        m.xfer_time.observe(time.perf_counter() - start)
        m.post_time.observe(0.0)
        m.bytes_transferred.observe(nbytes)
        m.num_descriptors.observe(n_blocks * KV_DESCRIPTORS_PER_BLOCK)
        m.kv_pulled_requests += 1
        return KvLoad("pulled", loaded_tokens=n_load)
