"""`pdproxy demo` as a user runs it: an SDK client streams a chat completion through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, parse_metrics


def sdk_snippet(printed: str) -> str:
    """The lines of the demo's banner from `... -m pip install` to the heredoc's closing PY."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if "-m pip install" in line)
    end = lines.index("PY", start)
    return "\n".join(
        line.strip() if i < 2 else line for i, line in enumerate(lines[start : end + 1])
    )


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_streams_chat_and_decoder_pulled(tmp_path: Path, stop: signal.Signals) -> None:
    port = free_port()
    engines: list[str] = []
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "demo", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError(log.read_text())
        printed = log.read_text()
        assert "curl -sN" in printed and f"{base}/console" in printed
        assert httpx.get(base + "/console").status_code == 200
        # the SDK snippet as printed, run by a shell as a user pastes it: its first lines name
        # this virtualenv's python (not the system's, which has no openai) and install the SDK
        snippet = sdk_snippet(printed)
        assert snippet.splitlines()[0].startswith(sys.executable)
        ran = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip(), ran.stderr  # the streamed answer
        workers = httpx.get(base + "/stats").json()["workers"]
        engines.extend(w[0]["url"] for w in (workers["prefill"], workers["decode"]))
        decode_url = engines[1]
        metrics = parse_metrics(httpx.get(decode_url + "/metrics").text)
        assert metrics.total("vllm:nixl_xfer_time_seconds_count") == 1
        assert metrics.total("pdsim:recomputed_requests_total") == 0
    finally:
        os.kill(proc.pid, stop)  # the demo alone, as a terminal, `timeout` or systemd would
        code = proc.wait(timeout=20)
    assert code == 128 + stop, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()
    for url in engines:  # the demo stopped the engines it started
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
