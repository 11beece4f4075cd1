"""Reading an engine's Prometheus text exposition: sums of the samples of named metrics.

The engines' load (proxy.scrape), the admission probes' proof of a KV pull and the console's
view of each engine all read a few metrics out of `/metrics`; label sets (engines, data-parallel
ranks, model names) are summed.
"""

from __future__ import annotations

from collections.abc import Iterable


def sample_sums(text: bytes, names: Iterable[str]) -> dict[str, float]:
    """For each of `names` present in `text`: the sum of its samples (absent names are left out).
    A name matches a sample exactly: `vllm:x_count` is not `vllm:x_count_total`."""
    wanted = {name.encode() for name in names}
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith(b"#"):
            continue
        brace, space = line.find(b"{"), line.find(b" ")
        end = brace if 0 <= brace < space or (brace >= 0 and space < 0) else space
        name = line[:end] if end >= 0 else line
        if name not in wanted:
            continue
        try:
            value = float(line.rsplit(b" ", 1)[1])
        except (IndexError, ValueError):
            continue
        key = name.decode()
        found[key] = found.get(key, 0.0) + value
    return found
