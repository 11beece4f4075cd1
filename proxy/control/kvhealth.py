"""KV-transfer health: how fast each decoder really receives its KV, from the engine's own
transfer metrics, and a warning that names the decoder when the KV moves too slowly to be going
GPU to GPU (with NIXL, the usual cause: UCX falling back to TCP).

The connector names the metrics (`TransferMetrics`; NIXL: vLLM's histograms
`vllm:nixl_xfer_time_seconds` and `vllm:nixl_bytes_transferred`); a connector without any has no
KV health. Every `interval` seconds each decoder's /metrics (scraped by
proxy.engines.scrape.Scraper) gives their running sums: transfers, seconds spent in them and
bytes. Their differences
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
from dataclasses import dataclass, field
from time import monotonic

from proxy.control.workers import KvTransfer, Worker
from proxy.engines.connectors.base import TransferMetrics
from proxy.engines.promtext import Samples
from proxy.engines.scrape import Watch

log = logging.getLogger("pdproxy")


def advice(source: TransferMetrics, engine_get_zcopy: str | None) -> str:
    """What to check, given the engines' UCX_CUDA_IPC_ENABLE_GET_ZCOPY where it is known."""
    zcopy = engine_get_zcopy is not None and engine_get_zcopy.lower() in ("y", "yes", "1", "on")
    if zcopy and source.zcopy_set_advice:
        return source.zcopy_set_advice % engine_get_zcopy
    return source.slow_advice


@dataclass(frozen=True, slots=True)
class TransferTotals:
    """Running sums of one engine's transfer metrics."""

    transfers: float
    seconds: float
    nbytes: float


def transfer_totals(samples: Samples, source: TransferMetrics) -> TransferTotals | None:
    """The three sums, each over its label sets; None when the engine has no transfer metrics
    (with NIXL: no NixlConnector, or a build without them)."""
    count, seconds = samples.sum(source.count), samples.sum(source.seconds)
    if count is None or seconds is None:
        return None
    return TransferTotals(count, seconds, samples.sum(source.nbytes) or 0.0)


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


@dataclass(eq=False)
class KvHealth:
    """Judges each decoder's recent transfers; logs when one is slow and when it recovers."""

    source: TransferMetrics  # the connector's names of the decoders' transfer metrics
    min_bandwidth: float  # bytes per second under which a decoder's transfers are slow
    window: float  # seconds of transfers judged together
    min_bytes: float  # that must move in the window before judging
    warn_interval: float  # seconds between repeated warnings
    clock: Callable[[], float] = monotonic
    min_pulls: int = 1  # pulls the window must hold before judging
    warmup_pulls: int = 0  # the engine's first pulls, left out of every window
    engine_get_zcopy: str | None = None  # the engines' UCX_CUDA_IPC_ENABLE_GET_ZCOPY, if known
    _watches: dict[str, _Watch] = field(default_factory=dict, init=False)

    def watch(self, interval: float, timeout: float) -> Watch:
        """What the scraper reads for it: the decoders' transfer metrics, and the pool
        engines' (draining ones still receive)."""
        names = (self.source.count, self.source.seconds, self.source.nbytes)
        return Watch(names, self.observe_metrics, interval, timeout, frozenset(("decode", "pool")))

    def observe_metrics(self, worker: Worker, samples: Samples | None) -> None:
        """A scrape of the worker's /metrics; an unreadable engine keeps its last judgement,
        since the health checks report it."""
        if samples is not None:
            self.observe(worker, transfer_totals(samples, self.source))

    def observe(self, worker: Worker, totals: TransferTotals | None) -> None:
        if totals is None:
            worker.kv_transfer = None
            return
        now = self.clock()
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
                    advice(self.source, self.engine_get_zcopy),
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
