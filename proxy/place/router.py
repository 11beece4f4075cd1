"""The worker pools paired with their policies: the only place the policies meet worker state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proxy.control.workers import Worker, WorkerPool
from proxy.place.policies import Policy, RequestInfo


@dataclass
class Router:
    """Each role's pool with its policy. `pool` holds the pool's engines (empty without one),
    which the pool placement places."""

    prefill: WorkerPool
    decode: WorkerPool
    prefill_policy: Policy
    decode_policy: Policy
    pool: WorkerPool = field(default_factory=lambda: WorkerPool("pool"))

    @property
    def pools(self) -> tuple[WorkerPool, WorkerPool, WorkerPool]:
        return self.prefill, self.decode, self.pool

    def pool_of(self, worker: Worker) -> WorkerPool:
        return next(p for p in self.pools if p.role == worker.role)

    def pick_prefill(self, info: RequestInfo, exclude: Sequence[Worker] = ()) -> Worker | None:
        return self._pick(self.prefill, self.prefill_policy, info, exclude)

    def pick_decode(self, info: RequestInfo, exclude: Sequence[Worker] = ()) -> Worker | None:
        return self._pick(self.decode, self.decode_policy, info, exclude)

    def forget(self, worker: Worker) -> None:
        """`worker` left its pool: its policy drops what it kept about it."""
        if worker.role == "prefill":
            self.prefill_policy.forget(worker.url)
        elif worker.role == "decode":
            self.decode_policy.forget(worker.url)

    @staticmethod
    def _pick(
        pool: WorkerPool, policy: Policy, info: RequestInfo, exclude: Sequence[Worker]
    ) -> Worker | None:
        pool.refresh()
        workers = [w for w in pool.workers if w not in exclude] if exclude else pool.workers
        index = policy.select(workers, info)
        return None if index is None else workers[index]
