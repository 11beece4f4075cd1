"""Where the proxy's time goes on the way to one request's first token, at concurrency 1.

`benchmarks/gpu.py ... latency` says how much the proxy adds over a client that drives both
legs itself; this says where, without a GPU: simulated engines with a timing profile (default:
the one measured on an H200, so the engines idle between events as real ones do), pdproxy, and
a client on a raw socket (nothing of an HTTP library's own time in its figures) that sends the
same completions request `gpu.py`'s latency phase sends (a prompt of token ids) one at a time.
Each answer is matched, by its X-Request-Id, to the proxy's own timeline of it
(/admin/requests), which gives:

    outside     the client's TTFT less the proxy's: the hop in (to the proxy's first look at
                the request) and the hop out (its first token to the client's first byte)
    to prefill  the request's arrival to its prefill leg sent (read, parse, plan, the leg's body)
    handoff     the prefill's answer to the first token (the decode leg: its body, the pull, the
                decoder's first step), engine time mostly

With --baseline REF a second proxy runs from a checkout of REF (a git worktree), and the two
take turns, round by round, so that both see the same moments of a noisy machine.

    python benchmarks/c1_path.py --requests 200 --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_client import token_prompt  # noqa: E402
from benchmarks.harness import Procs, drop_worktree, provenance, worktree  # noqa: E402


def one(host: str, port: int, body: bytes, sock: socket.socket) -> dict[str, Any]:
    """POST `body` on the kept-alive `sock`; the instants of the send, the first byte and the
    first token, and the answer's request id."""
    head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    sock.sendall(head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body)
    sent = time.perf_counter()
    buf, first_byte, first_token = b"", None, None
    while b"data: [DONE]" not in buf:
        data = sock.recv(1 << 16)
        now = time.perf_counter()
        if not data:
            raise RuntimeError("the proxy closed the connection")
        first_byte = first_byte or now
        buf += data
        if first_token is None and b'"text":"' in buf.partition(b"\r\n\r\n")[2].replace(
            b'"text":""', b""
        ):
            first_token = now
    headers = buf.partition(b"\r\n\r\n")[0].decode().lower().split("\r\n")
    rid = next(h.split(":", 1)[1].strip() for h in headers if h.startswith("x-request-id:"))
    return {"id": rid, "sent": sent, "first_byte": first_byte, "first_token": first_token}


def timelines(url: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(url + "/admin/requests?since=0&limit=100000", timeout=10) as r:
        return {t["request_id"]: t for t in json.load(r)["data"]}


def summary(rows: list[dict[str, Any]], url: str) -> dict[str, Any]:
    seen = timelines(url)
    parts: dict[str, list[float]] = {"client_ttft": [], "proxy_ttft": [], "outside": [],
                                     "to_prefill": [], "handoff": []}  # fmt: skip
    for r in rows:
        ms = seen[r["id"]]["ms"]
        client = (r["first_token"] - r["sent"]) * 1e3
        parts["client_ttft"].append(client)
        parts["proxy_ttft"].append(ms["ttft"])
        parts["outside"].append(client - ms["ttft"])
        parts["to_prefill"].append(ms["ttft"] - ms["prefill"] - ms["handoff"])
        parts["handoff"].append(ms["handoff"])
    return {
        k: {"p50": round(statistics.median(v), 3), "mean": round(statistics.fmean(v), 3)}
        for k, v in parts.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=200, help="per proxy")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timing-profile", default="h200-llama-8b-bf16-xl")
    ap.add_argument("--gap", type=float, default=0.02, help="seconds between requests")
    ap.add_argument("--baseline", help="git ref: a second proxy from that checkout, in turns")
    ap.add_argument("--pdproxy-args", nargs="*", default=[], help="more `serve` flags")
    ap.add_argument("--out", type=Path, help="results JSON")
    a = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="pdproxy-c1-"))
    procs = Procs(logdir)
    trees: dict[str, Path | None] = {"pdproxy": None}
    try:
        if a.baseline:
            trees[f"pdproxy@{a.baseline}"] = worktree(a.baseline, logdir)
        sims = ("--model", "m", "--timing-profile", a.timing_profile)
        pre = procs.sim("prefill", None, "--role", "prefill", "--engine-id", "p", *sims)
        dec = procs.sim("decode", None, "--role", "decode", "--engine-id", "d", *sims)
        proxies = {
            name: procs.pdproxy(name, None, [pre.url], [dec.url], "--connector", "nixl",
                                "--stats-interval", "0", *a.pdproxy_args, src=tree)
            for name, tree in trees.items()
        }  # fmt: skip
        socks = {}
        for name, proc in proxies.items():
            host, port = proc.url.rsplit("/", 1)[-1].split(":")
            socks[name] = (host, int(port), socket.create_connection((host, int(port))))
            socks[name][2].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rnd = random.Random(7)
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in proxies}
        for i in range(a.warmup + a.requests):
            for name, (host, port, sock) in socks.items():
                prompt = token_prompt(rnd, a.prompt_tokens, 32000)
                body = {"model": "m", "prompt": prompt, "max_tokens": a.max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
                row = one(host, port, json.dumps(body).encode(), sock)
                if i >= a.warmup:
                    rows[name].append(row)
                time.sleep(a.gap)
        result = {
            "provenance": provenance(["python", "benchmarks/c1_path.py", *sys.argv[1:]]),
            "settings": {k: v for k, v in vars(a).items() if k != "out"},
            "ms": {name: summary(rows[name], proxies[name].url) for name in proxies},
        }
        print(json.dumps(result["ms"], indent=1))
        if a.out:
            a.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    finally:
        procs.stop_all()
        for tree in trees.values():
            if tree is not None:
                drop_worktree(tree)


if __name__ == "__main__":
    main()
