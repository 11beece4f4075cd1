"""What the fault suite (benchmarks/faults.py) reads from and sends to the processes it runs:
metrics, memory, the admin API and the proxy's request timelines, the simulators' controls."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from benchmarks.harness import percentile


def metric_total(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def admin_call(method: str, url: str, body: dict[str, Any] | None = None) -> str:
    """The status and state (or error) of one admin API call."""
    data = None if body is None else orjson.dumps(body)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = orjson.loads(resp.read())
            return f"{resp.status} {answer.get('id')} {answer.get('state')}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {orjson.loads(exc.read())['error']['message']}"


def post_json(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(req, timeout=5).close()


def seam_gaps(url: str) -> str:
    """The gaps clients saw where their streams moved to another decoder (request timelines)."""
    with urllib.request.urlopen(url + "/admin/requests?limit=1000", timeout=10) as resp:
        timelines = orjson.loads(resp.read())["data"]
    gaps = [s["gap_ms"] for t in timelines for s in t["seams"] if s["gap_ms"] is not None]
    if not gaps:
        return ""
    p50, p99 = (round(percentile(gaps, q), 1) for q in (50, 99))
    return f"; {len(gaps)} seams, the client's gap at the seam p50 {p50} ms, p99 {p99} ms"
