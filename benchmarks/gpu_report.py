"""Markdown of benchmarks/gpu.py's results JSON: one table per phase, every figure with the
command and the topology that made it."""

from __future__ import annotations

from typing import Any


def _f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += [
        "| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return [*out, ""]


def _commands(runs: dict[str, Any], phase: str) -> list[str]:
    cmds = sorted(
        {r[phase]["command"] for r in runs.values() if phase in r and "command" in r[phase]}
    )
    return ["Commands:", "", *[f"    {c}" for c in cmds], ""] if cmds else []


def _topologies(data: dict[str, Any]) -> list[str]:
    out = ["## Topologies", ""]
    rows = []
    for name, t in data.get("topologies", {}).items():
        rows.append(
            [
                f"`{name}`",
                t["connector"],
                t.get("dtype", ""),
                t.get("gpus", ""),
                f"`{t.get('launcher_args') or '(defaults)'}`",
                " ".join(t.get("env") or []) or "-",
                _f(t.get("ready_s")),
            ]
        )
    out += _table(
        ["topology", "connector", "dtype", "GPUs", "launcher options", "env", "ready s"], rows
    )
    for name, t in data.get("topologies", {}).items():
        out += [f"`{name}`: `launchers/disagg.sh` as run:", "", f"    {t['launcher_command']}", ""]
    return out


def _kv_bandwidth(runs: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in runs.items():
        for key, res in r.items():
            if not key.startswith("kv_bandwidth"):
                continue
            for row in res["rows"]:
                rows.append(
                    [
                        f"`{name}`",
                        row["prompt_tokens"],
                        row.get("transfers"),
                        row.get("gb_per_s"),
                        row.get("ms_per_transfer"),
                        row.get("mb_per_transfer"),
                        row.get("descriptors_per_transfer"),
                        row.get("us_per_descriptor"),
                        row.get("post_ms_per_transfer"),
                        row["client_e2e_ms"].get("p50"),
                    ]
                )
    if not rows:
        return []
    head = [
        "topology",
        "prompt tokens",
        "pulls",
        "GB/s",
        "ms / pull",
        "MB / pull",
        "descriptors / pull",
        "µs / descriptor",
        "post ms",
        "client e2e p50 ms",
    ]
    return [
        "## KV pull (decoder's own NIXL metrics)",
        "",
        *_table(head, rows),
        *_commands(runs, "kv_bandwidth"),
    ]


def _equality(runs: dict[str, Any]) -> list[str]:
    rows, detail = [], []
    for name, r in runs.items():
        for key, res in r.items():
            if not key.startswith("equality"):
                continue
            s = res["summary"]
            rows.append(
                [
                    f"`{name}`",
                    s["dtype"],
                    s["rule"],
                    f"{s['identical']}/{s['cases']}",
                    ", ".join(f"{g:.3f}" for g in s["gaps_at_splits"]) or "-",
                    _f(s["max_prefix_abs_dlogprob"], 4),
                    "-"
                    if s["proxied_with_a_pull"] is None
                    else f"{s['proxied_with_a_pull']}/{s['cases']}",
                    "pass" if s["ok"] else "**FAIL**",
                ]
            )
            for row in res["rows"]:
                detail.append(
                    [
                        f"`{name}`",
                        row["case"],
                        "yes" if row["stream"] else "no",
                        row.get("prompt_tokens"),
                        row.get("tokens"),
                        row.get("first_split"),
                        _f(row.get("direct_gap_at_split"), 4),
                        row["pulls_proxied"],
                        row["pulls_direct"],
                        "pass" if row.get("ok") else "**FAIL**",
                    ]
                )
    if not rows:
        return []
    head = [
        "topology",
        "dtype",
        "rule",
        "identical",
        "direct top-2 gap at splits (nat)",
        "max Δlogprob before split",
        "proxied with a pull",
        "check",
    ]
    dhead = [
        "topology",
        "case",
        "stream",
        "prompt tokens",
        "tokens",
        "first split",
        "direct gap there",
        "pulls (proxied)",
        "pulls (direct)",
        "check",
    ]
    return [
        "## Outputs: PD against the decoder alone (greedy)",
        "",
        *_table(head, rows),
        *_table(dhead, detail),
        *_commands(runs, "equality"),
    ]


def _latency(runs: dict[str, Any]) -> list[str]:
    rows, parts = [], []
    for name, r in runs.items():
        for key, res in r.items():
            if not key.startswith("latency"):
                continue
            for mode in ("direct", "floor", "proxy"):
                if mode in res:
                    t, e = res[mode]["ttft_ms"], res[mode]["e2e_ms"]
                    rows.append(
                        [
                            f"`{name}`",
                            mode,
                            t["p50"],
                            t["p90"],
                            t["p99"],
                            t["mean"],
                            e["p50"],
                            e["mean"],
                        ]
                    )
            if "proxy_minus_floor_ttft_ms" in res:
                d, e = res["proxy_minus_floor_ttft_ms"], res["proxy_minus_floor_e2e_ms"]
                rows.append(
                    [
                        f"`{name}`",
                        "**proxy - floor**",
                        d["p50"],
                        "",
                        "",
                        d["mean"],
                        e["p50"],
                        e["mean"],
                    ]
                )
            p = res.get("ttft_parts_mean") or {}
            if p:
                parts.append(
                    [
                        f"`{name}`",
                        p["direct_ttft_ms"],
                        p["pd_ttft_ms"],
                        p["excess_ms"],
                        p["prefill_leg_ms"],
                        p["kv_transfer_ms"],
                        p["decoder_first_step_ms"],
                        p["proxy_internal_ms"],
                        p["proxy_and_client_ms"],
                    ]
                )
    if not rows:
        return []
    head = ["topology", "mode", "TTFT p50", "p90", "p99", "mean", "e2e p50", "e2e mean"]
    phead = [
        "topology",
        "direct TTFT",
        "PD TTFT",
        "excess",
        "prefill leg",
        "KV transfer",
        "decoder first step",
        "proxy between legs",
        "proxy in/out + client",
    ]
    return [
        "## Concurrency 1: decoder alone, client-driven PD (floor), pdproxy (ms)",
        "",
        *_table(head, rows),
        "PD's TTFT over direct, in its parts (means, ms; from the proxy's "
        "and the decoder's own metrics):",
        "",
        *_table(phead, parts),
        *_commands(runs, "latency"),
    ]


def _serve(runs: dict[str, Any]) -> list[str]:
    rows = []
    for name, r in runs.items():
        for key, res in r.items():
            if not key.startswith("serve"):
                continue
            for row in res["rows"]:
                rows.append(
                    [
                        f"`{name}`",
                        row["label"],
                        row["target"],
                        f"{row['completed']}/{row['num_prompts']}",
                        row.get("median_ttft_ms"),
                        row.get("p95_ttft_ms"),
                        row.get("p99_ttft_ms"),
                        row.get("median_tpot_ms"),
                        row.get("p99_tpot_ms"),
                        row.get("median_itl_ms"),
                        row.get("p95_itl_ms"),
                        row.get("p99_itl_ms"),
                        _f(row.get("request_throughput"), 2),
                        _f(row.get("request_goodput"), 2),
                        row.get("decoder_pulls", "-"),
                    ]
                )
    if not rows:
        return []
    head = [
        "topology",
        "workload",
        "target",
        "done",
        "TTFT p50",
        "p95",
        "p99",
        "TPOT p50",
        "p99",
        "ITL p50",
        "p95",
        "p99",
        "req/s",
        "goodput",
        "pulls",
    ]
    cmds = sorted(
        {
            row["command"]
            for r in runs.values()
            for k, res in r.items()
            if k.startswith("serve")
            for row in res["rows"]
        }
    )
    return [
        "## `vllm bench serve`: through pdproxy and against the decoder alone (ms)",
        "",
        "goodput: requests/s with TTFT and TPOT within the SLO given with the command.",
        "",
        *_table(head, rows),
        "Commands (`--base-url` is the proxy or the decoder):",
        "",
        *[f"    {c}" for c in cmds],
        "",
    ]


def _compare_rows(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(layout, topology, row) of every `compare` run, in workload order: the seed's first,
    then each shape by rate."""
    topo = data.get("topologies", {})
    out = []
    for name, r in data.get("runs", {}).items():
        for row in r.get("compare", {}).get("rows", []):
            out.append((topo.get(name, {}).get("layout", name), name, row))
    order = {"pd": 0, "colocated": 1, "pool": 2}
    out.sort(
        key=lambda lr: (
            not lr[2]["label"].startswith("seed"),
            lr[2]["input_len"] < lr[2]["output_len"],
            lr[2]["request_rate"],
            order.get(lr[0], 9),
            lr[1],
        )
    )
    return out


def _compare(data: dict[str, Any]) -> list[str]:
    compared = _compare_rows(data)
    rows = []
    for layout, name, row in compared:
        kv = row.get("kv") or {}
        decisions = row.get("disagg_decisions") or {}
        local = sum(v for k, v in decisions.items() if 'decision="local"' in k)
        rows.append(
            [
                row["label"],
                f"**{layout}** `{name}`",
                f"{row['completed']}/{row['num_prompts']}",
                row.get("median_ttft_ms"),
                row.get("p99_ttft_ms"),
                row.get("median_itl_ms"),
                row.get("p99_itl_ms"),
                row.get("median_tpot_ms"),
                row.get("median_e2el_ms"),
                _f(row.get("output_throughput"), 0),
                _f(row.get("request_goodput"), 2),
                kv.get("ms_per_transfer", "-"),
                f"{local}/{sum(decisions.values())}" if decisions else "-",
            ]
        )
    if not rows:
        return []
    slo: dict[str, Any] = next(
        (r["compare"]["slo"] for r in data["runs"].values() if "compare" in r), {}
    )
    head = [
        "workload",
        "config",
        "done",
        "TTFT p50",
        "p99",
        "ITL p50",
        "p99",
        "TPOT p50",
        "e2e p50",
        "out tok/s",
        "goodput",
        "KV ms/pull",
        "local",
    ]
    cmds = sorted({row["command"] for _, _, row in compared})
    return [
        "## PD against colocated serving on the same GPUs (ms)",
        "",
        "pd: one prefiller, one decoder, NixlConnector; colocated: the same engines serving whole "
        "requests, no PD (the proxy routes each to the least loaded); pool: kv_both engines, the "
        "proxy's planner decides per request (local = served whole on one engine). goodput: "
        f"requests/s with TTFT <= {slo.get('ttft_ms')} ms and TPOT (mean ITL) <= "
        f"{slo.get('tpot_ms')} ms. KV ms/pull: the decoding engines' own "
        "`vllm:nixl_xfer_time_seconds` over the run. Goodput and ITL p99 against rate: "
        "`*-compare.png` beside this file.",
        "",
        *_table(head, rows),
        "Commands (`--base-url` is each configuration's proxy):",
        "",
        *[f"    {c}" for c in cmds],
        "",
    ]


def plot_compare(data: dict[str, Any], path: Any) -> bool:
    """Goodput and ITL p99 against request rate, one line per configuration and workload
    shape; False when there is nothing to plot."""
    series: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _, name, row in _compare_rows(data):
        shape = f"{row['input_len']}/{row['output_len']}"
        series.setdefault((name, shape), []).append(
            (row["request_rate"], row.get("request_goodput") or 0.0, row.get("p99_itl_ms") or 0.0)
        )
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    shapes = sorted({s for _, s in series})
    styles = ["-", "--", ":", "-."]
    for (layout, shape), pts in sorted(series.items()):
        pts.sort()
        ls = styles[shapes.index(shape) % len(styles)]
        label = f"{layout} {shape}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], ls, marker="o", label=label)
    ax1.set(xlabel="request rate (1/s)", ylabel="goodput (requests/s)", title="goodput")
    ax2.set(xlabel="request rate (1/s)", ylabel="ms", title="ITL p99", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    gpus = "; ".join(data.get("meta", {}).get("gpus", [])[:2])
    fig.suptitle(f"PD against colocated on the same GPUs ({gpus})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _calibrate(runs: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, r in runs.items():
        for key, res in r.items():
            if not key.startswith("calibrate"):
                continue
            p, d, m = res["prefill"], res["decode"], res["mixed"]
            out += [
                f"### `{name}` ({res['engine']})",
                "",
                f"Prefill: {p['overhead_ms']} ms + {p['ms_per_token']} ms per prompt token "
                "(least squares over the engine's own `vllm:request_prefill_time_seconds`).",
                "",
            ]
            out += _table(
                ["prompt tokens", "engine prefill ms", "client ms"],
                [[x["prompt_tokens"], x["engine_prefill_ms"], x["client_ms"]] for x in p["rows"]],
            )
            out += [
                f"Decode step: {d['base_ms']} ms + {d['ms_per_seq']} ms per running sequence.",
                "",
            ]
            out += _table(
                ["batch", "step p50 ms", "step p90 ms"],
                [[x["batch"], x["step_ms_p50"], x["step_ms_p90"]] for x in d["rows"]],
            )
            out += ["Decode steps while one long prompt is prefilled beside 16 streams:", ""]
            out += _table(
                [
                    "prefill tokens",
                    "step before (p50 ms)",
                    "longest step during (p50 over streams, ms)",
                    "steps during",
                    "long request ms",
                ],
                [
                    [
                        x["prefill_tokens"],
                        x["step_ms_before_p50"],
                        x["step_ms_during_max_p50"],
                        x["steps_during"],
                        x["long_request_ms"],
                    ]
                    for x in m["rows"]
                ],
            )
    return (
        ["## Engine timing (for the simulator's profile)", "", *out, *_commands(runs, "calibrate")]
        if out
        else []
    )


def _kv_health(runs: dict[str, Any]) -> list[str]:
    out = []
    for name, r in runs.items():
        h = r.get("kv_health")
        if not h:
            continue
        out.append(
            f"- `{name}`: {h['warning_count']} warning(s); gauges: "
            + ", ".join(f"`{k}` = {v:.4g}" for k, v in sorted(h["gauges"].items()))
        )
        out += [f"  - `{w.strip()[:400]}`" for w in h["warnings"][-1:]]
    return ["## What the proxy reports about the KV path", "", *out, ""] if out else []


def _failures(runs: dict[str, Any]) -> list[str]:
    out = [
        f"- `{name}` {key.removeprefix('failed_')}: {res['error'][:600]}"
        for name, r in runs.items()
        for key, res in r.items()
        if key.startswith("failed_")
    ]
    return ["## Measurements that failed", "", *out, ""] if out else []


def render(data: dict[str, Any], notes: str = "") -> str:
    meta = data.get("meta", {})
    runs = data.get("runs", {})
    lines = ["# pdproxy on GPUs with real vLLM", ""]
    if notes:
        lines += [notes.strip(), ""]
    v = meta.get("versions", {})
    lines += [
        "## Host",
        "",
        f"- GPUs: {'; '.join(meta.get('gpus', [])) or 'unknown'}",
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x),
        f"- host: {meta.get('host')}; pdproxy {meta.get('pdproxy_commit')}",
        "- environment: "
        + (", ".join(f"`{k}={x}`" for k, x in meta.get("environment", {}).items()) or "-"),
        "",
    ]
    lines += _topologies(data)
    sections = (_kv_bandwidth, _equality, _latency, _serve, _calibrate, _kv_health, _failures)
    for section in sections:
        lines += section(runs)
    lines += _compare(data)
    return "\n".join(lines).rstrip() + "\n"
