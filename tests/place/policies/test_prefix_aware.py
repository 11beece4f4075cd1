import pytest

from proxy.control.workers import Health, Worker
from proxy.place.policies import PolicyOptions, RequestInfo, make_policy
from proxy.place.prefix import prefix_blocks

SYSTEM_A = "You are a pirate. " * 40  # 720 characters: two full 256-byte blocks and more
SYSTEM_B = "You are a lawyer. " * 40


def info(prefix: str) -> RequestInfo:
    return RequestInfo("r", len(prefix), prefix, tuple(prefix_blocks(prefix, 256)))


def pool(*inflight: int, health: Health = Health.HEALTHY) -> list[Worker]:
    return [
        Worker("prefill", f"p{i}", f"http://w{i}", inflight=n, health=health)
        for i, n in enumerate(inflight)
    ]


def test_same_prefix_same_worker() -> None:
    policy = make_policy("prefix_aware")
    workers = pool(0, 0, 0, 0)
    first = policy.select(workers, info(SYSTEM_A + "question one"))
    assert first is not None
    picks = {policy.select(workers, info(SYSTEM_A + f"question {i}")) for i in range(20)}
    assert picks == {first}


def test_longest_match_wins() -> None:
    policy = make_policy("prefix_aware")
    workers = pool(0, 0)
    history = SYSTEM_A + "turn one " * 60
    policy.index.record(policy_blocks(SYSTEM_A), "http://w0")
    policy.index.record(policy_blocks(history), "http://w1")
    assert policy.select(workers, info(history + "turn two")) == 1


def policy_blocks(text: str) -> list[int]:
    return prefix_blocks(text, PolicyOptions().prefix_block_chars)


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ((4, 0), 0),  # 4 over the least is within balance_abs=4: the cache hit wins
        ((5, 0), 1),  # 5 over and more than 1.5x: too imbalanced, go elsewhere
        ((9, 6), 0),  # 3 over: within
        ((20, 14), 0),  # 6 over but within 1.5x of 14
    ],
)
def test_load_bound(loads: tuple[int, int], expected: int) -> None:
    policy = make_policy("prefix_aware")
    policy.index.record(policy_blocks(SYSTEM_A), "http://w0")
    assert policy.select(pool(*loads), info(SYSTEM_A + "hello")) == expected


def test_new_prefixes_spread_and_are_stable() -> None:
    a, b = make_policy("prefix_aware"), make_policy("prefix_aware")
    workers = pool(0, 0, 0, 0)
    prompts = [f"System prompt number {i}. " * 30 for i in range(40)]
    picks = [a.select(workers, info(p)) for p in prompts]
    assert len(set(picks)) == 4  # rendezvous hashing spreads distinct prefixes
    assert [b.select(workers, info(p)) for p in prompts] == picks  # and another proxy agrees


def test_short_prompt_goes_to_least_loaded() -> None:
    policy = make_policy("prefix_aware")
    assert policy.select(pool(3, 1, 2), info("hi")) == 1


def test_unavailable() -> None:
    policy = make_policy("prefix_aware")
    policy.index.record(policy_blocks(SYSTEM_B), "http://w0")
    workers = pool(0, 0)
    workers[0].health = Health.UNHEALTHY
    assert policy.select(workers, info(SYSTEM_B)) == 1
    assert policy.select(pool(0, health=Health.UNHEALTHY), info(SYSTEM_B)) is None
    assert policy.select([], info(SYSTEM_B)) is None
