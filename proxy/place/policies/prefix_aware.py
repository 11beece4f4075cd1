from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

from proxy.control.workers import WorkerState
from proxy.place.policies.base import RequestInfo
from proxy.place.policies.load_aware import estimated_load
from proxy.place.prefix import PrefixIndex


def _rendezvous(key: int, url: str) -> int:
    return zlib.crc32(url.encode(), key & 0xFFFFFFFF)


class PrefixAware:
    """Send a prompt where its prefix was last computed, so the engine's prefix cache hits.

    The prompt's first characters are cut into chained-hash blocks (proxy.place.prefix,
    `RequestInfo.blocks`); an index, shared with the planner,
    remembers which workers recently got each block. The worker with the longest match wins if
    its load (in-flight requests, or the engine's own count when scraped: see load_aware) is
    within `balance_abs` of, or `balance_rel` times, the least loaded one's; otherwise, and for
    a prefix never seen, the choice among the workers within that bound is by rendezvous
    hashing of the first block (the same prefix lands on the same worker, across restarts of
    the index and across proxies). Prompts shorter than one block go to the least loaded
    worker. Where the request's exact counts are known (`RequestInfo.cached`: the planner looked
    the prompt's token ids up in the engines' own KV events, proxy.place.kvindex) and cover
    every candidate, they replace the estimate: the longest exact hit wins within the bound.
    The index is the policy's only state; it never does I/O.
    """

    name = "prefix_aware"

    def __init__(
        self,
        balance_abs: int = 4,
        balance_rel: float = 1.5,
        waiting_weight: float = 2.0,
        index: PrefixIndex | None = None,
    ) -> None:
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.waiting_weight = waiting_weight
        self.index = PrefixIndex() if index is None else index

    def _within_bound(self, load: float, least: float) -> bool:
        """Balanced enough, as sglang's cache-aware router judges it: imbalance needs both the
        absolute and the relative excess."""
        return load <= least + self.balance_abs or load <= least * self.balance_rel

    def select(self, workers: Sequence[WorkerState], request: RequestInfo) -> int | None:
        loads = {
            i: estimated_load(w, self.waiting_weight) for i, w in enumerate(workers) if w.available
        }
        if not loads:
            return None
        least = min(loads.values())
        blocks = request.blocks
        if not blocks:
            return min(loads, key=lambda i: (loads[i], workers[i].inflight_chars))
        bounded = [i for i in loads if self._within_bound(loads[i], least)]
        exact = request.cached
        if exact is not None and all(workers[i].url in exact for i in bounded):
            matched: Mapping[str, int] = exact
        else:
            matched = self.index.matched(blocks)
        hits = [i for i in bounded if matched.get(workers[i].url, 0) > 0]
        if hits:
            choice = max(hits, key=lambda i: (matched[workers[i].url], -loads[i]))
        else:
            choice = max(bounded, key=lambda i: _rendezvous(blocks[0], workers[i].url))
        self.index.record(blocks, workers[choice].url)
        return choice

    def forget(self, url: str) -> None:
        self.index.forget(url)
