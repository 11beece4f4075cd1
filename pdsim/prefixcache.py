"""The engine's automatic prefix cache (vLLM ``--enable-prefix-caching``), simplified.

Full 16-token blocks are keyed by their chained content hash (``kvcache.block_contents``), so a
prompt hits the cache for its longest run of leading blocks that an earlier prompt shared; as in
vLLM, never its last token (the engine computes it again for the logits), so a prompt of
exactly n blocks hits at most n - 1. The cache holds at most ``capacity`` blocks and forgets the
least recently used first. Only the time saved is modelled: cached blocks do not take ids from
the block pool.

With KV events on (pdsim.kvevents), each call reports what it stored and evicted, as vLLM's
block pool does: ``BlockStored`` for each run of new blocks (with its parent's hash),
``BlockRemoved`` for each eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from pdsim.kvcache import block_contents
from pdsim.kvevents import removed, stored
from pdsim.shape import BLOCK_SIZE
from proxy.engines.kvevents_wire import Event


class PrefixCache:
    def __init__(
        self, capacity: int, publish: Callable[[list[Event]], object] | None = None
    ) -> None:
        self.capacity = capacity
        self.publish = publish
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def peek(self, token_ids: list[int]) -> int:
        """Tokens of the prompt's leading full blocks cached now (before its last token), as
        `lookup_and_insert` would count them, changing nothing: what the engine truly holds
        for the prompt (the benchmarks' oracle, the tests' truth)."""
        usable = (len(token_ids) - 1) // BLOCK_SIZE
        if self.capacity <= 0 or usable <= 0:
            return 0
        hits = 0
        for content in block_contents(token_ids, usable * BLOCK_SIZE):
            if content not in self._blocks:
                break
            hits += 1
        return hits * BLOCK_SIZE

    def lookup_and_insert(self, token_ids: list[int]) -> int:
        """Tokens of the prompt's leading full blocks already cached (before its last token);
        then cache all of its full blocks (most recently used last)."""
        full = len(token_ids) // BLOCK_SIZE * BLOCK_SIZE
        if self.capacity <= 0 or full == 0:
            return 0
        contents = block_contents(token_ids, full)
        hits = 0
        while hits < (len(token_ids) - 1) // BLOCK_SIZE and contents[hits] in self._blocks:
            hits += 1
        new: list[int] = []  # indexes of blocks not cached before
        for i, content in enumerate(contents):
            if content in self._blocks:
                self._blocks.move_to_end(content)
            else:
                self._blocks[content] = None
                new.append(i)
        evicted: list[int] = []
        while len(self._blocks) > self.capacity:
            evicted.append(self._blocks.popitem(last=False)[0])
        if self.publish is not None and (new or evicted):
            self.publish(self._events(token_ids, contents, new, evicted))
        return hits * BLOCK_SIZE

    @staticmethod
    def _events(
        token_ids: list[int], contents: list[int], new: list[int], evicted: list[int]
    ) -> list[Event]:
        events: list[Event] = []
        run: list[int] = []
        for pos, i in enumerate(new):
            run.append(i)
            if pos + 1 == len(new) or new[pos + 1] != i + 1:
                first = run[0]
                events.append(
                    stored(
                        [contents[j] for j in run],
                        contents[first - 1] if first else None,
                        token_ids[first * BLOCK_SIZE : (run[-1] + 1) * BLOCK_SIZE],
                        BLOCK_SIZE,
                    )
                )
                run = []
        if evicted:
            events.append(removed(evicted))
        return events
