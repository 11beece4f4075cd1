"""The simulator's timing profile, fitted to the engine measurements of a GPU run.

Reads the `calibrate` and `kv_bandwidth` runs of one topology in a results file of
`benchmarks/gpu.py` and writes a profile for `pdproxy sim --timing-profile` (pdsim/profile.py)
that holds the fitted delays, where they come from and the measurements themselves:

  decode step     least squares of the step time (p50 inter-token latency of B streams)
                  against the batch B: decode_base_ms + decode_ms_per_seq * B
  prefill         one cost per prompt token, least squares through the origin over every
                  measured step that carried a prompt: a prompt alone (the engine's own
                  vllm:request_prefill_time_seconds) and a prompt beside 16 decoding streams
                  (the longest inter-token gap while it ran), each less the decode part the
                  step model gives it; the chunk is what vLLM's budget lets into one step
  KV pull         the line through the pulls of the two prompt sizes, per 16-token block

    python benchmarks/sim_profile.py                 # benchmarks/results/gpu-h200.json, nixl
    python benchmarks/sim_profile.py --check         # say how far the shipped profile is off
    python benchmarks/sim_profile.py --kv-topology nixl-v1-xl \
        --out pdsim/profiles/h200-llama-8b-bf16-xl.json   # the pull of another KV layout

The fit's residuals are printed: the step model is linear in the prompt tokens of a step, and
how far each measured step is from it says what the simulator gets wrong.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu-h200.json"
PROFILE = ROOT / "pdsim" / "profiles" / "h200-llama-8b-bf16.json"
BUDGET = 8192  # the engines' max_num_batched_tokens in that run
KV_BLOCK = 16  # tokens per KV block in that run


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def prefill_steps(calibrate: dict[str, Any]) -> list[dict[str, float]]:
    """Every measured step that carried a prompt: its prompt chunk, decodes and time (ms)."""
    steps = [
        {"chunk": r["prompt_tokens"], "decodes": 0, "ms": r["engine_prefill_ms"], "beside": 0}
        for r in calibrate["prefill"]["rows"]
    ]
    for r in calibrate["mixed"]["rows"]:
        chunk = min(r["prefill_tokens"], BUDGET - r["batch"])  # each decode takes one token
        steps.append(
            {
                "chunk": chunk,
                "decodes": r["batch"],
                "ms": r["step_ms_during_max_p50"],
                "beside": r["prefill_tokens"],
            }
        )
    return steps


def fit(run: dict[str, Any], kv_run: dict[str, Any] | None = None) -> dict[str, float]:
    """The delays from `run`'s calibrate phase and the pulls of `kv_run`'s kv_bandwidth
    (`run`'s own by default: another KV layout pulls differently, computes the same)."""
    cal, kv = run["calibrate"], (kv_run or run)["kv_bandwidth"]
    rows = cal["decode"]["rows"]
    base, per_seq = _line([float(r["batch"]) for r in rows], [r["step_ms_p50"] for r in rows])
    steps = prefill_steps(cal)
    # the prompt's share of each step: its time less the decode part of the step model
    ys = [s["ms"] - base - per_seq * s["decodes"] for s in steps]
    xs = [s["chunk"] for s in steps]
    per_token = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    pulls = kv["rows"]
    blocks = [float(-(-r["prompt_tokens"] // KV_BLOCK)) for r in pulls]  # whatever the layout
    xfer0, xfer1 = _line(blocks, [r["ms_per_transfer"] for r in pulls])
    return {
        "prefill_ms_per_token": round(per_token, 6),
        "prefill_overhead_ms": 0.0,
        "decode_base_ms": round(base, 4),
        "decode_ms_per_seq": round(per_seq, 5),
        "xfer_overhead_ms": round(xfer0, 3),
        "xfer_ms_per_block": round(xfer1, 5),
    }


def modelled_ms(timing: dict[str, float], decodes: int, chunk: int) -> float:
    """pdsim.engine.step_ms, with these constants."""
    ms = timing["decode_base_ms"] + timing["decode_ms_per_seq"] * decodes
    if chunk:
        ms += timing["prefill_overhead_ms"] + timing["prefill_ms_per_token"] * chunk
    return ms


def residuals(run: dict[str, Any], timing: dict[str, float]) -> list[str]:
    out = []
    for r in run["calibrate"]["decode"]["rows"]:
        m = modelled_ms(timing, r["batch"], 0)
        out.append(f"decode step, batch {r['batch']}: measured {r['step_ms_p50']} ms, model "
                   f"{m:.1f} ms ({m / r['step_ms_p50'] - 1:+.0%})")  # fmt: skip
    for s in prefill_steps(run["calibrate"]):
        m = modelled_ms(timing, int(s["decodes"]), int(s["chunk"]))
        what = (
            f"prefill of {s['chunk']} tokens alone"
            if not s["decodes"]
            else f"step beside {s['decodes']} decodes with a {s['beside']}-token prompt"
        )
        out.append(f"{what}: measured {s['ms']} ms, model {m:.1f} ms ({m / s['ms'] - 1:+.0%})")
    return out


def profile(results: Path, topology: str, kv_topology: str | None = None) -> dict[str, Any]:
    data = json.loads(results.read_text())
    run = data["runs"][topology]
    kv_topology = kv_topology or topology
    kv_run = data["runs"][kv_topology]
    timing = fit(run, kv_run)
    cal = run["calibrate"]
    try:
        shown = results.resolve().relative_to(ROOT)
    except ValueError:
        shown = results
    layout = ""
    if kv_topology != topology:
        layout = (
            f" The KV pull is {kv_topology}'s ({kv_topology}.kv_bandwidth, launcher options "
            f"{data['topologies'][kv_topology].get('launcher_args')!r}, environment "
            f"{data['topologies'][kv_topology].get('env')}); prefill and decode are "
            f"{topology}'s, not re-measured on that layout."
        )
    return {
        "name": "H200, Llama-3.1-8B shape, bf16"
        + (f", the KV pull of {kv_topology}" if kv_topology != topology else ""),
        "source": (
            "vLLM 0.24.0 on one NVIDIA H200 (CUDA graphs, chunked prefill of 8192 tokens, KV "
            "block 16, NixlConnector with UCX_CUDA_IPC_ENABLE_GET_ZCOPY=y; prefiller and "
            f"decoder on the same GPU): {shown}, runs {topology}.calibrate and "
            f"{topology}.kv_bandwidth, made by '{cal['command']}' and fitted by "
            "'python benchmarks/sim_profile.py'. decode: least squares of the step time "
            "against the batch; prefill: least squares through the origin over every measured "
            "step that carried a prompt (alone, and beside 16 decodes), less its decode part; "
            "transfer: the line through the pulls of 500 and 2000 tokens." + layout
        ),
        "timing": timing,
        "measured": {
            "prefill_engine_ms_by_prompt_tokens": {
                str(r["prompt_tokens"]): r["engine_prefill_ms"] for r in cal["prefill"]["rows"]
            },
            "decode_step_ms_p50_by_batch": {
                str(r["batch"]): r["step_ms_p50"] for r in cal["decode"]["rows"]
            },
            "longest_decode_step_ms_beside_a_prefill_of": {
                str(r["prefill_tokens"]): r["step_ms_during_max_p50"] for r in cal["mixed"]["rows"]
            },
            "decodes_beside_the_prefill": cal["mixed"]["rows"][0]["batch"],
            "pull_ms_by_prompt_tokens": {
                str(r["prompt_tokens"]): r["ms_per_transfer"]
                for r in kv_run["kv_bandwidth"]["rows"]
            },
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--topology", default="nixl")
    p.add_argument("--kv-topology", help="fit the KV pull to this topology's (default: the same)")
    p.add_argument("--out", type=Path, default=PROFILE)
    p.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = p.parse_args()
    made = profile(args.results, args.topology, args.kv_topology)
    data = json.loads(args.results.read_text())
    for line in residuals(data["runs"][args.topology], made["timing"]):
        print(line)
    if args.check:
        shipped = json.loads(args.out.read_text())
        same = shipped["timing"] == made["timing"]
        print(f"{args.out.name}: {'as fitted' if same else 'differs: ' + str(shipped['timing'])}")
        return 0 if same else 1
    args.out.write_text(json.dumps(made, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
