from pdsim.prefixcache import PrefixCache


def test_hits_leading_full_blocks_only() -> None:
    cache = PrefixCache(capacity=100)
    system = list(range(1000, 1040))  # 2 full blocks of 16, and 8 more
    assert cache.lookup_and_insert([*system, 1, 2, 3]) == 0
    assert cache.lookup_and_insert([*system, 7, 8, 9]) == 32  # the shared full blocks
    assert cache.lookup_and_insert([5, *system]) == 0  # a different first token: no prefix hit
    assert cache.lookup_and_insert([1, 2]) == 0  # no full block


def test_forgets_least_recently_used() -> None:
    cache = PrefixCache(capacity=2)
    a, b = list(range(16)), list(range(100, 116))
    cache.lookup_and_insert(a)
    cache.lookup_and_insert(b)
    cache.lookup_and_insert(list(range(200, 216)))  # evicts a
    assert len(cache) == 2
    assert cache.lookup_and_insert(a) == 0
    assert cache.lookup_and_insert(list(range(200, 216))) == 16


def test_disabled() -> None:
    assert PrefixCache(capacity=0).lookup_and_insert(list(range(64))) == 0
