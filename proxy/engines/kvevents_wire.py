"""vLLM's KV-cache events on the wire (`vllm/distributed/kv_events.py`, vLLM 0.32).

An engine started with `--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", "endpoint": ..., "replay_endpoint": ...}'` publishes, on a ZMQ PUB socket (bound when
the endpoint has a wildcard, `tcp://*:5557`; otherwise connected to a subscriber bound there,
which lets an engine on a loopback host publish without listening anywhere), one message
of three frames per scheduler step that changed its prefix cache: the topic (the config's
`topic`, empty by default), the batch's sequence number (8 bytes, big-endian, from 0 at the
engine's start) and the batch, msgpack-encoded by msgspec. The batch is an array
`[ts, events, data_parallel_rank]`; each event a map tagged under "type":

    BlockStored       block_hashes, parent_block_hash (None for a prompt's first block),
                      token_ids (block_size tokens per hash, in order), block_size, lora_id,
                      medium ("GPU" for the engine's own cache), lora_name, and optional
                      extra_keys (one entry per block: LoRA, multimodal, cache_salt keys),
                      group_idx (the KV-cache group), ...
    BlockRemoved      block_hashes, medium, group_idx
    AllBlocksCleared  (the prefix cache was reset)

Block hashes are bytes (sha256 by default) or, with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES,
64-bit ints. The engine keeps its last `buffer_steps` batches for replay on a ROUTER socket: a
DEALER sends `["", start_seq (8 bytes, big-endian)]` and gets back `["", topic, seq, batch]`
for every kept batch from `start_seq` on, then `["", "", -1 (8 bytes, signed), ""]`. vLLM
0.24 answers without the topic frame: `["", seq, batch]`, then `["", -1, ""]`
(`replayed_frame` reads both).

The proxy decodes (its subscriber, proxy.control.kvevents) and the simulator encodes
(pdsim.kvevents) with these declarations; fields the proxy does not use are left out of them,
and msgspec skips them when decoding.
"""

from __future__ import annotations

from typing import Any

import msgspec

BlockHash = bytes | int
END_SEQ = (-1).to_bytes(8, "big", signed=True)
REPLAY_TIMEOUT = 5.0  # seconds a subscriber waits for the replay's end marker


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[BlockHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


_DECODER = msgspec.msgpack.Decoder(EventBatch)
_ENCODER = msgspec.msgpack.Encoder()


class WireError(ValueError):
    """A message that is not a KV-event batch."""


def decode_batch(payload: bytes) -> EventBatch:
    try:
        return _DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"not a KV-event batch: {exc}") from None


def encode_batch(batch: EventBatch) -> bytes:
    return _ENCODER.encode(batch)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def replayed_frame(frames: list[bytes]) -> tuple[int, bytes] | None:
    """One answer of the replay socket as (seq, batch); None for the end marker. vLLM 0.32
    sends ["", topic, seq, batch], vLLM 0.24 ["", seq, batch]."""
    if len(frames) == 4:
        seq, payload = frames[2], frames[3]
    elif len(frames) == 3:
        seq, payload = frames[1], frames[2]
    else:
        raise WireError(f"a replayed batch in {len(frames)} frames, not 3 or 4")
    if seq == END_SEQ:
        return None
    return seq_of(seq), payload


def seq_of(frame: bytes) -> int:
    if len(frame) != 8:
        raise WireError(f"a sequence number is 8 bytes, not {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)
