"""The engine's automatic prefix cache (vLLM ``--enable-prefix-caching``), simplified.

Full 16-token blocks are keyed by their chained content hash (``kvcache.block_contents``), so a
prompt hits the cache for its longest run of leading blocks that an earlier prompt shared. The
cache holds at most ``capacity`` blocks and forgets the least recently used first. Only the time
saved is modelled: cached blocks do not take ids from the block pool.
"""

from __future__ import annotations

from collections import OrderedDict

from pdsim.kvcache import block_contents
from pdsim.shape import BLOCK_SIZE


class PrefixCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup_and_insert(self, token_ids: list[int]) -> int:
        """Tokens of the prompt's leading full blocks already cached; then cache all of its full
        blocks (most recently used last)."""
        full = len(token_ids) // BLOCK_SIZE * BLOCK_SIZE
        if self.capacity <= 0 or full == 0:
            return 0
        hits = 0
        missed = False
        for content in block_contents(token_ids, full):
            if not missed and content in self._blocks:
                hits += 1
                self._blocks.move_to_end(content)
                continue
            missed = True
            self._blocks[content] = None
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        return hits * BLOCK_SIZE
