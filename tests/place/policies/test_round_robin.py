from proxy.control.workers import Health, Worker
from proxy.place.policies import RequestInfo, make_policy

INFO = RequestInfo("r", 10)


def workers(*health: Health) -> list[Worker]:
    return [Worker("decode", f"d{i}", f"http://w{i}", health=h) for i, h in enumerate(health)]


def test_cycles_in_order() -> None:
    policy = make_policy("round_robin")
    pool = workers(Health.HEALTHY, Health.HEALTHY, Health.UNKNOWN)
    assert [policy.select(pool, INFO) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_skips_unhealthy_and_keeps_turn() -> None:
    policy = make_policy("round_robin")
    pool = workers(Health.HEALTHY, Health.UNHEALTHY, Health.HEALTHY)
    assert [policy.select(pool, INFO) for _ in range(4)] == [0, 2, 0, 2]


def test_none_when_all_unavailable() -> None:
    policy = make_policy("round_robin")
    assert policy.select(workers(Health.UNHEALTHY, Health.UNHEALTHY), INFO) is None
    assert policy.select([], INFO) is None
