"""Label selectors as the config writes them, read and checked at start-up (no client library
needed to validate a config)."""

from __future__ import annotations

import re

_KEY = re.compile(
    r"^([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?/)?[a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?$"
)
_VALUE = re.compile(r"^([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?)?$")


def parse_selector(text: str) -> dict[str, tuple[str, str]]:
    """An equality-based label selector (`app=vllm,role!=canary,ready,!legacy`) as {key: (op,
    value)}, op one of = != exists !exists; raises ValueError naming the term it cannot read."""
    out: dict[str, tuple[str, str]] = {}
    terms = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in terms):
        raise ValueError(f"label selector {text!r} has an empty term")
    for term in terms:
        match = re.fullmatch(r"(!?)\s*([^=!\s]+)\s*(?:(==|=|!=)\s*(\S*))?", term)
        if match is None or not _KEY.match(match[2]) or not _VALUE.match(match[4] or ""):
            raise ValueError(
                f"label selector {text!r}: cannot read {term!r} (use key=value, key!=value, "
                "key or !key, comma-separated)"
            )
        negate, key, op, value = match.groups()
        if key in out:
            raise ValueError(f"label selector {text!r} names {key!r} twice")
        if negate and op:
            raise ValueError(f"label selector {text!r}: {term!r} mixes '!' and a value")
        if negate:
            out[key] = ("!exists", "")
        elif op is None:
            out[key] = ("exists", "")
        else:
            out[key] = ("!=" if op == "!=" else "=", value)
    return out
