"""The running parts of one simulated instance, as its HTTP handlers share them, and the
version it reports."""

from __future__ import annotations

from dataclasses import dataclass

from pdsim.config import SimConfig
from pdsim.engine import Engine
from pdsim.faults import FaultState
from pdsim.lmcache.mode import LMCacheMode
from pdsim.metrics import Metrics
from pdsim.nixl import NixlConsumer
from pdsim.records import Records
from pdsim.tokenizer import SimTokenizer

SIM_VERSION = "0.32.0+pdsim"


@dataclass
class Instance:
    """Built by ``SimServer.start``; the route classes each hold one."""

    config: SimConfig
    engine: Engine
    tokenizer: SimTokenizer
    metrics: Metrics
    records: Records
    faults: FaultState
    consumer: NixlConsumer
    lmcache: LMCacheMode | None
    system_fingerprint: str
