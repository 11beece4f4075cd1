"""Keep-alive clients pinned to serving processes, for tests that need load on a given process
(which process accepts a new connection is the kernel's choice; a kept-alive connection stays
with the process that accepted it)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from tests.conftest import MODEL, Proxy

PROBE = {"model": MODEL, "prompt": "where am I", "max_tokens": 1}
TRIES = 200  # connections opened at most to find the groups


def process_of(resp: httpx.Response) -> str:
    """The serving process that answered (`w2` for `pdp-w2-...`), "one" for a proxy of one
    process."""
    parts = resp.headers["x-request-id"].split("-")
    return parts[1] if parts[1].startswith("w") and parts[1][1:].isdigit() else "one"


def pinned_clients(
    proxy: Proxy, counts: Sequence[int], probe: dict[str, Any] = PROBE
) -> list[list[httpx.Client]]:
    """Groups of keep-alive clients (one connection each, each asked once where it landed with
    `probe`): group i has counts[i] clients, every group on a serving process of its own. A proxy
    of one process gives one group of them all. The caller closes the clients."""
    landed: dict[str, list[httpx.Client]] = {}
    chosen: list[list[httpx.Client]] = []
    try:
        for _ in range(TRIES):
            client = httpx.Client(base_url=proxy.url, timeout=60, limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1))  # fmt: skip
            resp = client.post("/v1/completions", json=probe)
            assert resp.status_code == 200, resp.text
            landed.setdefault(process_of(resp), []).append(client)
            if set(landed) == {"one"} and len(landed["one"]) == sum(counts):
                chosen = [landed["one"]]
                return chosen
            groups = sorted(landed.values(), key=len, reverse=True)[: len(counts)]
            wanted = sorted(range(len(counts)), key=lambda i: -counts[i])  # largest first
            if len(groups) == len(counts) and all(
                len(group) >= counts[i] for group, i in zip(groups, wanted, strict=True)
            ):
                picked = {i: group[: counts[i]] for group, i in zip(groups, wanted, strict=True)}
                chosen = [picked[i] for i in range(len(counts))]
                return chosen
        raise AssertionError(f"no connections on {len(counts)} processes after {TRIES}: {landed}")
    finally:
        kept = {id(c) for group in chosen for c in group}
        for client in (c for group in landed.values() for c in group):
            if id(client) not in kept:
                client.close()


def run_clients(
    clients: Sequence[httpx.Client], send: Callable[[int, httpx.Client], None], timeout: float
) -> None:
    """`send(i, client)` in a thread per client, all at once; then every client is closed."""
    threads = [threading.Thread(target=send, args=(i, c)) for i, c in enumerate(clients)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
    finally:
        for client in clients:
            client.close()
