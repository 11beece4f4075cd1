"""KV-transfer health: how fast each decoder really pulls its KV, from the engine's own NIXL
metrics, and a warning that names the decoder when the KV moves too slowly to be going GPU to
GPU (the usual cause: UCX falling back to TCP).

Every `interval` seconds each decoder's /metrics (scraped by proxy.scrape.Scraper) gives the
running sums of vLLM's NIXL histograms: transfers (`vllm:nixl_xfer_time_seconds_count`),
seconds spent in them (`_sum`) and bytes (`vllm:nixl_bytes_transferred_sum`). Their differences
over the last `window` seconds give the recent bandwidth (bytes per second of transfer) and the
time per transfer, stored on the worker (`Worker.kv_transfer`) for /stats, /metrics and
conditional disaggregation. A decoder is *slow* once at least `min_bytes` moved in the window at
less than `min_bandwidth`: a warning says so at most every `warn_interval` seconds while it
lasts, and one line when it ends.
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

    def rate(self) -> KvTransfer | None:
        """Transfers in the window, or None when there were none."""
        if len(self._samples) < 2:
            return None
        (t0, a), (t1, b) = self._samples[0], self._samples[-1]
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
    ) -> None:
        self.min_bandwidth = min_bandwidth
        self.window = window
        self.min_bytes = min_bytes
        self.warn_interval = warn_interval
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
        slow = (
            rate is not None
            and rate.nbytes >= self.min_bytes
            and rate.bandwidth < self.min_bandwidth
        )
        if rate is not None:
            rate.slow = slow
        worker.kv_transfer = rate
        if slow:
            assert rate is not None
            if watch.slow_since is None:
                watch.slow_since = now
            if watch.warned_at is None or now - watch.warned_at >= self.warn_interval:
                watch.warned_at = now
                log.warning(
                    "KV transfer to %s worker %s is slow: %.2f GB/s over its last %d pulls "
                    "(%.1f ms and %.0f MB per pull), under kv_health.min_bandwidth %.2f GB/s. %s",
                    worker.role,
                    worker.url,
                    rate.bandwidth / 1e9,
                    rate.transfers,
                    rate.seconds_per_transfer * 1e3,
                    rate.bytes_per_transfer / 1e6,
                    self.min_bandwidth / 1e9,
                    ADVICE,
                )
        elif watch.slow_since is not None and rate is not None and rate.nbytes >= self.min_bytes:
            log.warning(
                "KV transfer to %s worker %s is fast again: %.2f GB/s over its last %d pulls",
                worker.role,
                worker.url,
                rate.bandwidth / 1e9,
                rate.transfers,
            )
            watch.slow_since = watch.warned_at = None

    def forget(self, url: str) -> None:
        self._watches.pop(url, None)
