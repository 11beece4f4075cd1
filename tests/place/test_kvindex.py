"""The exact prefix index: fed the events an engine would send, it answers how many leading
prompt tokens each engine holds, whatever the engine's hash seed."""

from __future__ import annotations

import hashlib
import os
import random

from proxy.engines.kvevents_wire import AllBlocksCleared, BlockRemoved, BlockStored
from proxy.place.kvindex import KvIndex, prompt_keys

BS = 4


class Engine:
    """Hashes blocks as vLLM does, with a seed of its own, and says what it stores."""

    def __init__(self, seed: bytes | None = None) -> None:
        self.seed = seed if seed is not None else os.urandom(8)
        self.by_block: dict[tuple[int, ...], bytes] = {}

    def hashes(self, tokens: list[int]) -> list[bytes]:
        out, parent = [], self.seed
        for start in range(0, len(tokens) // BS * BS, BS):
            parent = hashlib.sha256(parent + repr(tokens[start : start + BS]).encode()).digest()
            out.append(parent)
        return out

    def stored(self, tokens: list[int], first: int = 0, **extra: object) -> BlockStored:
        hashes = self.hashes(tokens)
        return BlockStored(
            block_hashes=list(hashes[first:]),
            parent_block_hash=hashes[first - 1] if first else None,
            token_ids=tokens[first * BS : len(hashes) * BS],
            block_size=BS,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            **extra,  # type: ignore[arg-type]
        )

    def removed(self, tokens: list[int], blocks: slice) -> BlockRemoved:
        return BlockRemoved(block_hashes=self.hashes(tokens)[blocks], medium="GPU")


PROMPT = list(range(100, 118))  # 18 tokens: 4 full blocks, and 2 more


def test_a_stored_prompt_is_held_up_to_its_last_full_block_before_the_last_token() -> None:
    index, engine = KvIndex(), Engine()
    index.apply("a", [engine.stored(PROMPT)])
    assert index.cached(PROMPT, ["a", "b"]) == {"a": 16}
    assert index.cached(PROMPT[:16], ["a"]) == {"a": 12}  # the last token is recomputed
    assert index.cached(PROMPT[:17], ["a"]) == {"a": 16}
    assert index.cached([*PROMPT[:9], 7, 7, 7, 7], ["a"]) == {"a": 8}
    assert index.cached([1, *PROMPT], ["a"]) == {"a": 0}


def test_keys_do_not_depend_on_the_engines_seed() -> None:
    index = KvIndex()
    index.apply("a", [Engine(b"one").stored(PROMPT)])
    index.apply("b", [Engine(b"two").stored(PROMPT[:9])])
    assert index.cached(PROMPT, ["a", "b"]) == {"a": 16, "b": 8}


def test_a_later_store_chains_on_its_parent_and_an_unknown_parent_is_skipped() -> None:
    index, engine = KvIndex(), Engine()
    index.apply("a", [engine.stored(PROMPT[:8])])
    index.apply("a", [engine.stored(PROMPT, first=2)])
    assert index.cached(PROMPT, ["a"]) == {"a": 16}
    other = KvIndex()
    other.apply("a", [engine.stored(PROMPT, first=2)])
    assert other.cached(PROMPT, ["a"]) == {"a": 0}
    assert other.engines["a"].skipped == 2


def test_removal_shortens_the_match_and_copies_are_counted() -> None:
    index, engine = KvIndex(), Engine()
    index.apply("a", [engine.stored(PROMPT), engine.stored(PROMPT[:8])])  # two copies of 2
    index.apply("a", [engine.removed(PROMPT, slice(2, 3))])
    assert index.cached(PROMPT, ["a"]) == {"a": 8}
    index.apply("a", [engine.removed(PROMPT, slice(1, 2))])
    assert index.cached(PROMPT, ["a"]) == {"a": 8}  # one copy of block 1 is left
    index.apply("a", [engine.removed(PROMPT, slice(1, 2))])
    assert index.cached(PROMPT, ["a"]) == {"a": 4}


def test_clearing_and_forgetting() -> None:
    index, engine = KvIndex(), Engine()
    index.apply("a", [engine.stored(PROMPT)])
    index.apply("a", [AllBlocksCleared()])
    assert index.cached(PROMPT, ["a"]) == {"a": 0}
    index.apply("a", [engine.stored(PROMPT)])
    index.clear("a")
    assert index.cached(PROMPT, ["a"]) == {"a": 0}
    index.forget("a")
    assert index.cached(PROMPT, ["a"]) == {}


def test_blocks_not_keyed_by_tokens_alone_are_not_indexed() -> None:
    engine = Engine()
    for extra in (
        {"extra_keys": [["salt"], None, None, None]},
        {"group_idx": 1},
    ):
        index = KvIndex()
        index.apply("a", [engine.stored(PROMPT, **extra)])
        assert index.cached(PROMPT, ["a"]) == {"a": 0}, extra
    index = KvIndex()
    index.apply("a", [engine.stored(PROMPT, extra_keys=[None] * 4)])
    assert index.cached(PROMPT, ["a"]) == {"a": 16}


def test_against_a_model_of_the_engines_cache() -> None:
    """Random stores and evictions: the index's answer is the longest held chain."""
    rng = random.Random(7)
    index, engine = KvIndex(), Engine()
    index.apply("a", [])
    held: set[tuple[int, ...]] = set()
    prompts = [[rng.randrange(3) for _ in range(rng.randrange(1, 30))] for _ in range(40)]
    for step in range(300):
        tokens = rng.choice(prompts)
        n = len(tokens) // BS
        if rng.random() < 0.6 and n:
            have = 0
            while have < n and tuple(tokens[: (have + 1) * BS]) in held:
                have += 1
            if have < n:
                index.apply("a", [engine.stored(tokens, first=have)])
                held.update(tuple(tokens[: (i + 1) * BS]) for i in range(have, n))
        elif held:  # evict a leaf, as vLLM's LRU frees a chain's tail first
            leaves = sorted(
                c for c in held if not any(len(d) > len(c) and d[: len(c)] == c for d in held)
            )
            leaf = rng.choice(leaves)
            held.discard(leaf)
            index.apply(
                "a", [BlockRemoved(block_hashes=engine.hashes(list(leaf))[-1:], medium="GPU")]
            )
        probe = rng.choice(prompts)
        want = 0
        while (want + 1) * BS <= len(probe) - 1 and tuple(probe[: (want + 1) * BS]) in held:
            want += 1
        assert index.cached(probe, ["a"]) == {"a": want * BS}, step


def test_prompt_keys_cover_full_blocks_before_the_last_token() -> None:
    assert len(prompt_keys(list(range(9)), 4)) == 2
    assert len(prompt_keys(list(range(8)), 4)) == 1
    assert prompt_keys([], 4) == []
