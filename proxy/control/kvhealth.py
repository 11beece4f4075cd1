"""KV-transfer health: how fast each decoder really pulls its KV, from the engine's own NIXL
metrics, and a warning that names the decoder when the KV moves too slowly to be going GPU to
GPU (the usual cause: UCX falling back to TCP).

Every `interval` seconds each decoder's /metrics (scraped by proxy.scrape.Scraper) gives the
running sums of vLLM's NIXL histograms: transfers (`vllm:nixl_xfer_time_seconds_count`),
seconds spent in them (`_sum`) and bytes (`vllm:nixl_bytes_transferred_sum`). Their differences
over the last `window` seconds give the recent bandwidth (bytes per second of transfer) and the
time per transfer, stored on the worker (`Worker.kv_transfer`) for /stats, /metrics and
conditional disaggregation. A decoder is judged once its warm-up is behind it (the engine's first
`warmup_pulls` pulls, which register memory and connect, are left out of the window) and once the
window holds at least `min_pulls` pulls and `min_bytes` bytes; it is *slow* when they moved at
less than `min_bandwidth`: a warning says so at most every `warn_interval` seconds while it lasts,
and one line at INFO when it ends. The warning's advice depends on what is known of the engines'
UCX_CUDA_IPC_ENABLE_GET_ZCOPY (`engine_get_zcopy`, as the launcher set it): recommending the
setting the engines already have would send the reader in a circle.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

from proxy.control.workers import KvTransfer, Worker
from proxy.engines.promtext import sample_sums

log = logging.getLogger("pdproxy")

COUNT = "vllm:nixl_xfer_time_seconds_count"
SECONDS = "vllm:nixl_xfer_time_seconds_sum"
BYTES = "vllm:nixl_bytes_transferred_sum"

ADVICE = (
    "The KV is most likely moving over TCP instead of GPU to GPU. NIXL's UCX backend turns off "
    "cuda_ipc reads (the decoder's pull) where NVML reports no NVLink, as on PCIe-only and "
    "virtualised hosts: set UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y in the environment of every engine "
    "(launchers/disagg.sh does unless told otherwise) and restart them; between hosts, make "
    "sure UCX_TLS allows an RDMA transport."
)
ADVICE_ZCOPY_SET = (
    "The engines already run with UCX_CUDA_IPC_ENABLE_GET_ZCOPY=%s (as launched), so cuda_ipc "
    "reads are allowed: look elsewhere. A pull of many small pieces is slow even GPU to GPU "
    "(vLLM's per-layer layout moves one descriptor per layer and block: try larger blocks, "
    "--cross-layer-blocks, more NIXL threads); between hosts, make sure UCX_TLS allows an RDMA "
    "transport."
)


def advice(engine_get_zcopy: str | None) -> str:
    """What to check, given the engines' UCX_CUDA_IPC_ENABLE_GET_ZCOPY where it is known."""
    if engine_get_zcopy is not None and engine_get_zcopy.lower() in ("y", "yes", "1", "on"):
        return ADVICE_ZCOPY_SET % engine_get_zcopy
    return ADVICE


@dataclass(frozen=True, slots=True)
class TransferTotals:
    """Running sums of one engine's NIXL transfer histograms."""

    transfers: float
    seconds: float
    nbytes: float


def parse_transfer_totals(text: bytes) -> TransferTotals | None:
    """The three sums from a Prometheus text exposition, summed over label sets; None when the
    engine has no NIXL transfer metrics (no NixlConnector, or a build without them)."""
    found = sample_sums(text, (COUNT, SECONDS, BYTES))
    if COUNT not in found or SECONDS not in found:
        return None
    return TransferTotals(found[COUNT], found[SECONDS], found.get(BYTES, 0.0))


