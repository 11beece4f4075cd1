"""benchmarks/gpu_kvevents.py, the H200 check of the exact prefix index, run here against the
simulator: two engines that publish KV-cache events to a proxy, a KV cache small enough to
evict, and the check's own verdict (every prediction equal to the engine's reuse, read from
the engine's prefix-cache hit counter since the simulator's usage has no details)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdsim.launch import free_port
from tests.conftest import Sim, start_publishing_sim
from tests.flow.rig import start_proxy_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_kvevents.py"


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[list[tuple[Sim, dict[str, object]]]]:
    started: list[tuple[Sim, dict[str, object]]] = []
    try:
        for name, blocks in (("p0", 200), ("d0", 2000)):
            publisher, replay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
            sim = start_publishing_sim(tmp_path, name, publisher, replay, blocks)
            started.append((sim, {"publisher": publisher, "replay": replay}))
        yield started
    finally:
        for sim, _ in started:
            sim.stop()


def test_the_check_passes_against_engines_that_publish(
    tmp_path: Path, engines: list[tuple[Sim, dict[str, object]]]
) -> None:
    (p0, _), (d0, _) = engines
    config = {
        "prefill": [p0.url],
        "decode": [d0.url],
        "kv_events": {"enabled": True, "endpoints": {s.url: ep for s, ep in engines}},
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(json.dumps(config))
    proxy = start_proxy_config(tmp_path, path, "proxy")
    out = tmp_path / "kvevents.json"
    try:
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--proxy", proxy.url, "--engine", p0.url,
             "--others", d0.url, "--requests", "30", "--through-proxy", "4", "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        proxy.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["equal"] == summary["requests"] == 30
    assert summary["requests_with_reuse"] > 0 and summary["reused_tokens"] > 0
    assert summary["through_proxy"]["answered"] == "4 of 4"
    assert summary["through_proxy"]["blocks_per_engine_after"][d0.url] > 0  # the decoder's too
