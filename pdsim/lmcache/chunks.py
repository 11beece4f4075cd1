"""The chunks LMCache saves of a prompt: their chained keys and token counts."""

from __future__ import annotations


def chunk_keys(
    token_ids: list[int], chunk_size: int, save_unfull: bool = True
) -> list[tuple[int, int]]:
    """(key, tokens) of each chunk: full chunks, then the partial last one unless `save_unfull`
    is off; key i is a hash chained over every token up to its end. Without `save_unfull` a
    prompt shorter than one chunk saves nothing (LMCache 0.3.12-0.4.1, #2510)."""
    end = len(token_ids) if save_unfull else len(token_ids) - len(token_ids) % chunk_size
    out: list[tuple[int, int]] = []
    prev = 0
    for start in range(0, end, chunk_size):
        chunk = token_ids[start : min(start + chunk_size, end)]
        prev = hash((prev, *chunk))
        out.append((prev, len(chunk)))
    return out
