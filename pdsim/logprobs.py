"""Log-probabilities of the simulated model, in vLLM 0.32's wire shapes.

The model is a function of the context state (``model.Generation``'s hash of the tokens so far):
in each context the greedy token has rank 1 and a log-probability in (-0.5, 0], candidate r
(``model.candidate``) rank r + 1 and about -r, any other token a rank above 100 and below -10.
So logprobs are deterministic, and the same on a decoder that pulled the prompt's KV as on one
that computed it.

A position is the list of ``(token id, logprob, rank)`` vLLM returns for one token: the token
itself first, then the top ``k`` others (k entries in all when the token is among them).
"""

from __future__ import annotations

import itertools
from typing import Any

from pdsim.model import advance, candidate, prompt_seed, splitmix64
from pdsim.tokenizer import SimTokenizer

Position = list[tuple[int, float, int]]
_MAX_CANDIDATES = 64  # ranks searched for a token before it counts as unlikely


def _logprob(state: int, rank: int) -> float:
    frac = ((splitmix64(state ^ rank) & 0x3FF) + 1) / 1024
    return -frac / 2 if rank == 0 else -(rank + frac)


def position(state: int, greedy: int, token: int, k: int, gen_ids: tuple[int, ...]) -> Position:
    """The logprobs of `token` chosen in context `state`, with the top `k` (-1: all)."""
    k = len(gen_ids) if k < 0 else min(k, len(gen_ids))
    top = [candidate(state, r, gen_ids, greedy) for r in range(k)]
    if token in top:
        rank = top.index(token)
        own = (token, _logprob(state, rank), rank + 1)
    else:
        ranks = [candidate(state, r, gen_ids, greedy) for r in range(k, _MAX_CANDIDATES)]
        if token in ranks:
            rank = k + ranks.index(token)
            own = (token, _logprob(state, rank), rank + 1)
        else:
            hashed = splitmix64(state ^ (token * 0x2545F4914F6CDD1D))
            own = (token, -(10 + (hashed & 0xFFFF) / 4096), 100 + hashed % 900)
    return [own] + [(t, _logprob(state, r), r + 1) for r, t in enumerate(top) if t != token]


def prompt_positions(
    prompt_ids: list[int], k: int, gen_ids: tuple[int, ...]
) -> list[Position | None]:
    """vLLM's prompt logprobs: none for the first token, then each token in its context."""
    out: list[Position | None] = [None]
    state = prompt_seed([])
    for prev, token in itertools.pairwise(prompt_ids):
        state = advance(state, prev)
        greedy = gen_ids[(splitmix64(state) >> 24) % len(gen_ids)]
        out.append(position(state, greedy, token, k, gen_ids))
    return out


def prompt_logprobs_body(
    positions: list[Position | None], tok: SimTokenizer
) -> list[dict[str, Any] | None]:
    """`prompt_logprobs` as vLLM serialises it: token id -> logprob, rank, decoded token."""
    return [
        None
        if pos is None
        else {
            str(t): {"logprob": lp, "rank": rank, "decoded_token": tok.token_text(t)}
            for t, lp, rank in pos
        }
        for pos in positions
    ]


def completion_logprobs(
    tokens: list[int], positions: list[Position | None], k: int, tok: SimTokenizer, offset: int
) -> dict[str, Any]:
    """A completion choice's `logprobs` (k + 1 entries in each `top_logprobs`, as vLLM)."""
    offsets: list[int] = []
    logprobs: list[float | None] = []
    texts: list[str] = []
    tops: list[dict[str, float] | None] = []
    for token, pos in zip(tokens, positions, strict=True):
        text = tok.token_text(token)
        offsets.append(offset)
        offset += len(text)
        texts.append(text)
        if pos is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(pos[0][1])
        tops.append(
            {tok.token_text(t): lp for i, (t, lp, _) in enumerate(pos) if k == -1 or i <= k}
        )
    return {"text_offset": offsets, "token_logprobs": logprobs, "tokens": texts,
            "top_logprobs": tops}  # fmt: skip


def chat_logprobs(positions: list[Position], k: int, tok: SimTokenizer) -> dict[str, Any]:
    """A chat choice's `logprobs` (the first `top_logprobs` entries, as vLLM)."""
    content = []
    for pos in positions:
        text = tok.token_text(pos[0][0])
        top = [
            {"token": (t_text := tok.token_text(t)), "logprob": lp, "bytes": list(t_text.encode())}
            for i, (t, lp, _) in enumerate(pos)
            if k == -1 or i < k
        ]
        content.append(
            {"token": text, "logprob": pos[0][1], "bytes": list(text.encode()), "top_logprobs": top}
        )
    return {"content": content}
