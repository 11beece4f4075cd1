import pytest

from proxy.control.workers import Health, Worker
from proxy.place.policies import RequestInfo, make_policy

INFO = RequestInfo("r", 10)


def pool(*loads: tuple[int, int, Health]) -> list[Worker]:
    return [
        Worker("prefill", f"p{i}", f"http://w{i}", inflight=n, inflight_chars=c, health=h)
        for i, (n, c, h) in enumerate(loads)
    ]


H, U, X = Health.HEALTHY, Health.UNKNOWN, Health.UNHEALTHY


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ([(0, 0, H)], 0),
        ([(2, 0, H), (1, 0, H), (3, 0, H)], 1),
        ([(1, 500, H), (1, 100, H)], 1),  # tie on requests: fewer in-flight characters
        ([(1, 100, H), (1, 100, H)], 0),  # full tie: lowest index
        ([(0, 0, X), (5, 0, U)], 1),  # unhealthy is never chosen, unknown is
        ([(0, 0, X), (0, 0, X)], None),
        ([], None),
    ],
)
def test_select(loads: list[tuple[int, int, Health]], expected: int | None) -> None:
    assert make_policy("least_loaded").select(pool(*loads), INFO) == expected


def test_unknown_policy_name() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("random")
