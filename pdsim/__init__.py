"""A simulated vLLM engine speaking the OpenAI API and NIXL's prefill/decode KV protocol.

Public API: ``start_sim(config) -> SimServer`` (``.url``, ``.port``, ``.side_channel_port``,
``.engine_id``, ``await .close()``), ``SimConfig``, ``Timing``, ``Faults``; the CLI lives in
``pdsim.cli`` (``add_arguments``, ``run``).
"""

from pdsim.config import SimConfig, Timing
from pdsim.faults import Faults
from pdsim.server import SimServer, start_sim

__all__ = ["Faults", "SimConfig", "SimServer", "Timing", "start_sim"]
