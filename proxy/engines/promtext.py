"""Reading an engine's Prometheus text exposition (`/metrics`): the proxy's one parser of it.

The engines' load and prefix-caching flag (proxy.engines.scrape), KV-transfer health
(proxy.control.kvhealth), the admission probes' proof of a KV pull and the console's view of each
engine all read a few metrics out of the same text. `parse` keeps the samples of the metrics
asked for, each with its label set; the readers sum them (engines, data-parallel ranks, model
names), take the highest, or read a label.

A sample's name matches exactly: `vllm:x_count` is not `vllm:x_count_total`. Comment lines
(`# HELP`, `# TYPE`) and samples whose value is not a number are passed over; a timestamp after
the value is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_LABEL = re.compile(rb'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(rb"\\(.)")


class Samples:
    """The samples of the wanted metrics in one exposition: name -> [(label set, value)]."""

    __slots__ = ("_found",)

    def __init__(self, found: dict[str, list[tuple[bytes, float]]]) -> None:
        self._found = found

    def __contains__(self, name: object) -> bool:
        return name in self._found

    def __repr__(self) -> str:
        return f"<Samples {sorted(self._found)}>"

    def sum(self, name: str) -> float | None:
        """The sum over its label sets, or None when the metric is absent."""
        found = self._found.get(name)
        return None if found is None else sum(value for _, value in found)

    def max(self, name: str) -> float | None:
        """The highest of its samples, or None when the metric is absent."""
        found = self._found.get(name)
        return None if found is None else max(value for _, value in found)

    def sums(self, names: Iterable[str]) -> dict[str, float]:
        """For each of `names` present: the sum of its samples (absent names are left out)."""
        return {name: total for name in names if (total := self.sum(name)) is not None}

    def by_label(self, name: str, key: str) -> dict[str, float]:
        """The sum of its samples for each value of label `key` (samples without it left out)."""
        out: dict[str, float] = {}
        for labels, value in self._found.get(name, ()):
            text = _label_value(labels, key)
            if text is not None:
                out[text] = out.get(text, 0.0) + value
        return out

    def label(self, name: str, key: str) -> str | None:
        """The value of label `key` on the metric's first sample that has it (info gauges such
        as `vllm:cache_config_info` carry their facts as labels)."""
        for labels, _ in self._found.get(name, ()):
            text = _label_value(labels, key)
            if text is not None:
                return text
        return None


def _label_value(labels: bytes, key: str) -> str | None:
    """The value of label `key` in one sample's labels, unescaped; None without it."""
    for k, v in _LABEL.findall(labels):
        if k.decode() == key:
            return _UNESCAPE.sub(lambda m: b"\n" if m[1] == b"n" else m[1], v).decode()
    return None


def parse(text: bytes, names: Iterable[str]) -> Samples:
    """The samples of `names` in the exposition `text`."""
    wanted = {name.encode() for name in names}
    found: dict[str, list[tuple[bytes, float]]] = {}
    for line in text.splitlines():
        if not line or line[0] == 35:  # "#": HELP, TYPE or a comment
            continue
        brace, space = line.find(b"{"), line.find(b" ")
        if brace >= 0 and (space < 0 or brace < space):
            name = line[:brace]
            if name not in wanted:
                continue
            close = line.rfind(b"}")  # the last one: a label value may hold a brace
            labels, rest = line[brace + 1 : close], line[close + 1 :]
        else:
            name = line[:space] if space >= 0 else line
            if name not in wanted:
                continue
            labels, rest = b"", line[space:]
        try:
            value = float(rest.split(None, 1)[0])
        except (IndexError, ValueError):
            continue
        found.setdefault(name.decode(), []).append((labels, value))
    return Samples(found)
