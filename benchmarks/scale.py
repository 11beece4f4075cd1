"""How pdproxy's serving processes (`serve --workers N`) scale across cores, against vllm-router
pinned to the same cores and against the floor. No GPU: zero-delay lean fake engines
(benchmarks/leanengine.py, one process per core), a C load generator (`wrk`) for throughput.

For each N in --procs, pdproxy runs with N serving processes pinned to cores 0..N-1 (the control
process shares them); vllm-router (its own threads) runs pinned to the same cores for each N in
--router-procs. The rig (fakes and load generators) has its own cores: from --rig-start (default:
half the cores) or N, whichever is higher, to the last core; they are split into prefill fakes,
decode fakes and load-generator cores (see `layout`). On 16 cores: N = 1, 2, 4, 8 get 0..N-1 and
the rig 8..15 (prefill fake 8, decode fakes 9-13, wrk 14-15); N = 12 gets 0..11 and the rig
only 12..15 (one prefill fake, decode fakes 13-14, wrk 15), so its figure may be bounded by the
rig: the report lists any rig core 90% busy or more. Measured per variant:

  throughput  wrk, --conc (256) connections, --duration s, each request a streamed chat of
              --tokens (64) tokens: req/s, wrk's latency p50/p99 (whole answer), proxy CPU per
              request (/proc/<pid>/stat of every process in the proxy's process group), the CPU each
              fake and load generator used and each core's busy share (to show the rig was not
              the bottleneck), each serving process's and the control process's CPU share,
              requests per engine (each fake counts its prefill and decode legs)
  TTFT        a Python client (aiohttp, on the load generator's cores) at concurrency 1 and 64,
              through the proxy and against the floor (the client calls the prefiller, then the
              decoder, itself), interleaved; added TTFT = proxy minus floor, p50 and p99

Also once per rig: wrk straight at the decode fakes (the rig's ceiling, decode leg only).

    python benchmarks/scale.py --wrk /path/to/wrk            # 16 cores: ~5 min
    python benchmarks/scale.py --wrk wrk --procs 1 2 --router-procs 1 --duration 3 --quick

`--wrk` is the path to the `wrk` binary (Debian package `wrk`, 4.1, LuaJIT; its libraries through
LD_LIBRARY_PATH as the caller sets it). `--router` is the `vllm-router` binary (PyPI
`vllm-router`; default `.bench-routers/bin/vllm-router`, then PATH). Results: --out stem
(default benchmarks/results/scale) .md, .json and .png (matplotlib, when importable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import orjson

from benchmarks.harness import (
    CLK_TCK,
    RESULTS,
    Proc,
    Procs,
    chat_body,
    cpu_seconds,
    new_session,
    percentile,
    provenance,
    provenance_lines,
    stream_once,
    vllm_router_argv,
)
from pdsim.launch import free_port
from proxy.engines.connectors.nixl import prefill_body

CHAT = "/v1/chat/completions"
HERE = Path(__file__).resolve().parent
PROMPT = (
    "You are a helpful assistant. Summarise the following paragraph in one sentence. "
    "The river turned toward the sea before the city, and the people there knew its water well."
)
PDPROXY_ARGS = ("--stats-interval", "0", "--log-level", "warning")


def cores_str(cores: list[int]) -> str:
    return ",".join(map(str, cores))


def parse_cores(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


@dataclass(frozen=True)
class Layout:
    """Which cores each part got: the proxy under test, each fake, the load generators."""

    proxy: tuple[int, ...]
    prefill: tuple[int, ...]  # one fake per entry, pinned to that core
    decode: tuple[int, ...]
    loadgen: tuple[int, ...]
    shared: bool = False  # fewer than 3 rig cores: the rig shares them (a smoke run only)

    def rig(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return self.prefill, self.decode, self.loadgen

    def describe(self) -> dict[str, str]:
        return {
            "proxy": cores_str(list(self.proxy)),
            "prefill fakes": cores_str(list(self.prefill)),
            "decode fakes": cores_str(list(self.decode)),
            "load generators": cores_str(list(self.loadgen)),
            **({"note": "rig cores shared (too few cores)"} if self.shared else {}),
        }


def layout(n: int, cores: list[int], rig_start: int, split: tuple[int, int] | None) -> Layout:
    """Proxy on the first N cores; the rig on the cores from max(N, rig_start) on: a quarter
    (at least one) for the load generators, a fifth of the rest (at least one) prefill fakes,
    the rest decode fakes (a decode leg streams 64 writes; a prefill leg answers one); `split`
    = (prefill fakes, decode fakes) overrides the counts."""
    proxy = tuple(cores[:n])
    rig = cores[max(n, rig_start) :] or cores[-1:]
    if len(rig) < 3:
        pre, dec = split or (1, 1)
        return Layout(proxy, (rig[-1],) * pre, (rig[-1],) * dec, (rig[-1],), shared=True)
    if split:
        pre, dec = split
        gen = len(rig) - pre - dec
        if gen < 1:
            raise SystemExit(f"--fakes {pre} {dec} leaves no core of {rig} for load generators")
    else:
        gen = max(1, len(rig) // 4)
        pre = max(1, round((len(rig) - gen) / 5))
        dec = len(rig) - gen - pre
    return Layout(
        proxy, tuple(rig[:pre]), tuple(rig[pre : pre + dec]), tuple(rig[pre + dec :]), False
    )


# ---------------------------------------------------------------- CPU accounting


def siblings(cores: list[int]) -> list[str]:
    """The hyperthread sibling groups among `cores` (a proxy core and a rig core that share a
    physical core share its cycles: say so in the report)."""
    groups = set()
    for core in cores:
        path = Path(f"/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list")
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if len(parse_cores(text)) > 1:
                groups.add(text)
    return sorted(groups)


def core_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per core from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            nums = [int(v) for v in vals[:8]]
            idle = nums[3] + nums[4]
            out[int(name[3:])] = (sum(nums) - idle, sum(nums))
    return out


def core_busy(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, float]:
    busy = {}
    for core, (b1, t1) in after.items():
        b0, t0 = before.get(core, (0, 0))
        busy[core] = round(100 * (b1 - b0) / (t1 - t0), 1) if t1 > t0 else 0.0
    return busy


# ---------------------------------------------------------------- the rig


@dataclass
class Rig:
    layout: Layout
    prefill: list[Proc] = field(default_factory=list)
    decode: list[Proc] = field(default_factory=list)

    def fakes(self) -> list[Proc]:
        return self.prefill + self.decode


def start_rig(procs: Procs, lay: Layout, writes: str, tag: str) -> Rig:
    rig = Rig(lay)
    for role, cores in (("prefill", lay.prefill), ("decode", lay.decode)):
        for i, core in enumerate(cores):
            port = free_port()
            argv = [sys.executable, str(HERE / "leanengine.py"), "--port", str(port)]
            argv += ["--writes", writes, "--engine-id", f"{role}{i}-{uuid.uuid4()}"]
            proc = procs.start(
                f"{tag}-{role}{i}", argv, f"http://127.0.0.1:{port}", str(core), timeout=30
            )
            (rig.prefill if role == "prefill" else rig.decode).append(proc)
    return rig


async def _get(url: str) -> dict[str, Any]:
    async with new_session() as s, s.get(url) as resp:
        return dict(await resp.json(content_type=None))


async def counts(rig: Rig, reset: bool = False) -> dict[str, dict[str, int]]:
    out = {}
    async with new_session() as s:
        for p in rig.fakes():
            if reset:
                async with s.post(p.url + "/_lean/reset") as resp:
                    await resp.read()
            else:
                async with s.get(p.url + "/_lean/count") as resp:
                    out[p.name] = dict(await resp.json(content_type=None))
    return out


# ---------------------------------------------------------------- wrk

LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
local ports = {%(ports)s}
local n = 0
function setup(thread)
  if #ports > 0 then
    n = n + 1
    thread.addr = wrk.lookup("127.0.0.1", tostring(ports[(n - 1) %% #ports + 1]))[1]
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,' ..
    '"write":%%d,"status":%%d,"timeout":%%d,"p50_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def wrk_script(tmp: Path, tokens: int, ports: list[int]) -> Path:
    body = orjson.dumps(chat_body(PROMPT, tokens)).decode()
    path = tmp / f"wrk-{len(ports)}.lua"
    path.write_text(LUA % {"body": body, "ports": ", ".join(map(str, ports))})
    return path


def run_wrk(
    wrk: str, script: Path, url: str, cores: tuple[int, ...], threads: int, conc: int, secs: float
) -> dict[str, Any]:
    argv = ["taskset", "-c", cores_str(list(cores)), wrk, f"-t{threads}", f"-c{conc}"]
    argv += [f"-d{max(1, round(secs))}s", "--timeout", "10s", "-s", str(script), url + CHAT]
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert popen.stdout is not None
    text = popen.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(popen.pid, 0)
    popen.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in text.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary (rc {popen.returncode}): {text[-2000:]}")
    out: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    out["argv"] = " ".join(argv)
    secs_run = out["duration_us"] / 1e6
    out["req_per_s"] = out["requests"] / secs_run if secs_run else 0.0
    out["errors"] = sum(out[k] for k in ("connect", "read", "write", "status", "timeout"))
    return out


KERNEL_COUNTS = ("user_s", "system_s", "reads", "writes", "voluntary", "involuntary")


def group_counts(pgid: int) -> dict[str, float]:
    """What every live process in group `pgid` did (the proxy's control and serving processes,
    whichever thread started them), summed: user and system CPU seconds (all threads), read and
    write system calls (/proc/<pid>/io syscr, syscw: all its threads), and context switches, the
    voluntary ones (it waited: epoll with nothing ready, a lock) and the involuntary ones (it was
    preempted), over all its threads (/proc/<pid>/task/*/status)."""
    total = dict.fromkeys(KERNEL_COUNTS, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) != pgid:  # pgrp (field 5)
            continue
        try:  # the CPU counts even where these cannot be read (a process that just ended)
            io = dict(line.split(": ") for line in (entry / "io").read_text().splitlines())
            tasks = [(t / "status").read_text() for t in (entry / "task").iterdir()]
        except (OSError, ValueError):
            io, tasks = {}, []
        total["user_s"] += int(fields[11]) / CLK_TCK
        total["system_s"] += int(fields[12]) / CLK_TCK
        total["reads"] += int(io.get("syscr", 0))
        total["writes"] += int(io.get("syscw", 0))
        for status in tasks:
            for line in status.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total["voluntary"] += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    total["involuntary"] += int(line.split()[1])
    return total


def per_request(before: dict[str, float], after: dict[str, float], done: int) -> dict[str, float]:
    """group_counts over a run, per request: CPU in µs, the rest as counts."""
    out = {}
    for key in KERNEL_COUNTS:
        value = (after[key] - before[key]) / done if done else 0.0
        out[key.replace("_s", "_us")] = (
            round(value * 1e6) if key.endswith("_s") else round(value, 2)
        )
    return out


def py_spy(exe: str, pid: int, secs: float, path: Path) -> subprocess.Popen[bytes]:
    """Samples `pid`'s Python stacks for `secs` (py-spy record, raw collapsed stacks at `path`:
    one line per stack, `frame;frame;... count`); the caller waits for it."""
    argv = [exe, "record", "--nonblocking", "-r", "250", "-d", str(max(1, int(secs))), "-f", "raw"]
    argv += ["-o", str(path), "-p", str(pid)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def own_cpu(pid: int) -> float:
    """user + system CPU seconds of one process (all its threads, not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def throughput(
    args: argparse.Namespace,
    rig: Rig,
    url: str,
    pid: int | None,
    ports: list[int] | None = None,
    each: dict[str, int] | None = None,
    profile: tuple[Path, int] | None = None,
) -> dict[str, Any]:
    """One wrk run at --conc connections, with the CPU of everything involved around it;
    `each`: processes (name: pid) whose own CPU share is reported one by one; `profile`: (path,
    pid) of a process to sample with py-spy (--py-spy) during the run."""
    lay = rig.layout
    script = wrk_script(args.tmp, args.tokens, ports or [])
    threads = len(ports) if ports else max(len(lay.loadgen), args.wrk_threads)
    await counts(rig, reset=True)
    fake0 = {p.name: cpu_seconds(p.pid) for p in rig.fakes()}
    counts0 = group_counts(pid) if pid else None
    each0 = {k: own_cpu(v) for k, v in (each or {}).items()}
    cores0, t0 = core_times(), time.perf_counter()
    spy = None
    if profile is not None and args.py_spy:  # a little shorter than the run: it must end inside
        spy = py_spy(args.py_spy, profile[1], args.duration - 1, profile[0])
    res = await asyncio.to_thread(
        run_wrk, args.wrk, script, url, lay.loadgen, threads, args.conc, args.duration
    )
    wall = time.perf_counter() - t0
    busy = core_busy(cores0, core_times())
    proxy_cpu = kernel = None
    if pid and counts0:  # the proxy's whole process group: its CPU, and per request
        counts1 = group_counts(pid)
        proxy_cpu = sum(counts1[k] - counts0[k] for k in ("user_s", "system_s"))
        kernel = per_request(counts0, counts1, res["requests"])
    if spy is not None:
        await asyncio.to_thread(spy.wait)
    fakes = {
        p.name: round(100 * (cpu_seconds(p.pid) - fake0[p.name]) / wall, 1) for p in rig.fakes()
    }
    seen = await counts(rig)
    per_proc = {k: round(100 * (own_cpu(v) - each0[k]) / wall, 1) for k, v in (each or {}).items()}
    done = res["requests"]
    res.update(
        wall_s=wall,
        proxy_cpu_s=proxy_cpu,
        proxy_cpu_us_per_req=proxy_cpu / done * 1e6 if proxy_cpu is not None and done else None,
        proxy_cores_used=proxy_cpu / wall if proxy_cpu is not None else None,
        proxy_per_request=kernel,
        fake_cpu_pct=fakes,
        proxy_process_cpu_pct=per_proc,
        wrk_cpu_pct=round(100 * res["cpu_s"] / wall, 1),
        core_busy_pct=busy,
        per_engine=seen,
        spread=spread(seen),
    )
    return res


def spread(seen: dict[str, dict[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in ("prefill", "decode"):
        legs = [c[role] for name, c in seen.items() if role in name.rsplit("-", 1)[-1]]
        if not legs:
            continue
        mean = sum(legs) / len(legs)
        out[role] = {
            "min": min(legs),
            "max": max(legs),
            "max_over_min": max(legs) / min(legs) if min(legs) else None,
            "range_over_mean": (max(legs) - min(legs)) / mean if mean else None,
        }
    return out


# ---------------------------------------------------------------- TTFT (Python client)


async def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One client process: `rounds` rounds, each mode once per round in turn, `per` requests
    per mode and round at `conc` at once; the floor spreads its legs over the fakes in turn."""
    body = chat_body(PROMPT, spec["tokens"])
    raw = orjson.dumps(body)
    pre = orjson.dumps(prefill_body(body))
    pre_urls = itertools.cycle(spec["prefill"])
    dec_urls = itertools.cycle(spec["decode"])
    ttft: dict[str, list[float]] = {"target": [], "floor": []}
    failed: dict[str, int] = {"target": 0, "floor": 0}
    errors: list[str] = []

    async def one(session: Any, mode: str) -> None:
        if mode == "target":
            s = await stream_once(session, spec["url"] + CHAT, raw)
        else:
            rid = {"X-Request-Id": f"floor-{uuid.uuid4().hex}"}
            t0 = time.perf_counter()
            async with session.post(next(pre_urls) + CHAT, data=pre, headers=rid) as resp:
                answer = await resp.read()
            params = orjson.loads(answer)["kv_transfer_params"]
            leg = orjson.dumps({**body, "kv_transfer_params": params})
            s = await stream_once(session, next(dec_urls) + CHAT, leg, rid, start=t0)
        if s.ok:
            ttft[mode].append(s.ttft)
        else:
            failed[mode] += 1
            if len(errors) < 3:
                errors.append(s.error)

    async with new_session() as session:
        modes = ["target", "floor"]
        for r in range(spec["rounds"]):
            for mode in modes[r % 2 :] + modes[: r % 2]:
                left = spec["per"]

                async def worker(mode: str = mode) -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        await one(session, mode)

                await asyncio.gather(*(worker() for _ in range(spec["conc"])))
    return {"ttft": ttft, "failed": failed, "errors": errors}


async def ttft_phase(
    args: argparse.Namespace, rig: Rig, url: str, conc: int, requests: int
) -> dict[str, Any]:
    """Client processes on the load generators' cores (one per core, at most `conc`)."""
    cores = list(rig.layout.loadgen)[: max(1, conc)]
    share = [conc // len(cores) + (i < conc % len(cores)) for i in range(len(cores))]
    rounds = args.ttft_rounds
    runs = []
    for core, c in zip(cores, share, strict=True):
        if not c:
            continue
        spec = {
            "url": url,
            "prefill": [p.url for p in rig.prefill],
            "decode": [p.url for p in rig.decode],
            "tokens": args.tokens,
            "conc": c,
            "per": max(c, requests * c // conc // rounds),
            "rounds": rounds,
        }
        argv = ["taskset", "-c", str(core), sys.executable, __file__, "--client", json.dumps(spec)]
        runs.append(
            await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=None)
        )
    outs = [json.loads((await p.communicate())[0]) for p in runs]
    rows: dict[str, Any] = {}
    for mode in ("target", "floor"):
        values = [v for o in outs for v in o["ttft"][mode]]
        rows[mode] = {
            "requests": len(values),
            "failed": sum(o["failed"][mode] for o in outs),
            "ttft_p50_ms": percentile(values, 50) * 1e3,
            "ttft_p99_ms": percentile(values, 99) * 1e3,
        }
    rows["added_p50_ms"] = rows["target"]["ttft_p50_ms"] - rows["floor"]["ttft_p50_ms"]
    rows["added_p99_ms"] = rows["target"]["ttft_p99_ms"] - rows["floor"]["ttft_p99_ms"]
    rows["errors"] = [e for o in outs for e in o["errors"]][:3]
    rows["client_cores"] = cores_str(cores)
    return rows


# ---------------------------------------------------------------- variants


async def serving_processes(url: str, n: int, timeout: float) -> list[dict[str, Any]]:
    """`/stats`' serving processes once all `n` are connected to the control process (the port
    answers as soon as one is up)."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            stats = await _get(url + "/stats")
            found = list(stats.get("processes") or [])
            if len(found) >= n and all(p.get("connected") and p.get("pid") for p in found):
                return found
        await asyncio.sleep(0.25)
    print(f"{url}: {n} serving processes not all connected after {timeout} s: {found}")
    return found


def router_binary(given: str) -> str | None:
    for cand in (given, ".bench-routers/bin/vllm-router"):
        if cand and Path(cand).exists():
            return cand
    return shutil.which("vllm-router")


async def variant(
    args: argparse.Namespace, procs: Procs, rig: Rig, kind: str, n: int, proxy: tuple[int, ...]
) -> dict[str, Any]:
    lay = Layout(proxy, *rig.layout.rig(), shared=rig.layout.shared)
    cpus = cores_str(list(lay.proxy))
    pre, dec = [p.url for p in rig.prefill], [p.url for p in rig.decode]
    name = f"{kind}-{n}"
    if kind == "pdproxy":
        extra = ["--workers", str(n), *PDPROXY_ARGS, *args.pdproxy_args]
        proc = procs.pdproxy(name, cpus, pre, dec, *extra)
    else:
        port = free_port()
        argv = vllm_router_argv(Path(args.router_bin), pre, dec, port, args.router_policy)
        proc = procs.start(name, argv, f"http://127.0.0.1:{port}", cpus, timeout=60)
    row: dict[str, Any] = {"kind": kind, "n": n, "cores": lay.describe(), "argv": proc.args}
    try:
        if kind == "pdproxy" and n > 1:
            row["processes_before"] = await serving_processes(proc.url, n, 60.0)
        await asyncio.to_thread(
            run_wrk,
            args.wrk,
            wrk_script(args.tmp, args.tokens, []),
            proc.url,
            lay.loadgen,
            max(len(lay.loadgen), args.wrk_threads),
            args.conc,
            args.warmup,
        )  # warm-up: connections, caches, the processes' first requests
        each = {"control": proc.pid} if kind == "pdproxy" and n > 1 else {}
        each.update({p["name"]: p["pid"] for p in row.get("processes_before", []) if p["pid"]})
        sampled = next((p["pid"] for p in row.get("processes_before", []) if p["pid"]), proc.pid)
        profile = (Path(f"{args.out}-{name}.spy.txt"), sampled) if kind == "pdproxy" else None
        row["throughput"] = await throughput(
            args, rig, proc.url, proc.pid, each=each, profile=profile
        )
        if profile is not None and args.py_spy:
            row["profile"] = profile[0].name
        if kind == "pdproxy" and n > 1:
            row["processes_after"] = await serving_processes(proc.url, n, 10.0)
            restarts = sum(p.get("restarts", 0) for p in row["processes_after"])
            if restarts:
                print(f"{name}: {restarts} serving process restarts in the run", flush=True)
        for conc in args.ttft_conc:
            reqs = args.ttft_requests if conc == 1 else args.ttft_requests_c64
            row[f"ttft_c{conc}"] = await ttft_phase(args, rig, proc.url, conc, reqs)
    finally:
        proc.stop()
        procs.procs.remove(proc)
    t = row["throughput"]
    print(
        f"{name}: {t['req_per_s']:.0f} req/s, errors {t['errors']}, "
        f"CPU {t['proxy_cpu_us_per_req'] or 0:.0f} us/req, spread {t['spread']}, "
        + ", ".join(
            f"c{c} added TTFT p50 {row[f'ttft_c{c}']['added_p50_ms']:.2f} "
            f"p99 {row[f'ttft_c{c}']['added_p99_ms']:.2f} ms"
            for c in args.ttft_conc
        ),
        flush=True,
    )
    return row


async def main_async(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Runs every variant, filling `result` as it goes (what is there is written even if the
    run is cut short); a variant that fails is recorded under `failed` and the rest run."""
    cores = parse_cores(args.cores) if args.cores else sorted(os.sched_getaffinity(0))
    rig_start = args.rig_start if args.rig_start is not None else len(cores) // 2
    split = tuple(args.fakes) if args.fakes else None
    args.router_bin = router_binary(args.router)
    if not args.router_bin:
        print("vllm-router not found (--router): left out", flush=True)
    routers = args.router_procs if args.router_bin else []
    wanted = [  # pdproxy N, then vllm-router on the same cores, so that drift hits both alike
        (kind, n)
        for n in sorted({*args.procs, *routers})
        for kind, ns in (("pdproxy", args.procs), ("vllm-router", routers))
        if n in ns
    ]
    by_rig: dict[tuple[Any, ...], list[tuple[str, int]]] = {}
    for kind, n in wanted:
        by_rig.setdefault(layout(n, cores, rig_start, split).rig(), []).append((kind, n))
    logdir = Path(tempfile.mkdtemp(prefix="pdproxy-scale-"))
    args.tmp = logdir
    procs = Procs(logdir)
    result.update(
        router=router_version(args.router_bin),
        settings={
            "cores": cores_str(cores),
            "hyperthread_siblings": siblings(cores),
            "rig_start": rig_start,
            "conc": args.conc,
            "duration_s": args.duration,
            "tokens": args.tokens,
            "fake_writes": args.writes,
            "ttft_conc": args.ttft_conc,
            "ttft_requests": {"1": args.ttft_requests, "64": args.ttft_requests_c64},
            "router_policy": args.router_policy,
            "pdproxy_args": [*PDPROXY_ARGS, *args.pdproxy_args],
            "wrk": args.wrk,
        },
        logs=str(logdir),
        rigs=[],
        rows=[],
        failed=[],
    )
    partial = Path(args.out).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        for r, runs in enumerate(by_rig.values()):
            lay = layout(runs[0][1], cores, rig_start, split)
            rig = start_rig(procs, lay, args.writes, f"rig{r}")
            ports = [int(p.url.rsplit(":", 1)[1]) for p in rig.decode]
            ceiling = await throughput(args, rig, rig.decode[0].url, None, ports)
            print(f"rig {r} {lay.describe()}: decode fakes alone {ceiling['req_per_s']:.0f} req/s")
            rig_cores = {k: v for k, v in lay.describe().items() if k != "proxy"}
            result["rigs"].append({"cores": rig_cores, "decode_direct": ceiling})
            for kind, n in runs:
                proxy = layout(n, cores, rig_start, split).proxy
                t0 = time.monotonic()
                try:
                    host = await host_scaling(proxy) if kind == "pdproxy" else None
                    row = await variant(args, procs, rig, kind, n, proxy)
                    if host is not None:
                        row["host_scaling"] = host
                except Exception as exc:  # one variant's failure leaves the others' figures
                    why = f"{kind} {n}: {type(exc).__name__}: {exc}"
                    print(f"failed: {why}", flush=True)
                    result["failed"].append(" / ".join(why.splitlines())[:600])
                    continue
                row["rig"], row["variant_wall_s"] = r, round(time.monotonic() - t0, 1)
                result["rows"].append(row)
                partial.write_text(json.dumps(result, indent=1))
            procs.stop_all()
    finally:
        procs.stop_all()
        result["wall_s"] = round(time.monotonic() - started, 1)


SPIN_S = 2.0


def spin(secs: float) -> int:
    """A CPU-bound pure-Python loop for `secs`: how many rounds it did."""
    rounds, end = 0, time.perf_counter() + secs
    while time.perf_counter() < end:
        for _ in range(10_000):
            rounds += 1
    return rounds


async def host_scaling(cores: tuple[int, ...]) -> dict[str, Any]:
    """What this host gives a CPU-bound program on `cores`: one copy of `spin` pinned to the
    first core, then one copy per core at once; `ratio` = the copies' rounds / the one copy's.
    The ceiling of any process-per-core scaling on these cores right now: on a host whose cores
    share their physical cores' cycles or caches with other work, it is below len(cores)."""

    def copies(on: tuple[int, ...]) -> list[int]:
        argv = [sys.executable, str(Path(__file__).resolve()), "--spin", str(SPIN_S)]
        runs = [
            subprocess.Popen(["taskset", "-c", str(c), *argv], stdout=subprocess.PIPE) for c in on
        ]
        return [int(run.communicate()[0]) for run in runs]

    one = (await asyncio.to_thread(copies, cores[:1]))[0]
    every = await asyncio.to_thread(copies, cores)
    return {
        "cores": len(cores),
        "one_rounds_per_s": round(one / SPIN_S),
        "each_rounds_per_s": [round(x / SPIN_S) for x in every],
        "ratio": round(sum(every) / one, 2) if one else None,
    }


def router_version(binary: str | None) -> str:
    """`vllm-router X.Y.Z` from the wheel's metadata beside the binary (a venv or a --target)."""
    if not binary:
        return "not found"
    base = Path(binary).resolve().parent.parent
    found = [*base.glob("vllm_router-*.dist-info")]
    found += base.glob("lib/python*/site-packages/vllm_router-*.dist-info")
    for meta in found:
        return "vllm-router " + meta.name.removeprefix("vllm_router-").removesuffix(".dist-info")
    return f"vllm-router ({binary})"


# ---------------------------------------------------------------- report


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def goals(result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    pd = {r["n"]: r for r in rows if r["kind"] == "pdproxy"}
    vr = {r["n"]: r for r in rows if r["kind"] == "vllm-router"}
    out = []

    def rps(r: dict[str, Any]) -> float:
        return float(r["throughput"]["req_per_s"])

    if 1 in pd and 8 in pd:
        ratio = rps(pd[8]) / rps(pd[1])
        out.append(f"- 8 processes / 1: {ratio:.2f}x req/s (goal >= 7x): {_ok(ratio >= 7)}")
    hosts = {n: r["host_scaling"] for n, r in pd.items() if r.get("host_scaling", {}).get("ratio")}
    if 1 in pd and len(hosts) > 1:
        cells = [
            f"{n}: {h['ratio']:.2f}x (pdproxy {rps(pd[n]) / rps(pd[1]):.2f}x)"
            for n, h in sorted(hosts.items())
            if n > 1
        ]
        out.append(
            "- the host's own scaling on the same cores, measured just before each pdproxy run "
            "(N copies of a CPU-bound Python loop, one per core, against one copy alone; the "
            f"ceiling of any process-per-core program there): {'; '.join(cells)}"
        )
    for n, r in sorted(vr.items()):
        if n in pd:
            a, b = rps(pd[n]), rps(r)
            out.append(
                f"- pdproxy {n} vs vllm-router on the same {n} core(s): {a:.0f} vs {b:.0f} "
                f"req/s (goal >=): {_ok(a >= b)}"
            )
    if 1 in pd and "ttft_c64" in pd[1]:
        base = pd[1]["ttft_c64"]["added_p99_ms"]
        for n, r in sorted(pd.items()):
            if n != 1 and "ttft_c64" in r:
                v = r["ttft_c64"]["added_p99_ms"]
                out.append(
                    f"- added TTFT p99 at c=64, {n} processes: {v:.2f} ms vs {base:.2f} ms "
                    f"(goal no worse than 1): {_ok(v <= base + 0.5)}"
                )
    if 1 in pd:
        base_sp = pd[1]["throughput"]["spread"]
        for n, r in sorted(pd.items()):
            if n == 1:
                continue
            parts = []
            good = True
            for role, s in r["throughput"]["spread"].items():
                b = base_sp.get(role, {}).get("range_over_mean") or 0.0
                v = s["range_over_mean"] or 0.0
                good &= v <= max(b * 1.5, 0.02)
                parts.append(f"{role} {v:.3f} (1 process {b:.3f})")
            why = (
                " (the rig was the bottleneck: a load-aware policy gives the engines that keep "
                "up more)"
                if rig_hot(r)
                else ""
            )
            out.append(
                f"- spread (max-min)/mean, {n} processes: {', '.join(parts)}: {_ok(good)}{why}"
            )
    for r in rows:
        if hot := rig_hot(r):
            out.append(
                f"- {r['kind']} {r['n']}: rig cores {hot} were >= 90% busy: its req/s is "
                "bounded by the rig (a lower bound for the proxy)"
            )
    return out


def serving_cpu(t: dict[str, Any]) -> str:
    vals = [v for k, v in t["proxy_process_cpu_pct"].items() if k != "control"]
    return f"{min(vals):.0f} / {max(vals):.0f}" if vals else "-"


def rig_hot(row: dict[str, Any]) -> list[int]:
    """The rig's cores (fakes, load generators) that were 90% busy or more in the wrk run: a
    figure with any is bounded by the rig, not the proxy (a lower bound for the proxy)."""
    c = row["cores"]
    if c.get("note"):
        return []
    keys = ("prefill fakes", "decode fakes", "load generators")
    rig = {int(x) for k in keys for x in c[k].split(",")}
    busy = row["throughput"]["core_busy_pct"]
    return sorted(k for k in rig if busy.get(k, busy.get(str(k), 0.0)) >= 90)


def _ok(flag: bool) -> str:
    return "met" if flag else "**not met**"


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    cut = result.get("interrupted")
    lines = [
        "# Serving processes: scaling across cores (lean fake engines, zero delay)",
        "",
        *provenance_lines(result["provenance"]),
        f"- vllm-router: {result['router']} (policy {s['router_policy']})",
        f"- cores used: {s['cores']}; {s['conc']} connections for {s['duration_s']} s per "
        f"throughput run (wrk), {s['tokens']} tokens streamed per request (fake writes: "
        f"{s['fake_writes']}); pdproxy flags {' '.join(s['pdproxy_args'])}; the whole run "
        f"{result.get('wall_s', '-')} s",
        "- CPU µs/req: every process in the proxy's process group (all threads) during the wrk "
        "run, over the requests wrk completed; cores used = that CPU over the wall time.",
        "- added TTFT: through the proxy minus the floor (the client calls prefiller then decoder "
        "itself), same client processes, interleaved.",
        "- hyperthread siblings among the cores: "
        + (", ".join(s.get("hyperthread_siblings", [])) or "none (one thread per core)"),
        *(["- **cut short**: only the variants below finished"] if cut else []),
        *(f"- failed: {f}" for f in result.get("failed", [])),
        "",
        "## Goals",
        "",
        *goals(result),
        "",
        "## Throughput and TTFT",
        "",
        "| target | N | proxy cores | req/s | errors | wrk p50 / p99 ms | CPU µs/req "
        "| cores used | added TTFT c=1 p50 / p99 ms | added TTFT c=64 p50 / p99 ms "
        "| prefill legs min / max | decode legs min / max |",
        "|" + "---|" * 12,
    ]
    for r in result["rows"]:
        t = r["throughput"]
        sp = t["spread"]

        def ttft(key: str, row: dict[str, Any] = r) -> str:
            v = row.get(key)
            return f"{v['added_p50_ms']:.2f} / {v['added_p99_ms']:.2f}" if v else "-"

        def legs(role: str, sp: dict[str, Any] = sp) -> str:
            return f"{sp[role]['min']} / {sp[role]['max']}" if role in sp else "-"

        lines.append(
            f"| {r['kind']} | {r['n']} | {r['cores']['proxy']} | {t['req_per_s']:.0f} | "
            f"{t['errors']} | {t['p50_us'] / 1e3:.1f} / {t['p99_us'] / 1e3:.1f} | "
            f"{_f(t['proxy_cpu_us_per_req'], 0)} | {_f(t['proxy_cores_used'], 2)} | "
            f"{ttft('ttft_c1')} | {ttft('ttft_c64')} | {legs('prefill')} | {legs('decode')} |"
        )
    lines += [
        "",
        "## Where the proxy's time goes, per request (the throughput runs)",
        "",
        "Its whole process group, over the requests wrk completed: user and system CPU, read and",
        "write system calls (/proc/<pid>/io syscr and syscw: the read and write families, not",
        "recv and send), context switches (voluntary: it waited with nothing to do; involuntary:",
        "it was preempted). The control process's share (with serving processes): its CPU over",
        "the same run, per request.",
        "",
        "| target | N | user µs | system µs | reads | writes | voluntary | involuntary "
        "| of it, the control process µs |",
        "|" + "---|" * 9,
    ]
    for r in result["rows"]:
        t = r["throughput"]
        k = t.get("proxy_per_request")
        if k:
            lines.append(
                f"| {r['kind']} | {r['n']} | {k['user_us']} | {k['system_us']} | {k['reads']} "
                f"| {k['writes']} | {k['voluntary']} | {k['involuntary']} | {control_us(t)} |"
            )
    lines += [
        "",
        "## Floor TTFT (ms, the same runs)",
        "",
        "| target | N | c=1 floor p50 / p99 | c=1 proxy p50 / p99 | c=64 floor p50 / p99 "
        "| c=64 proxy p50 / p99 |",
        "|" + "---|" * 6,
    ]
    for r in result["rows"]:
        cells = []
        for key in ("ttft_c1", "ttft_c64"):
            v = r.get(key)
            for mode in ("floor", "target"):
                cells.append(
                    f"{v[mode]['ttft_p50_ms']:.2f} / {v[mode]['ttft_p99_ms']:.2f}" if v else "-"
                )
        lines.append(f"| {r['kind']} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "## Core assignment and the rig's load", ""]
    for i, rig in enumerate(result["rigs"]):
        d = rig["decode_direct"]
        lines += [
            f"### rig {i}: " + "; ".join(f"{k} {v}" for k, v in rig["cores"].items()),
            "",
            f"- the decode fakes alone (wrk straight at them, one thread each): "
            f"{d['req_per_s']:.0f} req/s, busiest decode fake "
            f"{max(d['fake_cpu_pct'].values()):.0f}% of a core (the rig's ceiling, decode leg)",
            "",
            "| target | N | busiest prefill fake % | busiest decode fake % | wrk % (of its cores) "
            "| each core busy % | rig cores >= 90% busy | serving processes % min / max "
            "| control % |",
            "|" + "---|" * 9,
        ]
        for r in result["rows"]:
            if r["rig"] != i:
                continue
            t = r["throughput"]
            fk = t["fake_cpu_pct"]
            pre = max((v for k, v in fk.items() if "prefill" in k), default=0.0)
            dec = max((v for k, v in fk.items() if "decode" in k), default=0.0)
            ncores = len(r["cores"]["load generators"].split(","))
            busy = " ".join(f"{c}:{v:.0f}" for c, v in sorted(t["core_busy_pct"].items()))
            hot = rig_hot(r)
            lines.append(
                f"| {r['kind']} | {r['n']} | {pre:.0f} | {dec:.0f} | "
                f"{t['wrk_cpu_pct']:.0f} ({ncores} core(s)) | {busy} | "
                f"{', '.join(map(str, hot)) or 'none'} | {serving_cpu(t)} | "
                f"{_f(t['proxy_process_cpu_pct'].get('control'), 0)} |"
            )
        lines.append("")
    lines += ["## Commands", ""]
    for r in result["rows"]:
        lines.append(f"- {r['kind']} {r['n']}: `{' '.join(r['argv'])}` pinned to "
                     f"{r['cores']['proxy']}; wrk: `{r['throughput']['argv']}`")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def control_us(t: dict[str, Any]) -> str:
    """The control process's CPU per request over a throughput run ("-": no control process)."""
    pct = t.get("proxy_process_cpu_pct", {}).get("control")
    if pct is None or not t.get("requests"):
        return "-"
    return f"{pct / 100 * t['wall_s'] / t['requests'] * 1e6:.1f}"


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, style in (("pdproxy", "o-"), ("vllm-router", "s--")):
        pts = sorted((r["n"], r["throughput"]["req_per_s"]) for r in rows if r["kind"] == kind)
        if pts:
            ax1.plot(*zip(*pts, strict=True), style, label=kind)
    one = next((r for r in rows if r["kind"] == "pdproxy" and r["n"] == 1), None)
    ns = sorted({r["n"] for r in rows})
    if one and ns:
        base = one["throughput"]["req_per_s"]
        ax1.plot(ns, [base * n for n in ns], ":", color="grey", label="linear from 1 process")
    for i, rig in enumerate(result["rigs"]):
        ax1.axhline(rig["decode_direct"]["req_per_s"], color="C2", alpha=0.4, lw=1)
        if i == 0:
            ax1.text(ns[0] if ns else 1, rig["decode_direct"]["req_per_s"], "decode fakes alone",
                     va="bottom", fontsize=8, color="C2")  # fmt: skip
    ax1.set_xticks(ns)
    ax2.set_xticks(ns)
    ax1.set_xlabel("serving processes / router cores")
    ax1.set_ylabel(f"req/s at c={result['settings']['conc']}")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for kind, style in (("pdproxy", "o-"), ("vllm-router", "s--")):
        for conc, color in (("1", "C0"), ("64", "C3")):
            pts = sorted(
                (r["n"], r[f"ttft_c{conc}"]["added_p99_ms"])
                for r in rows
                if r["kind"] == kind and f"ttft_c{conc}" in r
            )
            if pts:
                ax2.plot(*zip(*pts, strict=True), style, color=color, label=f"{kind} c={conc}")
    ax2.set_xlabel("serving processes / router cores")
    ax2.set_ylabel("added TTFT p99 over the floor (ms)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--wrk", help="path to the wrk binary (Debian package wrk)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    p.add_argument("--router-procs", type=int, nargs="*", default=[1, 2, 4, 8, 12],
                   help="vllm-router pinned to the cores pdproxy gets at these N")  # fmt: skip
    p.add_argument("--router", default="", help="vllm-router binary")
    p.add_argument("--router-policy", default="round_robin")
    p.add_argument("--cores", default="", help="cores to use, e.g. 0-15 (default: all usable)")
    p.add_argument("--rig-start", type=int, default=None,
                   help="the rig's first core index (default: half the cores)")  # fmt: skip
    p.add_argument("--fakes", type=int, nargs=2, metavar=("PREFILL", "DECODE"),
                   help="fake engines per role (default: see layout)")  # fmt: skip
    p.add_argument("--wrk-threads", type=int, default=0, help="at least this many wrk threads")
    p.add_argument("--writes", choices=("token", "burst"), default="token")
    p.add_argument("--conc", type=int, default=256)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk before each")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--ttft-conc", type=int, nargs="*", default=[1, 64])
    p.add_argument("--ttft-requests", type=int, default=400, help="per mode at c=1")
    p.add_argument("--ttft-requests-c64", type=int, default=2560, help="per mode at c=64")
    p.add_argument("--ttft-rounds", type=int, default=4, help="interleaved rounds")
    p.add_argument("--pdproxy-args", nargs="*", default=[], help="more `serve` flags")
    p.add_argument("--quick", action="store_true", help="small TTFT phases, 3 s runs")
    p.add_argument("--py-spy", default="", metavar="PATH",
                   help="py-spy binary: sample one serving process (or the one process) of "
                        "each pdproxy variant during its wrk run; raw stacks at "
                        "<out>-pdproxy-N.spy.txt")  # fmt: skip
    p.add_argument("--out", default=str(RESULTS / "scale"), help="results path stem")
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--spin", type=float, help=argparse.SUPPRESS)  # host_scaling's copies
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given still win
        p.set_defaults(duration=3.0, warmup=1.0, ttft_requests=100, ttft_requests_c64=256)
        p.set_defaults(ttft_rounds=2)
        args = p.parse_args(argv)
    if not args.client and not args.spin and not args.wrk:
        p.error("--wrk PATH is needed")
    return args


def _exit_on_term(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.spin:
        print(spin(args.spin))
        return 0
    if args.client:
        print(json.dumps(asyncio.run(client_main(json.loads(args.client)))))
        return 0
    signal.signal(signal.SIGTERM, _exit_on_term)  # so `finally` stops every process started
    result: dict[str, Any] = {"provenance": provenance([Path(sys.executable).name, *sys.argv])}
    try:
        asyncio.run(main_async(args, result))
    except KeyboardInterrupt:
        result["interrupted"] = True
        print("interrupted: writing the variants done so far", flush=True)
    if not result.get("rows"):
        print("no variant finished", flush=True)
        return 1
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result) + "\n")
    if plot(result, stem.with_suffix(".png")):
        result_png = stem.with_suffix(".png")
        with stem.with_suffix(".md").open("a") as f:
            f.write(f"\n![req/s and added TTFT p99 by processes]({result_png.name})\n")
    print(render(result))
    print(f"\nwrote {stem}.md, .json (.png with matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
