"""The planner with the exact prefix index: where an engine publishes KV events, the prompt's
token ids are looked up in what it holds, and that count (not the estimate) decides
conditional disaggregation, the pool's `cached` and prefix_aware's choice."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
from prometheus_client import CollectorRegistry, Counter

from proxy.control.workers import Worker, WorkerPool
from proxy.engines.kvevents_wire import BlockStored
from proxy.place.conditional import ConditionalDisagg
from proxy.place.dedicated import DedicatedPlacement
from proxy.place.kvindex import KvIndex
from proxy.place.plan import Placement, Plan
from proxy.place.planner import Planner
from proxy.place.policies import make_policy
from proxy.place.pool import Rules
from proxy.place.pooled import PoolPlacement
from proxy.place.prefix import PrefixIndex
from proxy.place.router import Router
from proxy.request import COMPLETIONS, ClientRequest, parse_request

IDS = list(range(1000, 3000))  # a 2000-token prompt
BS = 16


def request(text: str = "word " * 2000) -> ClientRequest:  # 10,000 characters: "long"
    return parse_request(COMPLETIONS, orjson.dumps({"model": "m", "prompt": text}), "r1")


class Ids:
    """A fake /tokenize that gives the prompt's token ids."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.asked: list[str] = []

    async def __call__(self, request: ClientRequest, worker: Worker) -> Sequence[int]:
        self.asked.append(worker.id)
        return self.ids


def holds(index: KvIndex, url: str, tokens: list[int]) -> None:
    """`url` stored the full blocks of `tokens`, as its events say (hashes of its own)."""
    n = len(tokens) // BS
    event = BlockStored(
        block_hashes=[f"{url}-{i}".encode() for i in range(n)],
        parent_block_hash=None,
        token_ids=tokens[: n * BS],
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
    )
    index.apply(url, [event])


def pools(role: str, tag: str, n: int) -> tuple[WorkerPool, WorkerPool, WorkerPool]:
    made = {r: WorkerPool(r) for r in ("prefill", "decode", "pool")}  # type: ignore[arg-type]
    if role == "decode":
        made["prefill"].add(Worker("prefill", "p0", "http://p0"))
    for i in range(n):
        made[role].add(Worker(role, f"{tag}{i}", f"http://{tag}{i}"))  # type: ignore[arg-type]
        made[role].workers[i].prefix_source = "events"
    return made["prefill"], made["decode"], made["pool"]


def planner(placement: Placement, ids: Ids) -> Planner:
    decisions = Counter("d", "d", ["decision", "reason"], registry=CollectorRegistry())
    return Planner(placement, ids, PrefixIndex(), decisions, prefix_chars=4096)


def plan_of(made: Planner, req: ClientRequest) -> Plan:
    return asyncio.run(made.plan(req, made.info(req)))


def test_a_decoder_holding_all_but_a_few_tokens_computes_them_itself() -> None:
    p, d, b = pools("decode", "d", 1)
    router = Router(p, d, make_policy("least_loaded"), make_policy("least_loaded"), b)
    ids = Ids(IDS)
    made = planner(DedicatedPlacement(router, 256, ConditionalDisagg(512)), ids)
    plan = plan_of(made, request())  # the estimate knows nothing: a long, uncached prompt
    assert (plan.prefill, plan.reason) == ("remote", "long") and ids.asked == ["d0"]
    holds(made.kv_index, "http://d0", IDS[:1200])  # it got 1200 tokens of it elsewhere
    plan = plan_of(made, request())
    assert (plan.prefill, plan.reason) == ("remote", "long")  # 800 left to compute
    holds(made.kv_index, "http://d0", IDS[:1600])
    plan = plan_of(made, request())
    assert (plan.prefill, plan.reason) == ("local", "cached")  # 400 left: fewer than 512


def test_the_pool_takes_the_exact_count_for_cached() -> None:
    p, d, b = pools("pool", "b", 2)
    router = Router(p, d, make_policy("least_loaded"), make_policy("least_loaded"), b)
    b.workers[0].lean, b.workers[1].lean = "decode", "prefill"
    made = planner(PoolPlacement(router, 256, Rules(min_prefill_tokens=512)), Ids(IDS))
    made.kv_index.apply("http://b0", [])
    holds(made.kv_index, "http://b1", IDS)  # the prefill-leaning engine holds it: not "cached"
    plan = plan_of(made, request())
    assert (plan.prefill, plan.reason, plan.decoder.id) == ("remote", "long", "b0")
    holds(made.kv_index, "http://b0", IDS)
    plan = plan_of(made, request())
    assert (plan.prefill, plan.reason, plan.decoder.id) == ("local", "cached", "b0")


def test_prefix_aware_follows_the_exact_hit() -> None:
    p, d, b = pools("decode", "d", 3)
    policy = make_policy("prefix_aware")
    router = Router(p, d, make_policy("least_loaded"), policy, b)
    made = planner(DedicatedPlacement(router, 256, ConditionalDisagg(64)), Ids(IDS))
    for i, held in enumerate((160, 1200, 800)):
        holds(made.kv_index, f"http://d{i}", IDS[:held])
    plan = plan_of(made, request())
    assert plan.decoder.id == "d1"  # the longest exact hit, though the estimate knows none
    assert plan.reason == "long"  # 2000 - 1200 >= 64


def test_an_engine_without_events_keeps_the_estimate() -> None:
    p, d, b = pools("decode", "d", 1)
    d.workers[0].prefix_source = "estimate"
    router = Router(p, d, make_policy("least_loaded"), make_policy("least_loaded"), b)
    ids = Ids(IDS)
    made = planner(DedicatedPlacement(router, 256, ConditionalDisagg(512)), ids)
    plan = plan_of(made, request())
    assert (plan.prefill, plan.reason) == ("remote", "long") and ids.asked == []
