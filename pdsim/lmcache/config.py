"""Options of the LMCache PD mode (names follow LMCache's YAML keys) and its test switches.

Buffer sizes are LMCache's ``pd_buffer_size`` in bytes, per TP rank, cut into pages of one chunk
each (``chunk_size`` tokens of this rank's share of the KV: 32 MiB for the 8B shape at TP 1), so
the launcher's decoder buffer of 2 GiB holds 64 chunks and its prefiller staging buffer of 1 GiB
holds 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pdsim.shape import KV_BYTES_PER_TOKEN

LMCacheRole = Literal["sender", "receiver"]
DEFAULT_CHUNK_SIZE = 256  # LMCache chunk_size
GiB = 1024**3
# pd_buffer_size as the launcher's templates set it (configs/lmcache-*.yaml)
DEFAULT_BUFFER_SIZE = {"receiver": 2 * GiB, "sender": 1 * GiB}
DEFAULT_SKIP_LAST_N_TOKENS = 1  # the launcher's decoder kv_connector_extra_config


class Switches(BaseModel):
    """Test switches, as posted to `POST /_sim/lmcache` (replaces the whole set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drop_notifications: bool = Field(False, description="never send ProxyNotif")
    drop_next: int = Field(0, ge=0, description="drop the notifications of the next N requests")
    drop_ranks: tuple[int, ...] = Field((), description="TP ranks that never notify")
    delay_notifications: float = Field(0.0, ge=0, description="seconds before each notification")


@dataclass(frozen=True)
class LMCacheSimConfig:
    """One instance's LMCache PD side: sender (prefiller) or receiver (decoder)."""

    role: LMCacheRole
    tp: int = 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    proxy_host: str = "127.0.0.1"  # sender: pd_proxy_host
    proxy_port: int = 7500  # sender: pd_proxy_port
    peer_host: str = "127.0.0.1"  # receiver: pd_peer_host (where it listens)
    init_ports: tuple[int, ...] = (7300,)  # receiver: pd_peer_init_port, one per TP rank
    alloc_ports: tuple[int, ...] = (7400,)  # receiver: pd_peer_alloc_port, one per TP rank
    save_unfull_chunk: bool = True  # sender: False = full chunks only (LMCache 0.3.12-0.4.1)
    # pd_buffer_size per TP rank: the receiver's receive buffer, the sender's staging buffer;
    # None = the launcher's (DEFAULT_BUFFER_SIZE)
    buffer_size: int | None = None
    # receiver: vLLM's kv_connector_extra_config.skip_last_n_tokens (looks up all but these)
    skip_last_n_tokens: int = DEFAULT_SKIP_LAST_N_TOKENS
    allocation_timeout: float = math.inf  # pd_allocation_timeout_sec (LMCache's default: inf)
    switches: Switches = field(default_factory=Switches)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.chunk_size < 1:
            raise ValueError("--tp and --lmcache-chunk-size must be at least 1")
        if self.skip_last_n_tokens < 0 or self.allocation_timeout <= 0:
            raise ValueError(
                "--lmcache-skip-last-n-tokens must be at least 0 and "
                "--lmcache-allocation-timeout above 0"
            )
        if self.buffer_chunks < 1:
            raise ValueError(
                f"a buffer of {self.buffer_bytes} bytes holds no chunk of {self.chunk_bytes} bytes"
            )
        if self.role == "receiver" and not (
            len(self.init_ports) == len(self.alloc_ports) == self.tp
        ):
            raise ValueError(
                f"a receiver with --tp {self.tp} needs {self.tp} init and {self.tp} alloc ports"
            )

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one chunk on one TP rank (its share of the heads)."""
        return self.chunk_size * KV_BYTES_PER_TOKEN // self.tp

    @property
    def buffer_bytes(self) -> int:
        return DEFAULT_BUFFER_SIZE[self.role] if self.buffer_size is None else self.buffer_size

    @property
    def buffer_chunks(self) -> int:
        """Pages of the buffer: LMCache rounds pd_buffer_size down to whole chunks."""
        return self.buffer_bytes // self.chunk_bytes
