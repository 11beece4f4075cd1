import pytest

from proxy.control.workers import EngineLoad, Health, Worker
from proxy.place.policies import RequestInfo, make_policy

INFO = RequestInfo("r", 10)
H, X = Health.HEALTHY, Health.UNHEALTHY
Row = tuple[int, EngineLoad | None, Health]


def pool(*rows: Row) -> list[Worker]:
    return [
        Worker("decode", f"d{i}", f"http://w{i}", inflight=n, health=h, engine_load=load)
        for i, (n, load, h) in enumerate(rows)
    ]


def load(running: float, waiting: float = 0, kv: float = 0.1, at: int = 0) -> EngineLoad:
    return EngineLoad(running, waiting, kv, at)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # no scrape yet: the proxy's own in-flight counts decide
        ([(3, None, H), (1, None, H)], 1),
        # the engine sees load the proxy did not send (another client): avoid it
        ([(0, load(40), H), (2, load(2, at=2), H)], 1),
        # waiting requests weigh double: 4 running + 3 waiting (10) > 9 running
        ([(0, load(4, 3), H), (0, load(9), H)], 1),
        # the proxy sent 5 since the scrape: 2 + 5 = 7 > 6
        ([(5, load(2, at=0), H), (6, load(6, at=6), H)], 1),
        # a nearly full KV cache is avoided even when it is the least loaded
        ([(0, load(1, kv=0.97), H), (0, load(20), H)], 1),
        # ... unless every worker is that full
        ([(0, load(1, kv=0.97), H), (0, load(20, kv=0.99), H)], 0),
        # unhealthy never, ties to the lowest index, none available is None
        ([(0, load(0), X), (9, load(9, at=9), H)], 1),
        ([(1, load(1, at=1), H), (1, load(1, at=1), H)], 0),
        ([(0, load(0), X)], None),
        ([], None),
    ],
)
def test_select(rows: list[Row], expected: int | None) -> None:
    assert make_policy("load_aware").select(pool(*rows), INFO) == expected
