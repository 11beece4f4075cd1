"""CPU per request of the exact prefix index (proxy.place.kvindex): the planner's lookup of a
prompt's token ids in what each engine holds (chain hashes of the prompt's blocks, then a walk
per engine), for prompts of several lengths and engines holding shares of them. It runs in the
planner, on the request path, after /tokenize answered.

    python benchmarks/kvindex_lookup.py

Results: benchmarks/results/kvindex_lookup.md.
"""

from __future__ import annotations

import functools
import random
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, provenance, provenance_lines
from proxy.engines.kvevents_wire import BlockStored
from proxy.place.kvindex import KvIndex

BLOCK = 16
ENGINES = 4


def index_for(ids: list[int]) -> KvIndex:
    """Engine e holds the first 1/(e+1) of the prompt, as its events would say."""
    index = KvIndex()
    for e in range(ENGINES):
        held = ids[: len(ids) // (e + 1) // BLOCK * BLOCK]
        hashes: list[bytes | int] = [f"{e}-{i}".encode() for i in range(len(held) // BLOCK)]
        stored = BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=held,
            block_size=BLOCK,
            lora_id=None,
            medium="GPU",
            lora_name=None,
        )
        index.apply(f"http://engine{e}", [stored])
    return index


def main() -> int:
    rng = random.Random(1)
    rows = []
    for n in (500, 2000, 8000, 32000):
        ids = [rng.randrange(128000) for _ in range(n)]
        index = index_for(ids)
        lookup = functools.partial(index.cached, ids, list(index.engines))
        best = min(timeit.repeat(lookup, number=100, repeat=5)) / 100
        rows.append((n, best * 1e6))
        print(
            f"{n:>6} prompt tokens, {ENGINES} engines: {best * 1e6:.0f} us per lookup", flush=True
        )
    lines = [
        "# The exact prefix index: CPU per lookup",
        "",
        *provenance_lines(provenance([Path(sys.executable).name, *sys.argv])),
        f"- {ENGINES} engines, blocks of {BLOCK} tokens; engine e holds the first 1/(e+1) of the "
        "prompt; the best of 5 runs of 100 lookups, one core",
        "",
        "| prompt tokens | us per lookup |",
        "|---|---|",
        *(f"| {n} | {us:.0f} |" for n, us in rows),
    ]
    out = RESULTS / "kvindex_lookup.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
