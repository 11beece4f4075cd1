"""KV-cache blocks: allocation, their simulated contents, and producer-side leases.

A block's content is a hash of its token chunk chained to the previous block's content, as
vLLM's prefix-cache block hashes are, so two prompts agree on block ``i`` only if they agree on
every token up to the end of that block.

Invariant: a block id is either free, owned by one running request, or held under exactly one
lease; leased blocks return to the free list when read, released, or expired.

Like vLLM 0.32's NIXL, a read after the lease ended (blocks read once already, released or
expired) still succeeds: the decoder reads freed memory and nothing checks it. The pool
remembers what such blocks held until they are allocated again; only a read of blocks reused
since then fails (``overwritten``), where real NIXL would silently hand over another request's
KV. A request id the pool never held fails too (``unknown_request``), where NIXL reads blindly.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from pdsim.shape import BLOCK_SIZE

_MAX_STALE = 4096  # ended leases remembered for reads after release


def num_blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BLOCK_SIZE)


def block_contents(token_ids: list[int], num_tokens: int | None = None) -> list[int]:
    """The content of each block covering the first ``num_tokens`` tokens (default: all)."""
    n = len(token_ids) if num_tokens is None else min(num_tokens, len(token_ids))
    out: list[int] = []
    prev = 0
    for start in range(0, n, BLOCK_SIZE):
        prev = hash((prev, *token_ids[start : min(start + BLOCK_SIZE, n)]))
        out.append(prev)
    return out


@dataclass
class Lease:
    """Blocks a producer keeps for a consumer to read."""

    request_id: str
    block_ids: list[int]
    contents: list[int]
    expires_at: float
    overwritten: bool = False  # after release: a block was allocated again


class KvReadError(Exception):
    """A read of leased blocks failed; ``reason`` is short and machine-friendly."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BlockPool:
    """The block ids of one instance and the leases on them.

    ``clock`` returns monotonic seconds (the event loop's ``time``).
    """

    def __init__(self, num_blocks: int, lease_seconds: float, clock: Callable[[], float]) -> None:
        self.num_blocks = num_blocks
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._free: deque[int] = deque(range(1, num_blocks + 1))
        self._overflow = 0  # blocks owned beyond capacity (the simulator never preempts)
        self._leases: dict[str, Lease] = {}
        self._stale: OrderedDict[str, Lease] = OrderedDict()  # ended leases, newest last
        self._stale_by_block: dict[int, str] = {}
        self.held_blocks = 0
        self.expired_requests = 0

    @property
    def leased_requests(self) -> list[str]:
        """The request ids whose blocks wait under lease for a decoder."""
        return list(self._leases)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free) + self._overflow

    @property
    def usage(self) -> float:
        return min(1.0, self.used_blocks / self.num_blocks) if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks; past capacity, ids beyond it are handed out and counted."""
        take = min(n, len(self._free))
        ids = [self._free.popleft() for _ in range(take)]
        for bid in ids:
            stale = self._stale.get(self._stale_by_block.pop(bid, ""))
            if stale is not None:
                stale.overwritten = True
        if take < n:
            extra = n - take
            self._overflow += extra
            ids.extend(range(self.num_blocks + 1, self.num_blocks + 1 + extra))
        return ids

    def free(self, block_ids: list[int]) -> None:
        for bid in block_ids:
            if bid > self.num_blocks:
                self._overflow -= 1
            else:
                self._free.append(bid)

    def hold(self, request_id: str, block_ids: list[int], contents: list[int]) -> Lease:
        """Put a finished producer request's blocks under lease."""
        lease = Lease(request_id, block_ids, contents, self._clock() + self.lease_seconds)
        self._leases[request_id] = lease
        self.held_blocks += len(block_ids)
        return lease

    def release(self, request_id: str) -> bool:
        lease = self._leases.pop(request_id, None)
        if lease is None:
            return False
        self.held_blocks -= len(lease.block_ids)
        self.free(lease.block_ids)
        self._stale[request_id] = lease
        for bid in lease.block_ids:
            self._stale_by_block[bid] = request_id
        if len(self._stale) > _MAX_STALE:
            self._stale.popitem(last=False)
        return True

    def read(self, request_id: str, block_ids: list[int]) -> list[int]:
        """Contents of leased blocks, then free them (the read-done notification).

        An ended lease is read from freed memory (see the module doc). Raises ``KvReadError``
        when the request is unknown, its freed blocks were reused, or the ids do not match.
        """
        lease = self._leases.get(request_id)
        if lease is not None and self._clock() >= lease.expires_at:
            self._expire(lease)
            lease = None
        stale = lease is None
        lease = lease or self._stale.get(request_id)
        if lease is None:
            raise KvReadError("unknown_request", f"No KV blocks held for request {request_id}")
        if block_ids != lease.block_ids[: len(block_ids)] or not block_ids:
            raise KvReadError("bad_blocks", f"Block ids do not match request {request_id}")
        if lease.overwritten:
            raise KvReadError("overwritten", f"Freed KV blocks of {request_id} were reused")
        contents = lease.contents[: len(block_ids)]
        if not stale:
            self.release(request_id)
        return contents

    def reap_expired(self) -> int:
        """Free every expired lease; returns how many expired."""
        now = self._clock()
        expired = [lease for lease in self._leases.values() if now >= lease.expires_at]
        for lease in expired:
            self._expire(lease)
        return len(expired)

    def _expire(self, lease: Lease) -> None:
        self.release(lease.request_id)
        self.expired_requests += 1

    def __repr__(self) -> str:
        return (
            f"BlockPool(used={self.used_blocks}/{self.num_blocks}, "
            f"leases={len(self._leases)}, held={self.held_blocks})"
        )
