"""benchmarks/gpu.py without a GPU: the launcher command `up` makes for each layout, run through
launchers/disagg.sh --dry-run (the engines it would start, on which GPUs and ports), the slots'
ports, the serve plan, and the report of the committed results."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from benchmarks import gpu
from benchmarks.gpu_report import render
from tests.launchers.plan import LAUNCHER, Command, Plan, dry_run_plan

RESULTS = Path(gpu.REPO, "benchmarks", "results")
UP = (
    "up",
    "t",
    "--model",
    "/models/m",
    "--python",
    "/opt/vllm/bin/python",
    "--proxy-cmd",
    "pdproxy",
)


def args(*argv: str) -> argparse.Namespace:
    return gpu.parser().parse_args(argv)


def planned(a: argparse.Namespace, log_dir: Path) -> Plan:
    argv = gpu.launcher_argv(a, log_dir)
    assert argv[:2] == ["bash", str(LAUNCHER)]
    return dry_run_plan(argv[2:])


def engines(plan: Plan) -> list[Command]:
    return [plan.commands[name] for name in plan.order if name != "proxy"]


def same_engine(cmd: Command) -> list[str]:
    """An engine's command line less what differs by role and place (its port, KV connector,
    the sockets of its KV-cache events)."""
    argv = list(cmd.argv)
    for flag in ("--port", "--kv-transfer-config", "--kv-events-config"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    return argv


def urls(plan: Plan, *flags: str) -> list[str]:
    return [u for flag in flags for u in plan.commands["proxy"].flags(flag)]


def test_pd_prefills_on_the_first_gpu_and_decodes_on_the_last(tmp_path: Path) -> None:
    plan = planned(args(*UP, "--gpus", "0,1"), tmp_path)
    assert plan.order == ["prefill-0", "decode-0", "proxy"]
    prefill, decode = engines(plan)
    assert (prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert prefill.kv_config["kv_role"] == "kv_producer"
    assert decode.kv_config["kv_role"] == "kv_consumer"
    assert urls(plan, "--prefill", "--decode") == gpu.engine_urls(
        "pd", "127.0.0.1", gpu.ports(0), 2
    )
    assert plan.commands["proxy"].flag("--port") == str(gpu.ports(0)["proxy"])
    for cmd in (prefill, decode):  # the engine options and dtype of the benchmark
        assert cmd.flag("--served-model-name") == "m"
        assert cmd.flag("--max-model-len") == "16384"
        assert cmd.flag("--dtype") == "bfloat16"
        assert "--no-enable-prefix-caching" in cmd.argv


def test_colocated_engines_serve_whole_requests_one_per_gpu(tmp_path: Path) -> None:
    plan = planned(args(*UP, "--gpus", "0,1", "--layout", "colocated"), tmp_path)
    assert plan.order == ["pool-0", "pool-1", "proxy"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in engines(plan)] == ["0", "1"]
    assert all("--kv-transfer-config" not in c.argv for c in engines(plan))
    assert plan.commands["proxy"].flag("--pool-mode") == "colocated"
    assert urls(plan, "--pool") == gpu.engine_urls("colocated", "127.0.0.1", gpu.ports(0), 2)


def test_a_pool_larger_than_the_gpus_goes_round_them(tmp_path: Path) -> None:
    plan = planned(args(*UP, "--gpus", "0,1", "--layout", "pool", "--pool-size", "4"), tmp_path)
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in engines(plan)] == ["0", "1", "0", "1"]
    assert {c.kv_config["kv_role"] for c in engines(plan)} == {"kv_both"}
    assert plan.commands["proxy"].flag("--pool-mode") == "adaptive"
    assert urls(plan, "--pool") == gpu.engine_urls("pool", "127.0.0.1", gpu.ports(0), 4)


def test_the_layouts_compare_the_same_engines(tmp_path: Path) -> None:
    """PD, colocated and pool differ in roles and KV connector only: the same model, options,
    dtype and launcher arguments reach every engine."""
    extra = ("--launcher-args", "--block-size 64", "--dtype", "float32")
    lines = {
        layout: {
            tuple(same_engine(c))
            for c in engines(planned(args(*UP, *extra, "--layout", layout), tmp_path / layout))
        }
        for layout in gpu.LAYOUTS
    }
    assert lines["pd"] == lines["colocated"] == lines["pool"]
    (line,) = lines["pd"]
    assert line[line.index("--block-size") + 1] == "64"
    assert line[line.index("--dtype") + 1] == "float32"


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown layout 'split'"):
        gpu.layout_options("split", ["0"], 2)


def ports_used(plan: Plan) -> set[int]:
    """Every port the plan's processes listen on or send to: HTTP, NIXL side channels, and the
    LMCache files' pd_*_port keys."""
    used = {int(c.flag("--port")) for c in plan.commands.values()}
    used |= {
        int(c.env["VLLM_NIXL_SIDE_CHANNEL_PORT"])
        for c in plan.commands.values()
        if "VLLM_NIXL_SIDE_CHANNEL_PORT" in c.env
    }
    for text in plan.files.values():
        for found in re.findall(r"^pd_\w+_port: \[?([\d, ]+)\]?$", text, re.M):
            used |= {int(p) for p in found.split(",")}
    return used


def test_topologies_side_by_side_share_no_port(tmp_path: Path) -> None:
    seen: dict[int, set[int]] = {}
    for slot in range(5):
        used: set[int] = set()
        for layout, connector in (("pd", "nixl"), ("pd", "lmcache"), ("pool", "nixl")):
            a = args(*UP, "--slot", str(slot), "--layout", layout, "--connector", connector)
            a.pool_size = 3
            used |= ports_used(planned(a, tmp_path / f"{slot}-{layout}-{connector}"))
        for other, theirs in seen.items():
            assert not used & theirs, f"slots {other} and {slot} share {sorted(used & theirs)}"
        seen[slot] = used
    assert gpu.ports(0)["notify"] in seen[0]  # the LMCache files were read


def test_serve_plan_runs_each_workload_through_the_proxy_then_directly() -> None:
    a = args("run", "t", "serve", "--rates", "2,8", "--mix-rates", "4")
    plan = gpu.serve_plan(a)
    assert [(label, where) for label, where, *_ in plan] == [
        ("seed 7500/200", "proxy"),
        ("seed 7500/200", "direct"),
        ("2000/200 @ 2/s", "proxy"),
        ("2000/200 @ 2/s", "direct"),
        ("2000/200 @ 8/s", "proxy"),
        ("2000/200 @ 8/s", "direct"),
        ("256/1024 @ 4/s", "proxy"),
        ("256/1024 @ 4/s", "direct"),
    ]
    prompts = {label: num for label, _, _, _, num, _ in plan}
    # 30 at least (--sweep-min-prompts), else rate x --sweep-seconds
    assert prompts == {
        "seed 7500/200": 30,
        "2000/200 @ 2/s": 30,
        "2000/200 @ 8/s": 48,
        "256/1024 @ 4/s": 30,
    }
    assert {
        where for _, where, *_ in gpu.serve_plan(args("run", "t", "serve", "--proxy-only"))
    } == {"proxy"}


def test_the_committed_gpu_report_is_rendered_from_its_results() -> None:
    """benchmarks/results/gpu-h200.md is what `gpu.py report --notes ...notes.md` writes from
    the JSON: a change to the report or the results without the other shows here."""
    data = gpu.load_results(RESULTS / "gpu-h200.json")
    notes = (RESULTS / "gpu-h200.notes.md").read_text()
    assert render(data, notes) == (RESULTS / "gpu-h200.md").read_text()
