"""A simulated vLLM engine speaking the OpenAI API and NIXL's prefill/decode KV protocol.

Public API: ``start_sim(config) -> SimServer`` (``.url``, ``.port``, ``.side_channel_port``,
``.engine_id``, ``await .close()``), ``SimConfig``, ``Timing``, ``Faults``; the CLI lives in
``proxy.sim.cli`` (``add_arguments``, ``run``).
"""

from proxy.sim.config import SimConfig, Timing
from proxy.sim.faults import Faults
from proxy.sim.server import SimServer, start_sim

__all__ = ["Faults", "SimConfig", "SimServer", "Timing", "start_sim"]
