"""Shared by the admin tests: streaming load in threads, and a proxy config file."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx

from benchmarks.faults import classify
from tests.conftest import MODEL


class Load:
    """`clients` threads streaming completions through the proxy until `stop()`; every outcome
    is classified as in the fault suite: succeeded, clear_error, or lost."""

    def __init__(
        self, url: str, clients: int = 4, max_tokens: int = 24, model: str = MODEL
    ) -> None:
        self.url = url + "/v1/completions"
        self.max_tokens = max_tokens
        self.model = model
        self.outcomes: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, client: int) -> None:
        with httpx.Client(timeout=180) as http:
            i = 0
            while not self._stop.is_set():
                body = {
                    "model": self.model,
                    "prompt": f"client {client} request {i}: " + "tell me more " * (i % 7),
                    "max_tokens": self.max_tokens,
                    "stream": True,
                }
                try:
                    with http.stream("POST", self.url, json=body) as resp:
                        outcome = classify(resp.status_code, resp.read(), True)
                except httpx.HTTPError as exc:
                    outcome = ("lost", f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.outcomes.append(outcome)
                i += 1

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def tally(self) -> dict[str, int]:
        out = {"succeeded": 0, "clear_error": 0, "lost": 0}
        for outcome, _ in self.outcomes:
            out[outcome] += 1
        return out

    def lost(self) -> list[str]:
        return [why for outcome, why in self.outcomes if outcome == "lost"]


def config_file(tmp: Path, **keys: Any) -> str:
    """A proxy config with quick probes (and `keys` on top); returns its path."""
    data: dict[str, Any] = {"admin": {"probe_timeout": 10, "probe_pull_wait": 1}}
    for key, value in keys.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp / f"admin-{len(list(tmp.glob('admin-*.yaml')))}.yaml"
    path.write_text(json.dumps(data))
    return str(path)
