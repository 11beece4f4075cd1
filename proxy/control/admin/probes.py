"""Admission probes: what a worker must prove before it takes traffic.

In order, each within `timeout` seconds:

    reachable   its /health answers at all
    health      ... with 200
    model       its /v1/models serves the model the active workers serve (prefillers and decoders
                of different models must never be paired)
    kv          the KV path works through this worker, with the proxy's own connector:
                NIXL prefiller: a probe prefill (max_tokens 1, do_remote_decode) returns
                  kv_transfer_params (the engine runs a KV producer); an active decoder then
                  decodes it, which frees the probe's blocks
                NIXL decoder: a probe prefilled on an active prefiller and decoded here; its
                  /metrics must show the pull (vllm:nixl_xfer_time_seconds_count rising): an
                  engine that recomputes the prompt gives the same answer, so only that counts
                LMCache: the probe's "transfer done" notification arrives (pushed from the
                  candidate prefiller into an active decoder, or from an active prefiller into
                  the candidate decoder, which then decodes it)
                pool engine (kv_both): both of the above, with the other engines of the pool
                  (or dedicated ones) as partners: it pulls a probe prefilled elsewhere, then
                  prefills one that another engine decodes; the first engine of a pool, with no
                  partner yet, and a colocated pool (no KV moves) are checked without it

Probe requests go straight to the engines, never through the client path, so they count in no
client statistic (latency windows, request counters, timelines); their X-Request-Id starts with
`pdproxy-probe-` so that the engines' logs show them for what they are.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from time import perf_counter

import orjson

from proxy.control.identity import roles_clash
from proxy.control.registry import WorkerRegistry
from proxy.control.workers import Role, Worker
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Connector, Handoff
from proxy.engines.promtext import parse
from proxy.errors import ProxyError
from proxy.request import COMPLETIONS, ClientRequest

log = logging.getLogger("pdproxy")

PROBE_ID_PREFIX = "pdproxy-probe-"
_WORDS = (
    "river", "city", "morning", "light", "stone", "bridge", "water", "field", "garden", "window",
    "market", "song", "road", "hill", "forest", "harbor", "lantern", "letter", "winter", "summer",
)  # fmt: skip


class ProbeFailed(ProxyError):
    """A worker failed an admission probe; the message says which and why."""

    status = 422
    type = "invalid_request_error"

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"admission probe '{check}' failed: {message}", param="url")
        self.code = f"probe_{check}"
        self.check = check


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


def probe_prompt(words: int) -> str:
    """A prompt no cache has seen (it starts with a fresh nonce) of about `words` words."""
    body = " ".join(_WORDS[i % len(_WORDS)] + str(i // len(_WORDS)) for i in range(words))
    return f"pdproxy admission probe {uuid.uuid4().hex}: {body}"


class _Waiting:
    """One probe run: what its current step waits for (said when the deadline passes), and what
    one step learned for the next."""

    def __init__(self) -> None:
        self.what = "an answer"
        self.health_status = 0


@dataclass(eq=False)
class Prober:
    engine: EngineClient
    connector: Connector
    registry: WorkerRegistry
    timeout: float  # seconds each probe may take
    words: int  # in the probe prompt
    pull_wait: float = 10.0  # how long a decoder's pull may take to show in /metrics
    pool_kv: bool = True  # False: the pool is colocated, its engines move no KV
    candidate_partners: bool = False  # with no active partner, probe with a candidate one

    async def run(self, worker: Worker) -> list[Check]:
        """Every probe in order; raises ProbeFailed at the first that fails. The outcome is noted
        on `worker.last_probe` either way."""
        checks: list[Check] = []
        started = time.time()
        run = _Waiting()
        try:
            await self._step(checks, run, "reachable", lambda: self._reachable(worker, run))
            await self._step(checks, run, "health", lambda: self._health(worker, run))
            await self._step(checks, run, "model", lambda: self._model(worker))
            await self._step(checks, run, "kv", lambda: self._kv(worker, run))
        finally:
            worker.last_probe = {
                "passed": bool(checks) and all(c.ok for c in checks) and len(checks) == 4,
                "at": round(started, 3),
                "checks": [asdict(c) for c in checks],
            }
        return checks

    async def _step(
        self,
        checks: list[Check],
        waiting: _Waiting,
        name: str,
        step: Callable[[], Awaitable[str]],
    ) -> None:
        waiting.what = "an answer"
        t0 = perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                detail = await step()
        except TimeoutError:
            failure = ProbeFailed(
                name, f"nothing within {self.timeout:g} s while waiting for {waiting.what}"
            )
        except ProbeFailed as exc:
            failure = exc
        else:
            checks.append(Check(name, True, detail, round(perf_counter() - t0, 4)))
            return
        checks.append(Check(name, False, failure.message, round(perf_counter() - t0, 4)))
        raise failure

    # --- reachable, health, model ---

    async def _reachable(self, worker: Worker, run: _Waiting) -> str:
        try:
            run.health_status = (await self.engine.get(worker, "/health", self.timeout))[0]
        except ProxyError as exc:
            raise ProbeFailed("reachable", f"{worker.url} is unreachable: {exc.message}") from None
        return f"{worker.url}/health answered"

    async def _health(self, worker: Worker, run: _Waiting) -> str:
        if run.health_status != 200:
            raise ProbeFailed(
                "health", f"{worker.url}/health answered {run.health_status}, not 200"
            )
        return "/health answered 200"

    async def _served(self, worker: Worker) -> list[str]:
        """The model ids `worker` lists (the served model first, as vLLM lists it)."""
        status, raw = await self.engine.get(worker, "/v1/models", self.timeout)
        try:
            data = orjson.loads(raw)["data"] if status == 200 else None
        except (orjson.JSONDecodeError, KeyError, TypeError):
            data = None
        if not isinstance(data, list):
            raise ProbeFailed("model", f"{worker.url}/v1/models answered {status} without a list")
        ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if not ids:
            raise ProbeFailed("model", f"{worker.url}/v1/models lists no model")
        return ids

    async def _topology_models(self, candidate: Worker) -> dict[str, list[str]]:
        """The model each active worker serves (asked once, then remembered): model -> ids."""
        others = [w for pool in self.registry.pools.values() for w in pool.workers]
        others = [w for w in others if w is not candidate]

        async def learn(worker: Worker) -> None:
            if worker.model is None:
                try:
                    worker.model = (await self._served(worker))[0]
                except (ProxyError, ProbeFailed) as exc:
                    log.info("probe: cannot learn the model of %s: %s", worker.url, exc)

        await asyncio.gather(*(learn(w) for w in others))
        models: dict[str, list[str]] = {}
        for worker in others:
            if worker.model is not None:
                models.setdefault(worker.model, []).append(worker.id)
        return models

    async def _model(self, worker: Worker) -> str:
        try:
            served = await self._served(worker)
        except ProxyError as exc:
            raise ProbeFailed("model", exc.message) from None
        topology = await self._topology_models(worker)
        missing = [m for m in topology if m not in served]
        if missing:
            wanted = "; ".join(f"{m!r} ({', '.join(topology[m])})" for m in missing)
            raise ProbeFailed(
                "model",
                f"{worker.role} worker {worker.url} serves {', '.join(map(repr, served))}, but "
                f"the topology serves {wanted}: prefillers and decoders of different models "
                "must never be paired",
            )
        worker.model = next((m for m in served if m in topology), served[0])
        if not topology:
            return f"serves {worker.model!r} (no active worker to compare with)"
        return f"serves {worker.model!r}, as {', '.join(topology[worker.model])}"

    # --- the KV path ---

    def _request(self, worker: Worker) -> ClientRequest:
        prompt = probe_prompt(self.words)
        body = {"model": worker.model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
        rid = f"{PROBE_ID_PREFIX}{uuid.uuid4().hex[:16]}"
        return ClientRequest(COMPLETIONS, body, rid, False, False, len(prompt))

    def _ready(self, role: Role, candidate: Worker) -> list[Worker]:
        """The available active workers that can do `role`'s half of a probe: that role's, and
        the pool's (which do both), never the candidate itself."""
        ready = []
        for name in (role, "pool"):
            pool = self.registry.pools[name]
            pool.refresh()
            ready += [w for w in pool.workers if w.available and w is not candidate]
        if not ready and self.candidate_partners and candidate.role != "pool":
            # nothing of `role` routed yet (a discovered topology starting from none): its
            # candidates partner this one, so that the first pair proves itself together
            ready = [w for w in self.registry.candidates.values() if w.role == role]
        return ready

    def _partner(self, role: Role, candidate: Worker) -> Worker:
        """The least loaded worker to run the other half of a probe as `role`."""
        ready = self._ready(role, candidate)
        if not ready:
            raise ProbeFailed(
                "kv",
                f"no active {role} worker to run the probe's other leg on: add one first, or "
                "add this worker with force",
            )
        return min(ready, key=lambda w: (w.inflight, w.inflight_chars))

    async def _kv(self, worker: Worker, waiting: _Waiting) -> str:
        if worker.role == "prefill":
            return await self._kv_prefiller(worker, self._request(worker), waiting)
        if worker.role == "decode":
            return await self._kv_decoder(worker, self._request(worker), waiting)
        if not self.pool_kv:
            return "a colocated pool moves no KV: not checked"
        done = []
        if self._ready("prefill", worker):  # it pulls a probe prefilled elsewhere
            done.append(await self._kv_decoder(worker, self._request(worker), waiting))
        if self._ready("decode", worker):  # it prefills one that another engine pulls
            done.append(await self._kv_prefiller(worker, self._request(worker), waiting))
        return "; ".join(done) or "no other engine to move KV with yet: checked when one joins"

    async def _prefill(
        self,
        request: ClientRequest,
        prefiller: Worker,
        decoder: Worker,
        waiting: _Waiting,
        blame: str,
    ) -> Handoff:
        waiting.what = f"the probe's prefill on {prefiller.url} (request {request.request_id})"
        try:
            handoff = await self.connector.prefill(request, prefiller, decoder)
        except ProxyError as exc:
            raise ProbeFailed("kv", f"{blame}: {exc.message}") from None
        engine_id = (handoff.kv_transfer_params or {}).get("remote_engine_id")
        if isinstance(engine_id, str) and engine_id:  # what the engine is (proxy.control.identity)
            prefiller.engine_ids.add(engine_id)
        if handoff.kv_transfer_params is None:
            raise ProbeFailed("kv", f"{blame}: KV not handed over: {handoff.recompute_reason}")
        return handoff

    async def _decode(
        self, request: ClientRequest, decoder: Worker, handoff: Handoff, waiting: _Waiting
    ) -> None:
        waiting.what = f"the probe's decode on {decoder.url} (request {request.request_id})"
        body = self.connector.decode_body(request, handoff)
        try:
            raw = await self.engine.call(
                decoder, COMPLETIONS, body, request.request_id, self.timeout, "probe decode"
            )
            choices = orjson.loads(raw).get("choices")
        except (orjson.JSONDecodeError, AttributeError):
            choices = None
        if not isinstance(choices, list) or not choices:
            raise ProxyError(f"decode worker {decoder.url} answered the probe without choices")

    async def _kv_prefiller(self, worker: Worker, request: ClientRequest, waiting: _Waiting) -> str:
        decoder = self._partner("decode", worker)
        handoff = await self._prefill(
            request,
            worker,
            decoder,
            waiting,
            f"{worker.role} worker {worker.url} is not a KV producer (is it started with a "
            f"{self.connector.name} kv-transfer-config, kv_producer or kv_both?)",
        )
        if self.connector.transfer_metrics is None:  # the handoff came once the push was done
            label = self.connector.label
            return f"{label} reported the probe's KV pushed into {decoder.id} ({decoder.url})"
        try:  # a decoder reads the blocks, which frees them on this prefiller
            await self._decode(request, decoder, handoff, waiting)
        except ProxyError as exc:
            log.warning(
                "probe %s: decoder %s could not decode the probe prefilled on %s (its blocks "
                "stay until their lease ends): %s",
                request.request_id,
                decoder.url,
                worker.url,
                exc.message,
            )
            return "kv_transfer_params returned"
        return f"kv_transfer_params returned; {decoder.id} ({decoder.url}) decoded them"

    async def learn_engine_ids(self, candidate: Worker) -> None:
        """The NIXL engine ids of the active workers the candidate could duplicate (its role's,
        and the pool's) that reported none yet (configured workers that were never probed): a
        probe prefill on each, decoded elsewhere to free its blocks. Only once the candidate
        reported its own id (a prefiller or a pool engine, connector nixl)."""
        if not candidate.engine_ids:  # its connector reports none (only NIXL's prefills do)
            return
        for role in ("prefill", "pool"):
            if not roles_clash(candidate.role, role):
                continue
            for worker in self.registry.pools[role].workers:
                if worker.engine_ids or worker is candidate:
                    continue
                request = self._request(worker)
                waiting = _Waiting()
                try:
                    async with asyncio.timeout(self.timeout):
                        decoder = self._partner("decode", worker)
                        blame = f"learning the engine id of {worker.id} ({worker.url})"
                        handoff = await self._prefill(request, worker, decoder, waiting, blame)
                        await self._decode(request, decoder, handoff, waiting)
                except (TimeoutError, ProxyError) as exc:
                    log.info("probe: cannot learn the engine id of %s: %s", worker.url, exc)

    async def _received(self, worker: Worker, count: str) -> float:
        """The transfers the worker counts in its /metrics (`count`) so far."""
        try:
            status, raw = await self.engine.get(worker, "/metrics", self.timeout)
        except ProxyError as exc:
            raise ProbeFailed("kv", f"cannot read its /metrics: {exc.message}") from None
        if status != 200:
            raise ProbeFailed("kv", f"{worker.url}/metrics answered {status}")
        return parse(raw, [count]).sum(count) or 0.0

    async def _kv_decoder(self, worker: Worker, request: ClientRequest, waiting: _Waiting) -> str:
        prefiller = self._partner("prefill", worker)
        metrics = self.connector.transfer_metrics
        before = await self._received(worker, metrics.count) if metrics is not None else 0.0
        blame = f"the probe prefill on active {prefiller.role} worker {prefiller.url}"
        handoff = await self._prefill(request, prefiller, worker, waiting, blame)
        try:
            await self._decode(request, worker, handoff, waiting)
        except ProxyError as exc:
            raise ProbeFailed("kv", f"the probe decode failed: {exc.message}") from None
        if metrics is None:  # the handoff came once the push was done
            label = self.connector.label
            return f"{label} reported the probe's KV pushed from {prefiller.id} into it; decoded"
        after = await self._pulled(worker, prefiller, metrics.count, before, waiting)
        return (
            f"pulled the probe's KV from {prefiller.id} ({metrics.count} {before:g} -> {after:g})"
        )

    async def _pulled(
        self, worker: Worker, prefiller: Worker, count: str, before: float, waiting: _Waiting
    ) -> float:
        """Wait until the decoder's count of transfers passes `before`: only a pull counts (an
        engine that recomputes the prompt gives the same answer)."""
        answered = perf_counter()
        while True:  # vLLM publishes its transfer stats a moment later
            after = await self._received(worker, count)
            if after > before:
                return after
            if perf_counter() - answered > self.pull_wait:
                raise ProbeFailed(
                    "kv",
                    f"decoder {worker.url} did not pull the probe's KV from {prefiller.url} "
                    f"({count} stayed at {after:g} for {self.pull_wait:g} s after its "
                    f"answer): it computed the prompt itself; is it started with a "
                    f"{self.connector.vllm_connector} kv-transfer-config (kv_consumer or kv_both)?",
                )
            waiting.what = f"the probe's KV pull to show in {count} (still {after:g})"
            await asyncio.sleep(0.1)
