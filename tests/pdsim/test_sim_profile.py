"""Timing profiles: the shipped H200 profile loads and is the fit of the GPU results, the flags
override it, a bad file is refused with a message naming it, and a sim started with one runs
with its delays."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from benchmarks.sim_profile import PROFILE, RESULTS, profile
from pdsim import cli
from pdsim.config import Timing
from pdsim.launch import start_sim
from pdsim.profile import ProfileError, load_profile, shipped

H200 = "h200-llama-8b-bf16"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_shipped_h200_profile_differs_from_the_defaults() -> None:
    assert H200 in shipped()
    profile = load_profile(H200)
    assert "H200" in profile.name and "gpu-h200.json" in profile.source
    timing = cli.config_from_args(parse("--timing-profile", H200)).timing
    assert timing == Timing(**profile.timing)
    default = Timing()
    assert timing.prefill_ms_per_token < default.prefill_ms_per_token
    assert timing.decode_base_ms < default.decode_base_ms
    assert timing.xfer_overhead_ms > default.xfer_overhead_ms


def test_shipped_h200_profile_is_the_fit_of_the_gpu_results() -> None:
    """The profile is made from the results file (benchmarks/sim_profile.py), not by hand."""
    shipped_data = json.loads(PROFILE.read_text())
    assert shipped_data == profile(RESULTS, "nixl")
    assert PROFILE.stem == H200


def test_the_cross_layer_profile_pulls_faster_with_the_same_compute() -> None:
    xl_file = PROFILE.with_name(H200 + "-xl.json")
    assert json.loads(xl_file.read_text()) == profile(RESULTS, "nixl", "nixl-v1-xl")
    xl, v2 = load_profile(H200 + "-xl"), load_profile(H200)
    assert H200 + "-xl" in shipped() and "nixl-v1-xl" in xl.source
    same = ("prefill_ms_per_token", "decode_base_ms", "decode_ms_per_seq")
    assert all(xl.timing[k] == v2.timing[k] for k in same)
    pull = {p.name: Timing(**p.timing) for p in (xl, v2)}  # 2000 tokens: 125 blocks of 16
    ms = {n: t.xfer_overhead_ms + 125 * t.xfer_ms_per_block for n, t in pull.items()}
    assert ms[xl.name] < 5.0 < ms[v2.name]  # measured 2.2 against 36.4 ms


def test_flags_override_the_profile_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"timing": {"decode_base_ms": 3.0, "prefill_ms_per_token": 0.01}}))
    t = cli.config_from_args(parse("--timing-profile", str(f), "--decode-base-ms", "9")).timing
    assert (t.decode_base_ms, t.prefill_ms_per_token) == (9.0, 0.01)
    assert t.decode_ms_per_seq == Timing().decode_ms_per_seq
    assert cli.config_from_args(parse()).timing == Timing()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not valid JSON"),
        ('{"name": "x"}', "has no 'timing' mapping"),
        ('{"timing": {"decode_ms": 1}}', "unknown keys ['decode_ms']"),
        ('{"timing": {"decode_base_ms": -1}}', "decode_base_ms must be a number >= 0"),
    ],
)
def test_bad_profiles_are_refused(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_profile(str(f))
    with pytest.raises(ProfileError, match="No such file"):
        load_profile(str(tmp_path / "missing.json"))


def test_sim_runs_with_a_profile(tmp_path: Path) -> None:
    sim = start_sim("both", "--timing-profile", H200, log=tmp_path / "sim.log")
    try:
        info = httpx.get(sim.url + "/_sim/info", timeout=5).json()
        assert info["timing"]["decode_base_ms"] == load_profile(H200).timing["decode_base_ms"]
    finally:
        sim.stop()
