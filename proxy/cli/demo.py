"""`pdproxy demo`: a simulated prefiller and decoder plus the proxy in front of them."""

from __future__ import annotations

import shlex
import socket
import sys
from contextlib import closing

from pdsim.launch import SimProcess, start_sim
from proxy.cli.serve import run_server
from proxy.config import load_config

DEMO_MODEL = "pdsim/llama-8b"


def port_is_free(port: int) -> bool:
    with closing(socket.socket()) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def sdk_command() -> str:
    """This interpreter, quoted for a shell: it has pdproxy, and `pip install openai` puts the SDK
    beside it (the system's `python` need have neither)."""
    return shlex.quote(sys.executable)


def banner(port: int, prefill: str, decode: str) -> str:
    base = f"http://127.0.0.1:{port}"
    python = sdk_command()
    return f"""
pdproxy demo: prefiller {prefill}, decoder {decode}, proxy {base}

Try it:
  curl -sN {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{DEMO_MODEL}", "max_tokens": 32, "stream": true,
         "messages": [{{"role": "user", "content": "Hello!"}}]}}'

With the OpenAI SDK, in this virtualenv's python (the first line installs the SDK once):
  {python} -m pip install -q openai
  {python} - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{base}/v1", api_key="none")
stream = client.chat.completions.create(model="{DEMO_MODEL}", stream=True, max_tokens=32,
    messages=[{{"role": "user", "content": "Hello!"}}])
for chunk in stream:
    print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="", flush=True)
print()
PY

Watch it in the browser: {base}/console
Proof the KV was pulled, not recomputed:
  curl -s {decode}/metrics | grep -E 'nixl_xfer_time_seconds_count|pdsim:recomputed'
Proxy latency: curl -s {base}/stats    Ctrl+C stops everything.
"""


def run_demo(port: int) -> int:
    if not port_is_free(port):
        print(f"pdproxy demo: port {port} is taken; pass --port N", file=sys.stderr)
        return 2
    sims: list[SimProcess] = []
    try:
        sims.append(start_sim("prefill", "--model", DEMO_MODEL))
        sims.append(start_sim("decode", "--model", DEMO_MODEL))
        prefill, decode = (sim.url for sim in sims)
        config = load_config(None, prefill=[prefill], decode=[decode], port=port)
        print(banner(port, prefill, decode), flush=True)
        return run_server(config)
    except RuntimeError as exc:
        print(f"pdproxy demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for sim in sims:
            sim.stop()
