from pdsim.prefixcache import PrefixCache
from proxy.engines.kvevents_wire import BlockRemoved, BlockStored, Event
from proxy.place.kvindex import KvIndex


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
    assert cache.lookup_and_insert(list(range(200, 217))) == 16


def test_disabled() -> None:
    assert PrefixCache(capacity=0).lookup_and_insert(list(range(64))) == 0


def test_never_the_last_token_as_vllm() -> None:
    cache = PrefixCache(capacity=100)
    cache.lookup_and_insert(list(range(32)))
    assert cache.lookup_and_insert(list(range(32))) == 16  # the last token is computed again
    assert cache.lookup_and_insert(list(range(33))) == 32


def test_events_say_what_was_stored_and_evicted() -> None:
    batches: list[list[Event]] = []
    cache = PrefixCache(capacity=3, publish=batches.append)
    a = list(range(40))  # 2 full blocks
    cache.lookup_and_insert(a)
    cache.lookup_and_insert([*a[:32], 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 1])
    cache.lookup_and_insert(a)  # all cached: nothing to say
    assert len(batches) == 2
    first, second = batches
    assert isinstance(first[0], BlockStored) and first[0].parent_block_hash is None
    assert len(first[0].block_hashes) == 2 and first[0].token_ids == a[:32]
    stored = second[0]
    assert isinstance(stored, BlockStored) and stored.parent_block_hash == first[0].block_hashes[1]
    assert stored.token_ids == [9] * 16
    cache.lookup_and_insert(list(range(500, 517)))  # evicts the least recently used block
    assert isinstance(batches[-1][-1], BlockRemoved)
    index, applied = KvIndex(), 0
    for probe in (a, list(range(500, 520)), [*a[:32], *[9] * 16, 2], a, list(range(600, 650))):
        for batch in batches[applied:]:
            index.apply("sim", batch)
        applied = len(batches)
        assert index.cached(probe, ["sim"]) == {"sim": cache.lookup_and_insert(probe)}, probe


def test_peek_counts_as_a_lookup_would_and_changes_nothing() -> None:
    batches: list[list[Event]] = []
    cache = PrefixCache(capacity=2, publish=batches.append)
    a, b = list(range(16)), list(range(100, 116))
    cache.lookup_and_insert([*a, *b])
    assert cache.peek([*a, *b]) == 16  # never the last token
    assert cache.peek([*a, *b, 7]) == 32
    assert cache.peek([*b, 7]) == 0  # b only after a
    assert len(batches) == 1  # no event, no insertion
    cache.lookup_and_insert(list(range(200, 217)))  # evicts a (a peek did not refresh it)
    assert cache.peek([*a, *b, 7]) == 0
    assert cache.lookup_and_insert([*a, *b, 7]) == 0
