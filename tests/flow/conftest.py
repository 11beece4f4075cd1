"""The behaviour suite's topologies, one set per connector (`connector` is parametrized over
every connector; see rig.py) and per count of serving processes (`serving_procs`: 1, and 2 too
for a test marked `workers2`, tests/conftest.py). Topologies live as long as their scope; each
test resets the sims."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flow.rig import CONNECTORS, WIRES, Engines, Topology, start_topology

STRICT = (
    "failover: {prefill_retries: 0, decode_retries: 0, fallback_local_prefill: false}\n"
    "timeouts: {prefill: 0.5, decode_first_byte: 0.5, decode_idle: 0.5}\n"
    "health: {interval: 0}\n"
)


class EnginePool:
    """Each connector's engines, started when a test first asks for them, stopped at the end."""

    def __init__(self, request: pytest.FixtureRequest, logs: Path) -> None:
        self._request = request
        self._logs = logs
        self._engines: dict[str, Engines] = {}

    def __getitem__(self, connector: str) -> Engines:
        if connector not in self._engines:
            wire = WIRES[connector]
            sims = self._request.getfixturevalue("sims") if connector == "nixl" else None
            self._engines[connector] = Engines(self._logs, wire, sims)
        return self._engines[connector]

    def stop(self) -> None:
        for engines in self._engines.values():
            engines.stop()


@pytest.fixture(scope="session")
def engine_pool(request: pytest.FixtureRequest, logs: Path) -> Iterator[EnginePool]:
    pool = EnginePool(request, logs)
    yield pool
    pool.stop()


@pytest.fixture(scope="session", params=CONNECTORS)
def connector(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def engines(engine_pool: EnginePool, connector: str) -> Engines:
    return engine_pool[connector]


def _topology(engines: Engines, name: str, **kw: object) -> Iterator[Topology]:
    topo = start_topology(engines, name, **kw)  # type: ignore[arg-type]
    try:
        yield topo
    finally:
        topo.stop()


@pytest.fixture(scope="session")
def _pd(engines: Engines, serving_procs: int) -> Iterator[Topology]:
    yield from _topology(engines, "1p1d", workers=serving_procs)


@pytest.fixture
def pd(_pd: Topology) -> Topology:
    """1 prefiller, 1 decoder, the default config, reset."""
    return _pd.reset()


@pytest.fixture(scope="session")
def _strict(engines: Engines, serving_procs: int) -> Iterator[Topology]:
    yield from _topology(engines, "strict", config=STRICT, workers=serving_procs)


@pytest.fixture
def strict(_strict: Topology) -> Topology:
    """1p1d with failover off and 0.5 s timeouts: every engine failure reaches the client."""
    return _strict.reset()


@pytest.fixture(scope="session")
def _pd_2p2d(engines: Engines, serving_procs: int) -> Iterator[Topology]:
    yield from _topology(engines, "2p2d", prefillers=2, decoders=2, workers=serving_procs)


@pytest.fixture
def pd_2p2d(_pd_2p2d: Topology) -> Topology:
    """2 prefillers, 2 decoders, the default config (least_loaded), reset."""
    return _pd_2p2d.reset()
