"""The engine pair a protocol test talks to (shared by conftest.py and the tests)."""

from __future__ import annotations

from dataclasses import dataclass

MODEL = "tiny"
MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class Engines:
    """One prefiller and one decoder serving `model` with a context of `max_model_len`."""

    name: str
    prefill: str
    decode: str
    model: str = MODEL
    max_model_len: int = MAX_MODEL_LEN
