"""Options of the LMCache PD mode (names follow LMCache's YAML keys) and its test switches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LMCacheRole = Literal["sender", "receiver"]
DEFAULT_CHUNK_SIZE = 256  # LMCache chunk_size


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
    switches: Switches = field(default_factory=Switches)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.chunk_size < 1:
            raise ValueError("--tp and --lmcache-chunk-size must be at least 1")
        if self.role == "receiver" and not (
            len(self.init_ports) == len(self.alloc_ports) == self.tp
        ):
            raise ValueError(
                f"a receiver with --tp {self.tp} needs {self.tp} init and {self.tp} alloc ports"
            )
