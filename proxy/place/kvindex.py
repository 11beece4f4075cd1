"""The exact prefix index: which prompt blocks each engine holds, from the engines' own
KV-cache events (proxy.engines.kvevents_wire; fed by proxy.control.kvevents), pure.

vLLM hashes a block as H(parent's hash, the block's token ids, extra keys) with a hash
function and seed of the engine's configuration (`vllm/v1/core/kv_cache_utils.py`,
`hash_block_tokens`); with a random seed (a non-cryptographic hash, or PYTHONHASHSEED) the
proxy could not compute it. A `BlockStored` event carries the blocks' token ids and the
parent's engine hash, so the index keys each block by a chain hash of its own over token ids
(`chain`: Python's hash of the tuple of the parent's key and the block's tokens, 64 bits; for
tuples of ints it is not randomised per process, so every proxy process computes the same keys,
and it is about five times as fast as BLAKE2b over the same tokens, which matters on the
request path: benchmarks/kvindex_lookup.py) and maps the engine's hashes to these keys; a
prompt's keys are then computed from its token ids alone. A collision (not cryptographically
excluded) could only make the index claim a hit the engine then does not have: a placement
decision, never an answer, would be wrong.

A lookup counts the leading full blocks of the prompt an engine holds, as the engine's
`find_longest_cache_hit` does: whole blocks of the engine's `block_size`, and never the
prompt's last token (the engine recomputes it for the logits: `max_cache_hit_length =
num_tokens - 1`), so a prompt of exactly n blocks can hit at most n - 1.

vLLM may hold one hash in several blocks (two requests computed the same block at once); it
then stores and removes each copy, so the index counts copies. Blocks it cannot match by token
ids alone are not indexed: other KV-cache groups than the first, other media than the
engine's own cache, LoRA blocks, and blocks with extra keys (multimodal inputs, cache_salt),
nor are blocks whose parent the index never saw (after a gap that could not be repaired).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proxy.engines.kvevents_wire import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    Event,
)

ROOT = 0  # the parent key of a prompt's first block
OWN_MEDIA = (None, "GPU")


def chain(parent: int, tokens: Sequence[int]) -> int:
    """The key of a block of `tokens` after the block keyed `parent`."""
    return hash((parent, *tokens))


def prompt_keys(tokens: Sequence[int], block_size: int) -> list[int]:
    """The keys of the prompt's blocks that can hit: full blocks before its last token."""
    keys: list[int] = []
    parent = ROOT
    for start in range(0, (len(tokens) - 1) // block_size * block_size, block_size):
        parent = chain(parent, tokens[start : start + block_size])
        keys.append(parent)
    return keys


def _plain(event: BlockStored) -> bool:
    """Blocks keyed by token ids alone in the engine's own cache, first KV-cache group."""
    return (
        event.medium in OWN_MEDIA
        and event.group_idx in (None, 0)
        and event.lora_id is None
        and event.lora_name is None
        and not (event.extra_keys and any(k for k in event.extra_keys))
        and event.block_size > 0
        and len(event.token_ids) == len(event.block_hashes) * event.block_size
    )


@dataclass
class EngineBlocks:
    """What one engine holds: its hashes' keys, their copies, and the keys held."""

    block_size: int | None = None
    keys: dict[BlockHash, int] = field(default_factory=dict)
    copies: dict[BlockHash, int] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)
    skipped: int = 0  # stored blocks the index could not key (see the module's docstring)
    removed: int = 0  # blocks the engine said it evicted

    def store(self, event: BlockStored) -> None:
        parent = event.parent_block_hash
        key = ROOT if parent is None else self.keys.get(parent)
        if key is None or not _plain(event):
            self.skipped += len(event.block_hashes)
            return
        size = event.block_size
        self.block_size = size
        for i, engine_hash in enumerate(event.block_hashes):
            key = chain(key, event.token_ids[i * size : (i + 1) * size])
            count = self.copies.get(engine_hash, 0)
            self.copies[engine_hash] = count + 1
            if count == 0:
                self.keys[engine_hash] = key
                self.held[key] = self.held.get(key, 0) + 1

    def remove(self, event: BlockRemoved) -> None:
        if event.medium not in OWN_MEDIA or event.group_idx not in (None, 0):
            return
        for engine_hash in event.block_hashes:
            count = self.copies.get(engine_hash)
            if count is None:
                continue
            self.removed += 1
            if count > 1:
                self.copies[engine_hash] = count - 1
                continue
            del self.copies[engine_hash]
            key = self.keys.pop(engine_hash)
            left = self.held[key] - 1
            if left:
                self.held[key] = left
            else:
                del self.held[key]

    def clear(self) -> None:
        self.keys.clear()
        self.copies.clear()
        self.held.clear()

    def digest(self) -> str:
        """A fingerprint of the keys held and their copies, the same in every process that
        applied the same events (replicas compare theirs: GET /admin/prefix-index)."""
        h = hashlib.blake2b(digest_size=8)
        for key, copies in sorted(self.held.items()):
            h.update(key.to_bytes(8, "big", signed=True) + copies.to_bytes(4, "big"))
        return h.hexdigest()

    def leading(self, keys: Sequence[int]) -> int:
        """How many of `keys`, from the first, this engine holds."""
        for depth, key in enumerate(keys):
            if key not in self.held:
                return depth
        return len(keys)


class KvIndex:
    """Per engine (by URL): the blocks it holds, from its events."""

    def __init__(self) -> None:
        self.engines: dict[str, EngineBlocks] = {}

    def __contains__(self, url: str) -> bool:
        return url in self.engines

    def apply(self, url: str, events: Iterable[Event]) -> None:
        blocks = self.engines.setdefault(url, EngineBlocks())
        for event in events:
            if isinstance(event, BlockStored):
                blocks.store(event)
            elif isinstance(event, BlockRemoved):
                blocks.remove(event)
            elif isinstance(event, AllBlocksCleared):
                blocks.clear()

    def clear(self, url: str) -> None:
        """`url` holds nothing now (it restarted, or events were lost): start it afresh."""
        blocks = self.engines.get(url)
        if blocks is not None:
            blocks.clear()

    def forget(self, url: str) -> None:
        """`url` left: drop its entries and stop answering for it."""
        self.engines.pop(url, None)

    def cached(self, tokens: Sequence[int], urls: Iterable[str]) -> dict[str, int]:
        """Of the prompt `tokens`, the leading tokens each engine in `urls` that has events
        holds, block-aligned the engine's way; engines without events are left out."""
        out: dict[str, int] = {}
        keys_by_size: dict[int, list[int]] = {}
        for url in urls:
            blocks = self.engines.get(url)
            if blocks is None:
                continue
            size = blocks.block_size
            if size is None:  # no block stored yet: it holds nothing
                out[url] = 0
                continue
            keys = keys_by_size.get(size)
            if keys is None:
                keys = keys_by_size[size] = prompt_keys(tokens, size)
            out[url] = blocks.leading(keys) * size
        return out
