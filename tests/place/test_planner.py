"""The one planner over dedicated roles and over a pool: every plan whole, with its reason,
counted once; the exact count asked only where it can change the decision; retries ask the
placement again. Pure: workers are plain objects, the token count a fake coroutine."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter

from proxy.control.workers import KvTransfer, Worker, WorkerPool
from proxy.errors import NoWorkerAvailable
from proxy.place.conditional import ConditionalDisagg
from proxy.place.dedicated import DedicatedPlacement
from proxy.place.plan import Placement, Plan
from proxy.place.planner import Planner
from proxy.place.policies import make_policy
from proxy.place.pool import Rules
from proxy.place.pooled import PoolPlacement
from proxy.place.prefix import PrefixIndex
from proxy.place.router import Router
from proxy.request import COMPLETIONS, ClientRequest, parse_request

SYSTEM = "You are a careful assistant. " * 40  # 1160 characters: four 256-character blocks


def request(prompt: str, **body: Any) -> ClientRequest:
    raw = {"model": "m", "prompt": prompt, **body}
    return parse_request(COMPLETIONS, orjson.dumps(raw), "r1")


def pools(prefill: int = 1, decode: int = 1, pool: int = 0) -> tuple[WorkerPool, ...]:
    made = []
    for role, n, tag in (("prefill", prefill, "p"), ("decode", decode, "d"), ("pool", pool, "b")):
        p = WorkerPool(role)  # type: ignore[arg-type]
        for i in range(n):
            p.add(Worker(role, f"{tag}{i}", f"http://{tag}{i}"))  # type: ignore[arg-type]
        made.append(p)
    return tuple(made)


class Counts:
    """A fake /tokenize: a fixed count per prompt, and which engine was asked."""

    def __init__(self, tokens: int | None) -> None:
        self.tokens = tokens
        self.asked: list[str] = []

    async def __call__(self, request: ClientRequest, worker: Worker) -> int | None:
        self.asked.append(worker.id)
        return self.tokens


def planner(placement: Placement, counts: Counts, index: PrefixIndex) -> tuple[Planner, Counter]:
    decisions = Counter("d", "d", ["decision", "reason"], registry=CollectorRegistry())
    return Planner(placement, counts, index, decisions, prefix_chars=4096), decisions


def dedicated(
    conditional: int | None = None, prefill: int = 1, decode: int = 1, tokens: int | None = 100
) -> tuple[Planner, Counter, Counts, Router]:
    p, d, b = pools(prefill, decode)
    index = PrefixIndex()
    router = Router(p, d, make_policy("least_loaded"), make_policy("least_loaded"), b)
    cond = None if conditional is None else ConditionalDisagg(conditional)
    counts = Counts(tokens)
    made, decisions = planner(DedicatedPlacement(router, 256, cond), counts, index)
    return made, decisions, counts, router


def plan_of(made: Planner, req: ClientRequest) -> Plan:
    return asyncio.run(made.plan(req, made.info(req)))


def counted(decisions: Counter) -> dict[tuple[str, str], float]:
    out = {}
    for metric in decisions.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out[(s.labels["decision"], s.labels["reason"])] = s.value
    return out


def test_dedicated_roles_without_conditional_disaggregation_always_prefill_remotely() -> None:
    made, decisions, counts, _ = dedicated()
    plan = plan_of(made, request("hello there"))
    assert (plan.prefill, plan.reason, plan.prefiller and plan.prefiller.id) == (
        "remote",
        "dedicated",
        "p0",
    )
    assert plan.decoder.id == "d0" and counts.asked == []  # nothing to count
    assert counted(decisions) == {("remote", "dedicated"): 1.0}


@pytest.mark.parametrize(
    ("body", "reason"),
    [({"prompt_logprobs": 1}, "prompt_logprobs"), ({"use_beam_search": True}, "beam_search")],
)
def test_a_request_served_whole_is_local_with_its_reason(body: dict[str, Any], reason: str) -> None:
    made, decisions, counts, _ = dedicated(conditional=512)
    plan = plan_of(made, request("hello", **body))
    assert (plan.prefill, plan.reason, plan.prefiller) == ("local", reason, None)
    assert counts.asked == [] and counted(decisions) == {("local", reason): 1.0}


@pytest.mark.parametrize(
    ("tokens", "prefill", "reason"),
    [(100, "local", "short"), (600, "remote", "long"), (None, "remote", "long")],
)
def test_conditional_disaggregation_counts_a_short_prompt_and_decides(
    tokens: int | None, prefill: str, reason: str
) -> None:
    made, decisions, counts, _ = dedicated(conditional=512, tokens=tokens)
    plan = plan_of(made, request("a short prompt"))
    assert (plan.prefill, plan.reason, plan.tokens) == (prefill, reason, tokens)
    assert counts.asked == ["d0"]
    assert counted(decisions) == {(prefill, reason): 1.0}


def test_a_long_prompt_with_nothing_cached_is_long_without_asking_the_engine() -> None:
    made, _, counts, _ = dedicated(conditional=512)
    plan = plan_of(made, request("word " * 2000))  # 10,000 characters >= 16 x 512
    assert (plan.prefill, plan.reason) == ("remote", "long") and counts.asked == []


def test_the_second_turn_is_cached_on_the_decoder_that_served_the_first() -> None:
    made, decisions, _, _ = dedicated(conditional=512, tokens=600)
    first = plan_of(made, request(SYSTEM + "first question"))
    assert first.reason == "long"
    second = plan_of(made, request(SYSTEM + "second question"))
    assert (second.prefill, second.reason, second.decoder) == ("local", "cached", first.decoder)
    assert counted(decisions) == {("remote", "long"): 1.0, ("local", "cached"): 1.0}


def test_a_decoder_without_a_prefix_cache_is_never_counted_as_having_cached() -> None:
    made, _, _, router = dedicated(conditional=512, tokens=600)
    router.decode.workers[0].prefix_caching = False
    plan_of(made, request(SYSTEM + "first question"))
    assert plan_of(made, request(SYSTEM + "second question")).reason == "long"


def test_a_slow_kv_path_keeps_the_prompt_on_the_decoder() -> None:
    made, _, _, router = dedicated(conditional=512)
    router.decode.workers[0].kv_transfer = KvTransfer(5, 1.0, 1e8, 5.0, slow=True)
    plan = plan_of(made, request("word " * 2000))
    assert (plan.prefill, plan.reason) == ("local", "slow_kv")


def test_no_prefiller_is_a_remote_plan_without_one_and_no_decoder_is_an_error() -> None:
    made, decisions, _, _ = dedicated(prefill=0)
    plan = plan_of(made, request("hello"))
    assert (plan.prefill, plan.prefiller) == ("remote", None)
    made, decisions, _, _ = dedicated(decode=0)
    with pytest.raises(NoWorkerAvailable, match="no decode worker"):
        plan_of(made, request("hello"))
    assert counted(decisions) == {}


def test_a_retry_asks_the_placement_for_another_worker_of_that_leg() -> None:
    made, _, _, _ = dedicated(prefill=2, decode=2)
    req = request("hello")
    info = made.info(req)
    plan = asyncio.run(made.plan(req, info))
    assert plan.prefiller is not None
    again = made.retry(plan, "prefill", info, [plan.decoder, plan.prefiller])
    assert again is not None and again.prefiller is not None
    assert again.prefiller.id != plan.prefiller.id and again.decoder is plan.decoder
    other = made.retry(plan, "decode", info, [plan.decoder])
    assert other is not None and other.decoder.id != plan.decoder.id
    decoders = list(made.placement.router.decode.workers)  # type: ignore[attr-defined]
    assert made.retry(plan, "decode", info, decoders) is None


def test_the_pool_plans_through_the_same_planner_and_shares_its_reasons() -> None:
    p, d, b = pools(prefill=0, decode=0, pool=2)
    router = Router(p, d, make_policy("least_loaded"), make_policy("least_loaded"), b)
    b.workers[1].lean = "prefill"
    seen: list[tuple[int, bool]] = []
    placement = PoolPlacement(
        router, 256, Rules(min_prefill_tokens=512), prompts=lambda *a: seen.append(a)
    )
    counts = Counts(2000)
    made, decisions = planner(placement, counts, PrefixIndex())
    long = plan_of(made, request(SYSTEM + "one"))
    assert (long.prefill, long.reason, long.prefiller, long.decoder.id) == (
        "remote", "long", b.workers[1], "b0"
    )  # fmt: skip
    assert counts.asked == ["b0"] and seen == [(2000, True)]
    cached = plan_of(made, request(SYSTEM + "two"))  # b0 was given this prefix
    assert (cached.prefill, cached.reason, cached.decoder.id) == ("local", "cached", "b0")
    assert counted(decisions) == {("remote", "long"): 1.0, ("local", "cached"): 1.0}
