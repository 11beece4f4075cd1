"""The shared decisions' steps (proxy.control.membership.shared): each applied at its instant,
one read late applied at once, one older than the step in effect never, and an engine that
joins later takes the lean in effect. The ConfigMap's contents are handed in as read."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.auth import Authenticator
from proxy.config import load_config
from proxy.control.membership.kubernetes import KubernetesSource
from proxy.control.membership.shared import SharedDecisions
from proxy.control.plane import ControlPlane, initial_workers
from proxy.control.pool import PoolController
from proxy.engines.client import EngineClient
from proxy.engines.connectors.factory import make_connector

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


def build() -> tuple[SharedDecisions, PoolController, ControlPlane]:
    cfg = load_config(
        None,
        pool=[A, B],
        pool_mode="adaptive",
        discovery={
            "source": "kubernetes",
            "selectors": {"pool": "role=pool"},
            "leader": {"identity": "r1", "lease_duration": 2, "renew_interval": 0.2},
        },
    )
    registry = initial_workers(cfg)
    pools = (registry.pools["prefill"], registry.pools["decode"], registry.pools["pool"])
    pool = PoolController(pools, cfg.pool_planner, cfg.pool_mode, CollectorRegistry())
    engine = EngineClient(1.0)
    plane = ControlPlane(
        cfg,
        engine,
        registry,
        make_connector(cfg, engine),
        Authenticator((), ()),
        CollectorRegistry(),
        lambda tasks, why: None,
        pool=pool,
    )
    assert isinstance(plane.membership, KubernetesSource) and plane.membership.shared is not None
    return plane.membership.shared, pool, plane


def steps(*made: tuple[float, dict[str, str]]) -> dict[str, str]:
    listed = [{"at": at, "leans": leans, "controller": "auto", "by": "r0"} for at, leans in made]
    return {"steps": json.dumps(listed)}


def applied(pool: PoolController) -> list[dict[str, Any]]:
    return [c for c in pool.changes if "effective" in c]


def test_each_step_at_its_instant_a_late_one_at_once_an_older_one_never() -> None:
    async def scenario() -> None:
        shared, pool, plane = build()
        assert pool.leans() == {A: "decode", B: "decode"}
        now = time.time()
        first, second = round(now + 0.3, 3), round(now + 0.6, 3)
        shared._learn(steps((first, {A: "prefill", B: "decode"}), (second, {B: "prefill"})))
        assert pool.leans() == {A: "decode", B: "decode"}  # nothing moves before its instant
        assert pool.describe()["pending"] == {B: "prefill"}
        await asyncio.sleep(first - time.time() + 0.05)
        assert pool.leans() == {A: "prefill", B: "decode"}
        await asyncio.sleep(second - time.time() + 0.05)
        assert pool.leans() == {A: "prefill", B: "prefill"} and pool.pending == {}
        done = applied(pool)
        assert [c["effective"] for c in done] == [first, second]
        assert all(0 <= c["at"] - c["effective"] < 0.1 for c in done), done
        # read again (every renew_interval): nothing is applied twice
        shared._learn(steps((first, {A: "prefill", B: "decode"}), (second, {B: "prefill"})))
        assert len(applied(pool)) == 2
        # older than the step in effect: never applied, nothing moves backwards
        shared._learn(steps((second - 1.0, {A: "decode", B: "decode"})))
        assert pool.leans() == {A: "prefill", B: "prefill"}
        # read after its instant (a replica cut off): applied at once, the newest due one only
        await asyncio.sleep(0.3)
        late = time.time()
        shared._learn(steps((late - 0.2, {A: "decode"}), (late - 0.1, {B: "decode"})))
        assert pool.leans() == {A: "prefill", B: "decode"}
        assert applied(pool)[-1]["effective"] == late - 0.1
        # an engine that joins later takes the lean in effect for its address
        shared._learn(steps((round(time.time() + 0.05, 3), {C: "prefill"})))
        await asyncio.sleep(0.1)
        worker = plane.registry.add("pool", C)
        assert worker.lean == "prefill"
        await shared.close()

    asyncio.run(scenario())


def test_leans_written_without_steps_are_in_effect_at_once() -> None:
    async def scenario() -> None:
        shared, pool, _ = build()
        shared._learn({"leans": json.dumps({A: "prefill"}), "controller": "manual"})
        assert pool.leans() == {A: "prefill", B: "decode"} and pool.manual
        await shared.close()

    asyncio.run(scenario())
