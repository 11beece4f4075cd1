"""The simulated engine core: a continuous-batching step loop over running sequences.

Each step is planned as vLLM 0.32's scheduler plans one (``plan_step``): the running sequences
in order, each decoding one token or taking the next chunk of its prompt, then waiting ones,
all under one token budget of ``max_num_batched_tokens`` (a decode takes one token of it) and
``max_num_seqs``. The step then costs ``decode_base_ms + decode_ms_per_seq * decodes`` plus,
when it carries prefill work, ``prefill_overhead_ms + prefill_ms_per_token * tokens``
(``step_ms``), and every sequence in it waits for the whole step: a long prompt chunk slows
each decode beside it, whether the prompt is the engine's own request or a prefill for another
engine's decode (its KV then held for the pull). With timing disabled there is no loop: a
sequence generates all its tokens as soon as it is read, which keeps overhead benchmarks free
of simulated delay.

Steps are paced against a deadline, so the time the event loop spends streaming a step's tokens
is taken out of the next step's sleep: a step lasts its modelled time unless the process is
short of CPU: ``pdsim:engine_step_wall_seconds_total`` against
``pdsim:engine_step_model_seconds_total`` says by how much.

A KV connector's save (LMCache's, ``on_prefilled``) runs inside the step that computed the
prompt, as vLLM's ``wait_for_save`` does: while it waits, no sequence makes progress, timed or
not.

Invariants: a sequence is in exactly one of waiting, running or finished; its blocks are freed
or put under lease exactly once, when it finishes or is aborted.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from pdsim.config import SimConfig, Timing
from pdsim.kvcache import BlockPool, block_contents, num_blocks_for
from pdsim.metrics import Metrics
from pdsim.model import Generation, SamplingSpec, Step
from pdsim.prefixcache import PrefixCache
from pdsim.shape import BLOCK_SIZE
from pdsim.tokenizer import SimTokenizer
from proxy.engines.kvevents_wire import Event

log = logging.getLogger(__name__)


class Sequence:
    """One request inside the engine; read its output with ``next_steps``."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        generation: Generation,
        loaded_tokens: int,
        produce_kv: bool,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.priority = priority
        self.prompt_ids = prompt_ids
        self.gen = generation
        self.loaded_tokens = loaded_tokens
        self.prefill_left = max(1, len(prompt_ids) - loaded_tokens)
        self.produce_kv = produce_kv
        self.cached_tokens = 0  # prompt tokens found in the engine's own prefix cache
        self.block_ids: list[int] = []
        self.kv_transfer_params: dict[str, Any] | None = None
        self.finished = False
        self.aborted = False
        self._buffer: list[Step] = []
        self._ready = asyncio.Event()

    @property
    def started_decode(self) -> bool:
        return bool(self.gen.token_ids)

    def push(self, step: Step) -> None:
        self._buffer.append(step)
        self._ready.set()


