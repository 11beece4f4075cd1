"""pdproxy on GPUs with real vLLM: start topologies with launchers/disagg.sh, check that outputs
and KV hand-overs are right, measure the KV path, the proxy's own cost, `vllm bench serve`
through the proxy against the decoder alone, and the engine's timing for the simulator.

Runs on any GPU host with vLLM (and NIXL; LMCache for the lmcache topology) importable by the
python that runs it. One GPU: both engines share GPU 0 (`--gpus 0`); two: `--gpus 0,1`.

    # everything, for NIXL then LMCache, into benchmarks/results/gpu-<gpu>.{md,json}
    python benchmarks/gpu.py all --model /models/llama-8b

    # PD (1P1D), colocated engines (no PD) and the adaptive pool on the same GPUs, one after
    # the other, under the same workloads (the seed's, a rate sweep, a short-prompt/long-output
    # mix); `report` adds their table and gpu-<gpu>-compare.png
    python benchmarks/gpu.py compare --model M --gpus 0,1

    # or step by step: several topologies side by side (slots give each its own ports)
    python benchmarks/gpu.py up nixl --model M --slot 0 --launcher-args '--cross-layer-blocks'
    python benchmarks/gpu.py run nixl kv_bandwidth equality latency calibrate serve kv_health
    python benchmarks/gpu.py down nixl
    python benchmarks/gpu.py report

Phases are described in benchmarks/gpu_phases.py. Results of every `run` merge into one JSON
(`--results`), keyed by topology and phase, with the command lines that made them; `report`
renders the markdown from it. A failed correctness check makes `run` exit 1 after saving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_phases as phases  # noqa: E402
from benchmarks.gpu_report import plot_compare, render  # noqa: E402

LAUNCHER = REPO / "launchers" / "disagg.sh"
PHASES = ("kv_bandwidth", "equality", "latency", "calibrate", "serve", "kv_health")
ENGINE_ARGS = (
    "--no-enable-prefix-caching --max-model-len 16384 --served-model-name m "
    "--gpu-memory-utilization 0.3 --kv-cache-memory-bytes 17179869184"
)  # one GPU shared by two engines: a fixed KV size each, no prefix cache (every request pulls)


def ports(slot: int) -> dict[str, int]:
    """Distinct ports for topology `slot` (0..4), so several can run side by side."""
    return {  # launchers/disagg.sh --<key>-port
        "proxy": 9100 + slot,
        "prefill": 7100 + 20 * slot,
        "decode": 7200 + 20 * slot,
        "side_channel": 20000 + 1000 * slot,  # the launcher's +10i, +100+10j, +200+10k
        "lmcache_init": 7300 + 20 * slot,
        "lmcache_alloc": 7400 + 20 * slot,
        "notify": 7500 + slot,
        "pool": 7600 + 20 * slot,
    }


LAYOUTS = ("pd", "colocated", "pool")


def layout_options(layout: str, gpus: list[str], pool_size: int) -> dict[str, str]:
    """launchers/disagg.sh options for a layout of the same engines and GPUs:
    pd         one prefiller (first GPU) and one decoder (last GPU), NixlConnector
    colocated  `pool_size` plain engines (no KV connector) serving whole requests, spread over
               the GPUs; the proxy routes each request to the least loaded (no PD)
    pool       `pool_size` kv_both engines; the proxy's pool planner decides per request"""
    if layout == "pd":
        return {"--prefill-gpus": gpus[0], "--decode-gpus": gpus[-1]} if gpus else {}
    if layout not in LAYOUTS:
        raise SystemExit(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    options = {"--prefill": "0", "--decode": "0", "--pool": str(pool_size)}
    if gpus:
        options["--pool-gpus"] = ",".join(gpus[i % len(gpus)] for i in range(pool_size))
    if layout == "colocated":
        options.update({"--pool-connector": "none", "--pool-mode": "colocated"})
    return options


def engine_urls(layout: str, host: str, p: dict[str, int], pool_size: int) -> list[str]:
    if layout == "pd":
        return [f"http://{host}:{p['prefill']}", f"http://{host}:{p['decode']}"]
    return [f"http://{host}:{p['pool'] + i}" for i in range(pool_size)]


# ------------------------------------------------------------------ facts about the host


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _ucx_version() -> str | None:
    """UCX as loaded by NIXL's wheel (it bundles its own libucp)."""
    import ctypes
    import importlib.util

    for pkg in ("nixl_cu13", "nixl_cu12", "nixl"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        base = Path(next(iter(spec.submodule_search_locations))).parent
        for lib in sorted(base.glob(f"{pkg}*.libs/libucp*.so*")) + sorted(
            base.glob(f"{pkg}/**/libucp*.so*")
        ):
            try:
                f = ctypes.CDLL(str(lib)).ucp_get_version_string
                f.restype = ctypes.c_char_p
                return str(f().decode())
            except (OSError, AttributeError):
                continue
    return None


def host_facts() -> dict[str, Any]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for dist in ("vllm", "torch", "nixl", "nixl-cu13", "nixl-cu12", "lmcache", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:  # wheels unpacked on PYTHONPATH have no dist-info for metadata to find
        import torch
        import vllm

        versions.update(vllm=vllm.__version__, torch=torch.__version__, cuda=torch.version.cuda)
    except ImportError:
        pass
    versions["ucx"] = _ucx_version()
    gpus = _run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    )
    keep = re.compile(r"^(UCX_|VLLM_|NCCL_|NIXL_|CUDA_VISIBLE|TORCH_SYMM|NVSHMEM_|LMCACHE_)")
    return {
        "gpus": [g.strip() for g in gpus.splitlines() if g.strip()],
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "versions": versions,
        "environment": {k: v for k, v in sorted(os.environ.items()) if keep.match(k)},
        "pdproxy_commit": _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or None,
    }


def gpu_tag(facts: dict[str, Any]) -> str:
    name = (facts.get("gpus") or ["gpu"])[0].split(",")[0].lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


# ------------------------------------------------------------------ results file


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return {"meta": {}, "topologies": {}, "runs": {}}


@contextlib.contextmanager
def results_of(path: Path) -> Iterator[dict[str, Any]]:
    """Read, change and write the results file under a lock (topologies start side by side)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_suffix(".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load_results(path)
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)


# ------------------------------------------------------------------ topologies


def _topology_file(work: Path, name: str) -> Path:
    return work / name / "topology.json"


def launcher_argv(a: argparse.Namespace, log_dir: Path) -> list[str]:
    """The launchers/disagg.sh command line of `up`: the layout's engines on the slot's ports."""
    gpus = a.gpus.split(",") if a.gpus else []
    options = {
        "--model": a.model,
        "--connector": a.connector,
        "--python": a.python,
        "--proxy-cmd": a.proxy_cmd,
        "--log-dir": str(log_dir),
        "--health-timeout": str(a.timeout),
        **{f"--{k.replace('_', '-')}-port": str(v) for k, v in ports(a.slot).items()},
    }
    options.update(layout_options(a.layout, gpus, a.pool_size))
    argv = ["bash", str(LAUNCHER), *(x for kv in options.items() for x in kv)]
    argv += shlex.split(a.launcher_args)
    return [*argv, "--", *shlex.split(a.engine_args), "--dtype", a.dtype]


def up(a: argparse.Namespace) -> int:
    p = ports(a.slot)
    log_dir = (a.work / a.name).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = launcher_argv(a, log_dir)
    env = dict(os.environ)
    for pair in a.env:
        key, _, value = pair.partition("=")
        env[key] = value
    started = time.monotonic()
    out = (log_dir / "launcher.log").open("w")
    proc = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    print(f"[gpu] {a.name}: launcher pid {proc.pid}, log {log_dir}/launcher.log", flush=True)
    while True:
        text = (log_dir / "launcher.log").read_text(errors="replace")
        if "[disagg] supervising" in text:
            break
        if proc.poll() is not None or time.monotonic() - started > a.timeout + 120:
            print(text[-6000:], flush=True)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            print(f"[gpu] {a.name}: launcher failed (rc {proc.poll()})", flush=True)
            return 1
        time.sleep(1)
    ready = round(time.monotonic() - started, 1)
    host = "127.0.0.1"
    engines = engine_urls(a.layout, host, p, a.pool_size)
    topo = {
        "name": a.name,
        "connector": a.connector if a.layout != "colocated" else "none",
        "layout": a.layout,
        "slot": a.slot,
        "pid": proc.pid,
        "proxy": f"http://{host}:{p['proxy']}",
        "prefill": engines[0],  # the pool's first and last engine stand in for the two roles
        "decode": engines[-1],
        "engines": engines,
        "model": a.served_name,
        "tokenizer": a.model,
        "dtype": a.dtype,
        "vocab": a.vocab,
        "log_dir": str(log_dir),
        "ready_s": ready,
        "launcher_command": shlex.join(argv[1:]).replace(str(REPO) + "/", ""),
        "launcher_args": a.launcher_args,
        "engine_args": a.engine_args,
        "env": a.env,
        "gpus": a.gpus,
        "engine_lines": [ln for ln in text.splitlines() if ln.startswith("env ")],
    }
    _topology_file(a.work, a.name).write_text(json.dumps(topo, indent=1))
    facts = host_facts()
    with results_of(a.results) as results:
        results["meta"] = {**results.get("meta", {}), **facts}
        results["topologies"][a.name] = {
            k: v for k, v in topo.items() if k not in ("pid", "log_dir")
        }
    print(f"[gpu] {a.name}: ready after {ready}s", flush=True)
    return 0


def down(a: argparse.Namespace) -> int:
    f = _topology_file(a.work, a.name)
    if not f.exists():
        print(f"[gpu] {a.name}: not running", flush=True)
        return 0
    pid = json.loads(f.read_text())["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    for _ in range(60):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(1)
    f.unlink()
    print(f"[gpu] {a.name}: stopped", flush=True)
    return 0


def _target(work: Path, name: str) -> phases.Target:
    t = json.loads(_topology_file(work, name).read_text())
    return phases.Target(
        t["name"],
        t["connector"],
        t["proxy"],
        t["prefill"],
        t["decode"],
        t["model"],
        t["tokenizer"],
        t["dtype"],
        t["vocab"],
        Path(t["log_dir"]),
        tuple(t.get("engines") or (t["prefill"], t["decode"])),
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def serve_plan(a: argparse.Namespace) -> list[tuple[str, str, int, int, int, float]]:
    targets = ["proxy", "direct"] if not a.proxy_only else ["proxy"]
    plan = []
    if a.seed_prompts:
        for where in targets:
            plan.append(
                (
                    f"seed {a.seed_input}/{a.seed_output}",
                    where,
                    a.seed_input,
                    a.seed_output,
                    a.seed_prompts,
                    a.seed_rate,
                )
            )
    sweeps = ((a.sweep_input, a.sweep_output, a.rates), (a.mix_input, a.mix_output, a.mix_rates))
    for n_in, n_out, rates in sweeps:
        for rate in [float(x) for x in rates.split(",") if x]:
            num = max(a.sweep_min_prompts, int(rate * a.sweep_seconds))
            for where in targets:
                plan.append((f"{n_in}/{n_out} @ {rate:g}/s", where, n_in, n_out, num, rate))
    return plan


def _phase(a: argparse.Namespace, t: phases.Target, phase: str) -> dict[str, Any]:
    if phase == "kv_bandwidth":
        return asyncio.run(phases.kv_bandwidth(t, _ints(a.kv_sizes), a.kv_requests))
    if phase == "equality":
        return asyncio.run(phases.equality(t, a.max_tokens, a.split_gap_bound, a.max_prompt_tokens))
    if phase == "latency":
        return asyncio.run(phases.latency(t, a.rounds, a.latency_prompt, a.latency_output))
    if phase == "calibrate":
        return asyncio.run(
            phases.calibrate(
                t.decode, t, _ints(a.prefill_lens), _ints(a.batches), _ints(a.mixed_lens)
            )
        )
    if phase == "serve":
        bench_cmd = shlex.split(a.bench_cmd) if a.bench_cmd else None
        return phases.serve(t, serve_plan(a), a.slo_ttft_ms, a.slo_tpot_ms, bench_cmd)
    if phase == "kv_health":
        return asyncio.run(phases.kv_health(t))
    raise SystemExit(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")


def _command() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = str(script.relative_to(REPO)) if script.is_relative_to(REPO) else sys.argv[0]
    return "python " + shlex.join([shown, *sys.argv[1:]])


def run(a: argparse.Namespace) -> int:
    """Each phase's result is saved as it ends; a phase that raises is saved as
    `failed_<phase>` with its error, and the next phase still runs."""
    t = _target(a.work, a.name)
    failed = []
    for phase in a.phases:
        started = time.monotonic()
        print(f"[gpu] {t.name}: {phase} ...", flush=True)
        key = a.key or phase
        try:
            result = _phase(a, t, phase)
        except Exception as exc:  # a measurement that broke: keep its reason, go on
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            key = f"failed_{key}"
            failed.append(phase)
        else:
            if phase == "equality" and not result["summary"]["ok"]:
                failed.append(phase)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["command"] = _command()
        result["at"] = datetime.now(UTC).isoformat(timespec="seconds")
        with results_of(a.results) as results:
            results["runs"].setdefault(t.name, {})[key] = result
        print(f"[gpu] {t.name}: {key} done in {result['seconds']}s", flush=True)
    if failed:
        print(f"[gpu] {t.name}: FAILED: {', '.join(failed)}", flush=True)
        return 1
    return 0


def report(a: argparse.Namespace) -> int:
    data = load_results(a.results)
    notes = Path(a.notes).read_text() if a.notes else ""
    md = a.md or a.results.with_suffix(".md")
    md.write_text(render(data, notes))
    print(f"[gpu] wrote {md}", flush=True)
    png = a.results.with_name(a.results.stem + "-compare.png")
    try:
        if plot_compare(data, png):
            print(f"[gpu] wrote {png}", flush=True)
    except ImportError:
        print(
            "[gpu] no matplotlib here: `python benchmarks/gpu.py report` elsewhere plots",
            flush=True,
        )
    return 0


def all_steps(a: argparse.Namespace) -> int:
    """The whole benchmark for one host: NIXL, then LMCache, then the report."""
    rc = 0
    for connector in a.connectors.split(","):
        a.name, a.connector, a.slot, a.layout = connector, connector, 0, "pd"
        if up(a) != 0:
            rc = 1
            continue
        try:
            a.phases = [p for p in PHASES if not (connector == "lmcache" and p == "calibrate")]
            a.key = None
            rc |= run(a)
        finally:
            down(a)
    return rc | report(a)


def compare(a: argparse.Namespace) -> int:
    """The same GPUs and engines as PD (1P1D), as colocated engines (no PD) and as an adaptive
    pool, one after the other, each under the same `vllm bench serve` workloads through the
    proxy; rows stored under the key `compare` of each configuration."""
    rc = 0
    a.connector, a.proxy_only, a.key, a.phases = "nixl", True, "compare", ["serve"]
    for layout in a.configs.split(","):
        a.name, a.layout = f"{a.prefix}{layout}", layout
        if up(a) != 0:
            rc = 1
            continue
        try:
            rc |= run(a)
        finally:
            down(a)
    return rc | report(a)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, default=Path("logs/gpu"), help="logs and topology state")
    ap.add_argument(
        "--results", type=Path, help="results JSON (default benchmarks/results/gpu-<gpu>.json)"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def topology_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="model directory (also the tokenizer)")
        p.add_argument("--served-name", default="m")
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument("--vocab", type=int, default=32000, help="token ids for random prompts")
        p.add_argument(
            "--gpus",
            default="0",
            help="'0': both engines on GPU 0; '0,1': one each; '': no GPU (--device cpu)",
        )
        p.add_argument("--python", default=sys.executable, help="python with vLLM")
        p.add_argument("--proxy-cmd", default=f"{sys.executable} -m proxy")
        p.add_argument("--launcher-args", default="", help="more launchers/disagg.sh options")
        p.add_argument("--engine-args", default=ENGINE_ARGS, help="vLLM args of both engines")
        p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the engines")
        p.add_argument("--timeout", type=int, default=900, help="seconds for the engines to start")
        p.add_argument(
            "--pool-size", type=int, default=2, help="engines of a pool/colocated layout"
        )

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--key", help="store under this name instead of the phase's")
        p.add_argument("--kv-sizes", default="500,2000", help="kv_bandwidth prompt lengths")
        p.add_argument("--kv-requests", type=int, default=8)
        p.add_argument("--max-tokens", type=int, default=32, help="equality answer length")
        p.add_argument(
            "--split-gap-bound", type=float, default=0.2, help="nat (see phases.compare)"
        )
        p.add_argument("--max-prompt-tokens", type=int, default=15000, help="equality cases")
        p.add_argument("--rounds", type=int, default=50, help="latency rounds")
        p.add_argument("--latency-prompt", type=int, default=2000)
        p.add_argument("--latency-output", type=int, default=16)
        p.add_argument("--prefill-lens", default="256,1024,2048,4096,8192")
        p.add_argument("--batches", default="1,2,4,8,16,32,64,128")
        p.add_argument("--mixed-lens", default="2048,8192")
        p.add_argument("--seed-input", type=int, default=7500)
        p.add_argument("--seed-output", type=int, default=200)
        p.add_argument("--seed-prompts", type=int, default=30, help="0: no seed workload")
        p.add_argument("--seed-rate", type=float, default=1.0)
        p.add_argument("--sweep-input", type=int, default=2000)
        p.add_argument("--sweep-output", type=int, default=200)
        p.add_argument("--rates", default="2,4,8,16", help="sweep request rates")
        p.add_argument("--sweep-seconds", type=float, default=6.0, help="prompts = rate x this")
        p.add_argument("--sweep-min-prompts", type=int, default=30)
        p.add_argument("--mix-input", type=int, default=256, help="short-prompt/long-output mix")
        p.add_argument("--mix-output", type=int, default=1024)
        p.add_argument("--mix-rates", default="", help="request rates of the mix ('': none)")
        p.add_argument("--proxy-only", action="store_true", help="serve: no direct runs")
        p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
        p.add_argument("--slo-tpot-ms", type=float, default=50.0)
        p.add_argument("--bench-cmd", help="run `vllm bench serve` as this command, not in-process")

    p = sub.add_parser("up", help="start a topology and wait until it serves")
    p.add_argument("name")
    p.add_argument("--connector", choices=["nixl", "lmcache"], default="nixl")
    p.add_argument("--slot", type=int, default=0, choices=range(5), help="port set (see ports)")
    p.add_argument("--layout", choices=LAYOUTS, default="pd", help="see layout_options")
    topology_args(p)
    p = sub.add_parser("down", help="stop a topology")
    p.add_argument("name")
    p = sub.add_parser("run", help="run phases against a running topology")
    p.add_argument("name")
    p.add_argument("phases", nargs="+", choices=PHASES)
    run_args(p)
    p = sub.add_parser("report", help="write the markdown from the results JSON")
    p.add_argument("--md", type=Path)
    p.add_argument("--notes", help="markdown to put under the title (findings)")
    p = sub.add_parser("all", help="every phase on NIXL, then LMCache, then the report")
    p.add_argument("--connectors", default="nixl,lmcache")
    p.add_argument("--md", type=Path)
    p.add_argument("--notes")
    topology_args(p)
    run_args(p)
    p = sub.add_parser(
        "compare", help="PD, colocated and the adaptive pool on the same GPUs, then the report"
    )
    p.add_argument("--configs", default=",".join(LAYOUTS), help="layouts, in order")
    p.add_argument("--prefix", default="cmp-", help="topology names: PREFIX + layout")
    p.add_argument("--md", type=Path)
    p.add_argument("--notes")
    p.add_argument("--slot", type=int, default=0, choices=range(5))
    topology_args(p)
    run_args(p)
    p.set_defaults(rates="2,4,6,8", sweep_input=7500, sweep_output=200, mix_rates="4,16")
    return ap


def main() -> None:
    a = parser().parse_args()
    if a.results is None:
        a.results = REPO / "benchmarks" / "results" / f"gpu-{gpu_tag(host_facts())}.json"
    handlers = {
        "up": up,
        "down": down,
        "run": run,
        "report": report,
        "all": all_steps,
        "compare": compare,
    }
    sys.exit(handlers[a.cmd](a))


if __name__ == "__main__":
    main()
