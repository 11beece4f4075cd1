"""Configuration of one simulated vLLM instance.

The timing defaults describe a Llama-3.1-8B-class model in bf16 on one H100: prefill runs at
roughly 16k tokens/s, a decode step of one sequence takes about 7 ms and grows with the batch,
and a KV block of 16 tokens (~2 MiB) crosses the wire in about 0.1 ms after a fixed set-up cost.
``speed_factor`` multiplies every delay; 0 removes them all (overhead benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pdsim.faults import Faults
from pdsim.kvevents import KvEventsConfig
from pdsim.lmcache.config import LMCacheSimConfig

Role = Literal["prefill", "decode", "both"]
KvLoadFailurePolicy = Literal["recompute", "fail"]
SchedulingPolicy = Literal["fcfs", "priority"]

DEFAULT_MODEL = "pdsim/llama-8b"
DEFAULT_SIDE_CHANNEL_PORT = 5600  # vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT default
DEFAULT_KV_LEASE_SECONDS = 30.0  # vLLM's kv_connector_extra_config.kv_lease_duration default


@dataclass(frozen=True)
class Timing:
    """Delays of the engine model, in milliseconds, before ``speed_factor`` is applied."""

    prefill_ms_per_token: float = 0.06
    prefill_overhead_ms: float = 5.0
    decode_base_ms: float = 7.0
    decode_ms_per_seq: float = 0.08
    xfer_overhead_ms: float = 1.0
    xfer_ms_per_block: float = 0.1
    speed_factor: float = 1.0

    @property
    def enabled(self) -> bool:
        """False when every delay is zero: the engine then serves without a step loop."""
        return self.speed_factor > 0


@dataclass
class SimConfig:
    """Everything one instance needs; ``faults`` is the initial fault set (see ``Faults``)."""

    role: Role = "both"
    host: str = "127.0.0.1"
    port: int = 0
    model: str = DEFAULT_MODEL
    max_model_len: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 32768
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 0
    kv_lease_seconds: float = DEFAULT_KV_LEASE_SECONDS
    kv_load_failure_policy: KvLoadFailurePolicy = "fail"  # vLLM 0.32's default
    kv_params_on_eos: bool = True  # vLLM 0.32 offers KV on EOS / stop token ids too
    request_id_headers: bool = False  # vLLM's --enable-request-id-headers
    kv_transfer: bool = True  # False: no KV connector, kv_transfer_params ignored
    eos_probability: float = 0.005
    token_per_chunk: bool = False  # zero-delay mode: one token per next_steps (SSE event)
    prefix_caching: bool = False  # vLLM --enable-prefix-caching: reuse shared prompt blocks
    scheduling_policy: SchedulingPolicy = "fcfs"  # vLLM --scheduling-policy
    engine_id: str | None = None
    max_records: int = 10000
    timing: Timing = field(default_factory=Timing)
    faults: Faults = field(default_factory=Faults)
    lmcache: LMCacheSimConfig | None = None  # LMCache PD mode (pdsim.lmcache)
    kv_events: KvEventsConfig | None = None  # vLLM --kv-events-config (pdsim.kvevents)