class Engine:
    """Schedules sequences, owns the block pool, and keeps the engine-side metrics."""

    def __init__(
        self,
        config: SimConfig,
        tokenizer: SimTokenizer,
        metrics: Metrics,
        kv_params: Callable[[Sequence, int], dict[str, Any]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] | None = None,
        on_prefilled: Callable[[Sequence], Awaitable[None] | None] | None = None,
        kv_events: Callable[[list[Event]], object] | None = None,
    ) -> None:
        self._cfg = config
        # the step's modelled time passing, and the time it is; tests pass a virtual clock
        self._sleep = sleep
        self._clock = clock or asyncio.get_running_loop().time
        self._tok = tokenizer
        self._metrics = metrics
        self._kv_params = kv_params
        # a KV connector's save of a computed prompt, awaited inside the step (wait_for_save):
        # while it waits, the engine makes no progress at all
        self._on_prefilled = on_prefilled
        # untimed, each request runs on its own; with a save to wait for they take turns, so
        # that a waiting save holds them all up as it holds up a real engine's step
        self._core = asyncio.Lock() if on_prefilled is not None else None
        self._saves: set[asyncio.Future[None]] = set()
        loop = asyncio.get_running_loop()
        self.pool = BlockPool(config.num_gpu_blocks, config.kv_lease_seconds, loop.time)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._direct_running = 0
        capacity = config.num_gpu_blocks // 2 if config.prefix_caching else 0
        self._prefix = PrefixCache(capacity, kv_events)
        self.pulling = 0
        self._wakeup = asyncio.Event()
        self._timed = config.timing.enabled
        self._loop_task = asyncio.create_task(self._step_loop()) if self._timed else None
        self._reaper = asyncio.create_task(self._reap_loop())

    def cached_tokens(self, token_ids: list[int]) -> int:
        """The leading tokens of a prompt its prefix cache holds now (changing nothing)."""
        return self._prefix.peek(token_ids)

    @property
    def num_running(self) -> int:
        return len(self._running) + self._direct_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self.pulling

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        spec: SamplingSpec,
        loaded_tokens: int,
        produce_kv: bool,
        priority: int = 0,
    ) -> Sequence:
        gen = Generation(self._tok, prompt_ids, spec, self._cfg.eos_probability)
        seq = Sequence(request_id, prompt_ids, gen, loaded_tokens, produce_kv, priority)
        if self._timed:
            if self._cfg.scheduling_policy == "priority":
                # vLLM's priority policy: lower value first, arrival order within one
                at = bisect.bisect_right(self._waiting, priority, key=lambda s: s.priority)
                self._waiting.insert(at, seq)
            else:
                self._waiting.append(seq)
            self._wakeup.set()
        else:
            self._admit(seq)
            self._direct_running += 1
        return seq

    async def next_steps(self, seq: Sequence) -> list[Step]:
        """The steps produced since the last call (at least one); empty once finished."""
        if not self._timed:
            if self._core is not None:
                await self._direct_turn(seq)
            return self._run_direct(seq)
        while not seq._buffer:
            if seq.finished:
                return []
            await seq._ready.wait()
            seq._ready.clear()
        steps, seq._buffer = seq._buffer, []
        return steps

    def abort(self, seq: Sequence, count: bool = True) -> str | None:
        """Abort an unfinished sequence, freeing its blocks; returns the phase it was in.

        ``count`` false keeps it out of the abort metrics (a fault, not a client, ended it).
        """
        if seq.finished:
            return None
        phase = "decode" if seq.started_decode else "prefill"
        seq.aborted = True
        seq.finished = True
        if self._timed:
            if seq in self._running:
                self._running.remove(seq)
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(seq)
        else:
            self._direct_running -= 1
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        if count:
            self._metrics.aborted[phase] += 1
        self._metrics.request_success["abort"] += 1
        return phase

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, self._reaper, *self._saves) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # -- internals -------------------------------------------------------------------------

    def _admit(self, seq: Sequence) -> None:
        seq.block_ids = self.pool.allocate(num_blocks_for(len(seq.prompt_ids)))
        if self._prefix.capacity:
            seq.cached_tokens = self._prefix.lookup_and_insert(seq.prompt_ids)
            known = max(seq.loaded_tokens, seq.cached_tokens)
            seq.prefill_left = max(1, len(seq.prompt_ids) - known)

    async def _direct_turn(self, seq: Sequence) -> None:
        """Untimed, with a save to wait for: wait for the engine, and hold it for this
        sequence's save, until the save is over even if the request leaves meanwhile."""
        assert self._core is not None and self._on_prefilled is not None
        await self._core.acquire()
        saving = None
        if not seq.started_decode and not seq.finished:
            saving = self._on_prefilled(seq)
        if saving is None:
            self._core.release()
            return
        core = self._core
        task = asyncio.ensure_future(saving)
        self._saves.add(task)
        task.add_done_callback(self._saves.discard)
        task.add_done_callback(lambda _: core.release())
        await asyncio.shield(task)

    async def _save(self, seq: Sequence) -> None:
        if self._on_prefilled is not None and (saving := self._on_prefilled(seq)) is not None:
            await saving

    def _run_direct(self, seq: Sequence) -> list[Step]:
        """All remaining tokens at once, or one per call with ``token_per_chunk`` (then each
        token is its own SSE event, as vLLM streams a lightly loaded engine)."""
        if seq.finished:
            return []
        if not seq.started_decode:
            self._count_prefill(seq)
        steps = [self._generate(seq)]
        if not self._cfg.token_per_chunk:
            while not seq.gen.finished:
                steps.append(self._generate(seq))
        if seq.gen.finished:
            self._direct_running -= 1
        return steps

    def _count_prefill(self, seq: Sequence) -> None:
        m = self._metrics
        n = len(seq.prompt_ids)
        loaded = min(seq.loaded_tokens, n - 1)
        m.prompt_tokens += n  # the full prompt, also on a decoder that pulled it (as vLLM)
        hit = max(0, min(seq.cached_tokens, n - 1) - loaded)
        if self._cfg.kv_transfer:  # vLLM asks the connector for what the local cache lacks
            m.external_prefix_cache_queries += n - hit
            m.external_prefix_cache_hits += min(seq.loaded_tokens, n)
        if self._cfg.prefix_caching:  # vLLM counts its prefix cache only when it has one
            m.prefix_cache_queries += n
            m.prefix_cache_hits += hit
        m.prompt_tokens_by_source["external_kv_transfer"] += loaded
        m.prompt_tokens_by_source["local_cache_hit"] += hit
        m.prompt_tokens_by_source["local_compute"] += n - loaded - hit

    def _generate(self, seq: Sequence) -> Step:
        step = seq.gen.step()
        self._metrics.generation_tokens += 1
        total = len(seq.prompt_ids) + len(seq.gen.token_ids)
        if (total - 1) % BLOCK_SIZE == 0 and not step.finish_reason:
            seq.block_ids.extend(self.pool.allocate(1))
        if step.finish_reason is not None:
            self._finish(seq, step)
        return step

    def _finish(self, seq: Sequence, step: Step) -> None:
        seq.finished = True
        self._metrics.request_success[step.finish_reason or "stop"] += 1
        # vLLM's scheduler finishes EOS and stop-token ids as FINISHED_STOPPED (0.32 offers
        # their KV too); stop strings are cut by the frontend, which aborts the request.
        reason_ok = step.finish_reason == "length" or (
            self._cfg.kv_params_on_eos
            and step.finish_reason == "stop"
            and not isinstance(step.stop_reason, str)
        )
        if seq.produce_kv and reason_ok and seq.block_ids:
            # The last sampled token has no KV yet: only computed tokens are offered.
            num_tokens = len(seq.prompt_ids) + len(seq.gen.token_ids) - 1
            n_blocks = num_blocks_for(num_tokens)
            keep, extra = seq.block_ids[:n_blocks], seq.block_ids[n_blocks:]
            self.pool.free(extra)
            contents = block_contents(seq.prompt_ids + seq.gen.token_ids, num_tokens)
            self.pool.hold(seq.request_id, keep, contents)
            seq.block_ids = keep
            seq.kv_transfer_params = self._kv_params(seq, num_tokens)
        else:
            self.pool.free(seq.block_ids)
            seq.block_ids = []

    async def _step_loop(self) -> None:
        cfg = self._cfg
        t = cfg.timing
        scale = t.speed_factor / 1000.0
        clock = self._clock
        deadline = began = clock()  # when the previous step was due to end, and did end
        while True:
            if not self._running and not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
                deadline = began = clock()
            grants = plan_running(self._running, cfg.max_num_batched_tokens)
            budget = cfg.max_num_batched_tokens - sum(grants)
            while self._waiting and len(self._running) < cfg.max_num_seqs and budget > 0:
                seq = self._waiting.popleft()
                self._admit(seq)
                self._running.append(seq)
                take = min(seq.prefill_left, budget)
                grants.append(take)
                budget -= take
            batch = list(zip(self._running, grants, strict=True))
            decodes = sum(1 for seq, g in batch if g and seq.prefill_left <= 0)
            prefill_tokens = sum(g for seq, g in batch if seq.prefill_left > 0)
            model_s = step_ms(t, decodes, prefill_tokens) * scale
            due = deadline + model_s
            await self._sleep(max(0.0, due - clock()))
            ended = clock()
            # more than a step behind: start afresh rather than rush the next steps
            deadline = ended if ended - due > model_s else due
            self._metrics.record_step(model_s, ended - began)
            began = ended
            for seq, grant in batch:
                if seq.finished or not grant:
                    continue  # aborted meanwhile, or no budget left for it this step
                if seq.prefill_left > 0:
                    seq.prefill_left -= grant
                    if seq.prefill_left > 0:
                        continue
                    self._count_prefill(seq)
                    await self._save(seq)
                    if seq.finished:
                        continue  # aborted while the save waited
                step = self._generate(seq)
                seq.push(step)
                if seq.finished:
                    self._running.remove(seq)
            # Let handlers run between steps even when the step costs nothing.
            await asyncio.sleep(0)

    async def _reap_loop(self) -> None:
        interval = min(0.5, max(0.01, self._cfg.kv_lease_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            expired = self.pool.reap_expired()
            if expired:
                log.info("Released expired KV blocks of %d request(s)", expired)


def plan_running(running: list[Sequence], budget: int) -> list[int]:
    """Tokens each running sequence gets this step, in order, as vLLM's scheduler grants them:
    a decoding sequence needs one, a sequence still in its prompt the rest of the prompt; what
    the budget cannot cover waits (0) for a later step."""
    grants = []
    for seq in running:
        take = min(seq.prefill_left if seq.prefill_left > 0 else 1, budget)
        grants.append(take)
        budget -= take
    return grants


def step_ms(t: Timing, decodes: int, prefill_tokens: int) -> float:
    """Modelled milliseconds of one step with `decodes` decoding sequences and `prefill_tokens`
    prompt tokens (before the speed factor); every sequence in the step waits for all of it."""
    ms = t.decode_base_ms + t.decode_ms_per_seq * decodes
    if prefill_tokens:
        ms += t.prefill_overhead_ms + t.prefill_ms_per_token * prefill_tokens
    return ms
