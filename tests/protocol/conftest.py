"""The engines the protocol suite runs against: the simulator (always) and real vLLM (when
PDPROXY_VLLM_PYTHON is set; the session's one 1P1D topology, shared with tests/e2e)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

if str(Path(__file__).parent) not in sys.path:  # pytest runs in importlib mode
    sys.path.insert(0, str(Path(__file__).parent))

from protocol_engines import MAX_MODEL_LEN, MODEL, Engines

from pdsim import launch


@pytest.fixture(scope="session")
def sim_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    """Two simulator processes with default timing, configured like the real topology."""
    logs: Path = tmp_path_factory.mktemp("protocol-sim")
    args = ("--model", MODEL, "--max-model-len", str(MAX_MODEL_LEN))
    p = launch.start_sim("prefill", *args, log=logs / "prefill.log")
    try:
        d = launch.start_sim("decode", *args, log=logs / "decode.log")
        try:
            yield Engines("sim", p.url, d.url)
        finally:
            d.stop()
    finally:
        p.stop()


@pytest.fixture(
    scope="session",
    params=["sim", pytest.param("vllm", marks=pytest.mark.real_vllm)],
)
def engines(request: pytest.FixtureRequest) -> Engines:
    if request.param == "sim":
        sim: Engines = request.getfixturevalue("sim_engines")
        return sim
    topo = request.getfixturevalue("topology")
    return Engines("vllm", topo.prefill, topo.decode, topo.model)
