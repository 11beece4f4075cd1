"""lmcache_soak.occupancy reads the receiver's buffer from LMCache 0.5.0's own log lines."""

from __future__ import annotations

from pathlib import Path

from benchmarks.lmcache_soak import occupancy

# The shapes of the lines LMCache 0.5.0 and its vLLM adapter print (prefixes shortened).
LOG = """\
(EngineCore) LMCache INFO: PDBackendAsync receiver: reservation-based admission control \
initialized with total_chunks=64 (buffer=2147483648 bytes, chunk=33554432 bytes)
(EngineCore) LMCache INFO: Reqid: cmpl-1, Total tokens 2000, Inference Engine computed tokens: 0, \
LMCache hit tokens: 1792, need to load: 1792 (vllm_v1_adapter.py)
(EngineCore) LMCache DEBUG: [PD-ALLOC] req=pdp-lmc-a alloc chunk 1/2, free_chunks=63, data_size=1
(EngineCore) LMCache DEBUG: [PD-ALLOC] req=pdp-lmc-a alloc chunk 2/2, free_chunks=62, data_size=2
(EngineCore) LMCache DEBUG: [PD-FREE] remove key=CacheEngineKey(chunk_hash=1), addr=3, \
ref_count_before=1, data_size=1, free_chunks_before=62
"""


def test_occupancy_counts_allocs_frees_and_what_each_request_loaded(tmp_path: Path) -> None:
    log = tmp_path / "decode-0.log"
    log.write_text(LOG)
    occ = occupancy(log)
    assert occ["total"] == {"chunks": 64, "buffer_bytes": 2 << 30, "chunk_bytes": 32 << 20}
    assert (occ["chunk_allocs"], occ["chunk_frees"]) == (2, 1)
    assert (occ["held_max"], occ["held_last"]) == (2, 1)  # one chunk never loaded
    assert occ["lookups"] == {"total 2000 -> hit 1792, load 1792": 1}
