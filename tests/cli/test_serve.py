"""`event_loop` (proxy.cli.serve): the loop every process of the proxy serves on. uvloop by
default; asyncio's own when configured, in one process and in each serving process, where no
process of the proxy then loads uvloop at all."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, Proxy, Sim, start_proxy


def group(proxy: Proxy) -> list[int]:
    """The pids of the proxy's processes (its process group: control and serving)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == proxy.pid:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                continue
    return pids


def loads_uvloop(pid: int) -> bool:
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def stream_ok(proxy: Proxy) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.stream(
        "POST", proxy.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30
    ) as resp:
        assert resp.status_code == 200
        assert resp.read().rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize("workers", [1, 2])
def test_asyncio_loop_in_every_process(tmp_path: Path, sims: dict[str, Sim], workers: int) -> None:
    config = tmp_path / "loop.yaml"
    config.write_text("event_loop: asyncio\n")
    proxy = start_proxy(
        tmp_path, [sims["p0"]], [sims["d0"]], "--config", str(config), workers=workers
    )
    try:
        stream_ok(proxy)
        pids = group(proxy)
        assert len(pids) >= (1 if workers == 1 else 3)  # control and both serving processes
        assert not [pid for pid in pids if loads_uvloop(pid)]
        assert "loop=asyncio" in proxy.log_text()
    finally:
        proxy.stop()


def test_uvloop_by_default(tmp_path: Path, sims: dict[str, Sim]) -> None:
    proxy = start_proxy(tmp_path, [sims["p0"]], [sims["d0"]])
    try:
        stream_ok(proxy)
        assert loads_uvloop(proxy.pid)
        assert "loop=uvloop" in proxy.log_text()
    finally:
        proxy.stop()
