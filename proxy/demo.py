"""`pdproxy demo`: a simulated prefiller and decoder plus the proxy in front of them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import closing

from proxy.cli import run_server
from proxy.config import load_config

DEMO_MODEL = "pdsim/llama-8b"


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with closing(socket.socket()) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"simulated engine for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"simulated engine {url} not healthy after {timeout:.0f}s")


def start_sim(role: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "proxy", "sim", "--role", role, "--model", DEMO_MODEL,
        "--port", str(port), "--side-channel-port", str(free_port()),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True)
    return f"http://127.0.0.1:{port}", proc


def banner(port: int, prefill: str, decode: str) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
pdproxy demo: prefiller {prefill}, decoder {decode}, proxy {base}

Try it:
  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{DEMO_MODEL}", "max_tokens": 32, "stream": true,
         "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="none")
stream = client.chat.completions.create(model="{DEMO_MODEL}", stream=True, max_tokens=32,
    messages=[{{"role": "user", "content": "Hello!"}}])
for chunk in stream:
    print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="", flush=True)
print()
PY

Proof the KV was pulled, not recomputed:
  curl -s {decode}/metrics | grep -E 'nixl_xfer_time_seconds_count|pdsim:recomputed'
Proxy latency: curl -s {base}/stats    Ctrl+C stops everything.
"""


def run_demo(port: int) -> int:
    if not port_is_free(port):
        print(f"pdproxy demo: port {port} is taken; pass --port N", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    try:
        prefill, p = start_sim("prefill")
        procs.append(p)
        decode, d = start_sim("decode")
        procs.append(d)
        wait_healthy(prefill, p)
        wait_healthy(decode, d)
        config = load_config(None, prefill=[prefill], decode=[decode], port=port)
        print(banner(port, prefill, decode), flush=True)
        return run_server(config)
    except RuntimeError as exc:
        print(f"pdproxy demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