class TransferWindow:
    """Samples of the running sums; the rate between the oldest kept and the newest."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._samples: deque[tuple[float, TransferTotals]] = deque()

    def add(self, now: float, totals: TransferTotals) -> None:
        if self._samples and totals.transfers < self._samples[-1][1].transfers:
            self._samples.clear()  # the engine restarted: its sums began again
        self._samples.append((now, totals))
        # keep the newest sample at or before the window's start as the base of the difference
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self, after: float = 0) -> KvTransfer | None:
        """Transfers in the window, or None when there were none. With `after`, the base is the
        first sample whose running count reached it: the engine's first pulls stay out."""
        base = next((i for i, (_, s) in enumerate(self._samples) if s.transfers >= after), None)
        if base is None or base >= len(self._samples) - 1:
            return None
        (t0, a), (t1, b) = self._samples[base], self._samples[-1]
        transfers = round(b.transfers - a.transfers)
        seconds = b.seconds - a.seconds
        if transfers <= 0 or seconds <= 0:
            return None
        return KvTransfer(transfers, seconds, b.nbytes - a.nbytes, t1 - t0)


@dataclass(slots=True)
class _Watch:
    window: TransferWindow
    slow_since: float | None = None
    warned_at: float | None = None


class KvHealth:
    """Judges each decoder's recent transfers; logs when one is slow and when it recovers."""

    def __init__(
        self,
        min_bandwidth: float,
        window: float,
        min_bytes: float,
        warn_interval: float,
        clock: Callable[[], float] = monotonic,
        *,
        min_pulls: int = 1,
        warmup_pulls: int = 0,
        engine_get_zcopy: str | None = None,
    ) -> None:
        self.min_bandwidth = min_bandwidth
        self.window = window
        self.min_bytes = min_bytes
        self.warn_interval = warn_interval
        self.min_pulls = min_pulls
        self.warmup_pulls = warmup_pulls
        self.advice = advice(engine_get_zcopy)
        self._clock = clock
        self._watches: dict[str, _Watch] = {}

    def observe_metrics(self, worker: Worker, raw: bytes | None) -> None:
        """A scrape of the worker's /metrics (proxy.scrape.Scraper); an unreadable engine keeps
        its last judgement, since the health checks report it."""
        if raw is not None:
            self.observe(worker, parse_transfer_totals(raw))

    def observe(self, worker: Worker, totals: TransferTotals | None) -> None:
        if totals is None:
            worker.kv_transfer = None
            return
        now = self._clock()
        watch = self._watches.get(worker.url)
        if watch is None:
            watch = self._watches[worker.url] = _Watch(TransferWindow(self.window))
        watch.window.add(now, totals)
        rate = watch.window.rate()
        # judged only past the engine's warm-up, over enough pulls and bytes
        judged = watch.window.rate(after=self.warmup_pulls)
        enough = (
            judged is not None
            and judged.transfers >= self.min_pulls
            and judged.nbytes >= self.min_bytes
        )
        slow = enough and judged is not None and judged.bandwidth < self.min_bandwidth
        if rate is not None:
            rate.slow = slow
        worker.kv_transfer = rate
        if slow:
            assert judged is not None
            if watch.slow_since is None:
                watch.slow_since = now
            if watch.warned_at is None or now - watch.warned_at >= self.warn_interval:
                watch.warned_at = now
                log.warning(
                    "KV transfer to %s worker %s is slow: %.2f GB/s over its last %d pulls "
                    "(%.1f ms and %.0f MB per pull), under kv_health.min_bandwidth %.2f GB/s. %s",
                    worker.role,
                    worker.url,
                    judged.bandwidth / 1e9,
                    judged.transfers,
                    judged.seconds_per_transfer * 1e3,
                    judged.bytes_per_transfer / 1e6,
                    self.min_bandwidth / 1e9,
                    self.advice,
                )
        elif watch.slow_since is not None and enough and judged is not None:
            log.info(
                "KV transfer to %s worker %s is fast again: %.2f GB/s over its last %d pulls",
                worker.role,
                worker.url,
                judged.bandwidth / 1e9,
                judged.transfers,
            )
            watch.slow_since = watch.warned_at = None

    def forget(self, url: str) -> None:
        self._watches.pop(url, None)
