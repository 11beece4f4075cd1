"""Prompt prefixes for cache-aware routing: the prompt's first characters as the engine will see
them, cut into fixed-size blocks with chained hashes, and an index of which worker last computed
which block.

A block's hash covers every character before its end, so two prompts share block `i` only if
they agree on all characters up to there, as an engine's prefix cache (16-token blocks, chained
hashes) works. Hashes are CRC-32 (zlib, fast): the same in every process, so proxies agree.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

CHAT = "/v1/chat/completions"


def prompt_prefix(path: str, body: dict[str, Any], limit: int) -> str:
    """The first `limit` characters of the prompt: chat messages as `role:content` lines."""
    if path != CHAT:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt[:limit]
        if isinstance(prompt, list):
            return ",".join(map(str, prompt[: limit // 4]))[:limit]
        return ""
    parts: list[str] = []
    size = 0
    for message in body.get("messages") or ():
        if size >= limit:
            break
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
        text = f"{message.get('role')}:{content if isinstance(content, str) else ''}\n"
        parts.append(text)
        size += len(text)
    return "".join(parts)[:limit]


def prefix_blocks(prefix: str, block_chars: int) -> list[int]:
    """Chained hashes of the prefix's full blocks of `block_chars` bytes (UTF-8)."""
    data = prefix.encode("utf-8", "surrogatepass")
    out: list[int] = []
    prev = 0
    for start in range(0, len(data) - block_chars + 1, block_chars):
        prev = zlib.crc32(data[start : start + block_chars], prev) | (start + 1) << 32
        out.append(prev)
    return out


def cached_tokens(tokens: int, blocks: int, block_chars: int, prompt_chars: int) -> int:
    """Of a prompt of `tokens` tokens and `prompt_chars` characters, the tokens in `blocks`
    leading blocks an engine holds (proportionally: blocks are counted in characters)."""
    return int(tokens * min(1.0, blocks * block_chars / max(prompt_chars, 1)))


class PrefixIndex:
    """Which workers (by URL) recently served each prefix block; forgets the least recently used
    blocks beyond `capacity`. Keeps at most `owners` workers per block, most recent first."""

    def __init__(self, capacity: int = 65536, owners: int = 4) -> None:
        self.capacity = capacity
        self.owners = owners
        self._blocks: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def matched(self, blocks: Sequence[int]) -> dict[str, int]:
        """For each worker that holds the first block: how many leading blocks it holds."""
        lengths: dict[str, int] = {}
        for depth, block in enumerate(blocks):
            owners = self._blocks.get(block)
            if not owners:
                break
            alive = False
            for url in owners:
                if lengths.get(url, 0) == depth:
                    lengths[url] = depth + 1
                    alive = True
            if not alive:
                break
        return lengths

    def record(self, blocks: Sequence[int], url: str) -> None:
        """`url` has just been given a prompt with these blocks."""
        for block in blocks:
            owners = self._blocks.pop(block, ())
            if url in owners:
                owners = tuple(u for u in owners if u != url)
            self._blocks[block] = (url, *owners[: self.owners - 1])
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def forget(self, url: str) -> None:
        """`url` holds nothing any more (its worker left): drop it from every block."""
        for block, owners in list(self._blocks.items()):
            if url in owners:
                kept = tuple(u for u in owners if u != url)
                if kept:
                    self._blocks[block] = kept
                else:
                    del self._blocks[block]
