"""One rig for the behaviour suite over every KV-transfer connector: simulated engines and a
proxy, real processes on real sockets, built the same way for NIXL and for LMCache.

What differs between the connectors is in `Wire`, one row per connector: which counter of the
decoder shows that the prompt's KV arrived, what each leg's body carries, and the behaviours that
differ for a reason of the protocol. The tests read the row; they are written once.

NIXL engines are the session's shared sims (tests/conftest.py `sims`), since a NIXL prefiller
serves any proxy. An LMCache prefiller sends its notifications to the one port it was started
with, so each topology starts its own prefillers; the decoders (LMCache receivers) are shared.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import MODEL, Proxy, Sim, free_port, spawn_serving, start_sim

DEADLINE = 1.5  # lmcache.notify_timeout of every LMCache topology, seconds
SPEED = ("--speed-factor", "0.05")
RECOMPUTED = "pdsim:recomputed_requests_total"
NOTIFICATIONS = "pdproxy_lmcache_notifications_total"
Body = dict[str, Any]


@dataclass(frozen=True)
class Receiver:
    """An LMCache decoder's receiver ports, one per TP rank."""

    init_ports: list[int]
    alloc_ports: list[int]


@dataclass(frozen=True)
class Wire:
    """One connector's row: what the simulator shows of its transfer, and the few behaviours
    that differ from the other connector's for a reason of the protocol."""

    name: str
    # decoder counter: requests whose prompt KV came from a prefiller (pulled, or pushed and hit)
    kv_in: str
    # the prefill leg's `kv_transfer_params`, exactly, given the topology and the leg's record
    prefill_params: Callable[[Topology, Body], Body]
    # checks the decode leg's `kv_transfer_params` (None when it carried none) against the
    # prefill leg's record
    check_decode_params: Callable[[Topology, Body, Body | None], None]
    # the client fields the prefill leg leaves out (it must not stream nor stop before its token)
    prefill_drops: frozenset[str]
    # what the prefill leg adds besides max_tokens 1, stream false, n 1 and kv_transfer_params
    prefill_adds: Body
    # the prefiller keeps the prompt's blocks until the decoder took them (NIXL: until pulled;
    # LMCache pushed them while prefilling, so nothing waits on the prefiller)
    prefiller_holds_kv: bool
    # the decoder's record `kv` for a prompt it prefills itself: a NIXL decoder without params
    # computes it ("local"); an LMCache decoder always looks its store up, and misses
    local_kv: str
    # `pdproxy_kv_recompute_total` reason for a prefiller that does no KV transfer: vLLM NIXL
    # answers kv_transfer_params null; the proxy finds no LMCache first_tok
    no_transfer_reason: str
    # the prefiller tells the proxy each transfer is done (LMCache's ZMQ notification); NIXL's
    # decoder pulls without a word to the proxy
    notifies: bool
    # a decode leg retried on another decoder: a NIXL decoder pulls the same KV from the
    # prefiller; LMCache pushed it to the first decoder, so the second computes the prompt
    retried_decoder_kv: str


def nixl_prefill_params(topo: Topology, record: Body) -> Body:
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


def nixl_decode_params(topo: Topology, prefill: Body, params: Body | None) -> None:
    """The prefiller's answer, verbatim: its blocks for the prompt and where to pull them."""
    [prefiller] = [p for p in topo.prefill if prefill in p.generation_records()]
    assert params is not None
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] and params["remote_block_ids"][0]
    assert params["remote_engine_id"] == prefiller.control("GET", "info")["engine_id"]
    assert params["remote_request_id"] == prefill["engine_request_id"]
    assert (params["remote_host"], params["remote_port"]) == (
        "127.0.0.1",
        prefiller.side_channel_port,
    )
    # nothing added, dropped or changed: the same leg sent again gets the same answer but for
    # the blocks and the engine's request id
    again = direct(prefiller, prefill["path"], prefill["body"])["kv_transfer_params"]
    assert set(params) == set(again)
    varying = ("remote_block_ids", "remote_request_id")
    assert {k: v for k, v in params.items() if k not in varying} == {
        k: v for k, v in again.items() if k not in varying
    }


def lmcache_decode_params(topo: Topology, prefill: Body, params: Body | None) -> None:
    """None: the decoder finds the pushed KV by the prompt's chunks, in the client's own body."""
    assert params is None


def lmcache_prefill_params(topo: Topology, record: Body) -> Body:
    """`disagg_spec` names a fresh transfer id (with several serving processes, the one that
    made it: `pdp-lmc-w2-...`) and the decoder's receiver (the rig's decoders are TP 1: one
    port each)."""
    req_id = record["body"]["kv_transfer_params"]["disagg_spec"]["req_id"]
    assert re.fullmatch(r"pdp-lmc-(w[0-9]+-)?[0-9a-f]{32}", req_id), req_id
    [receiver] = topo.receivers
    return {
        "ret_first_tok": True,
        "disagg_spec": {
            "req_id": req_id,
            "receiver_host": "127.0.0.1",
            "receiver_init_port": receiver.init_ports,
            "receiver_alloc_port": receiver.alloc_ports,
        },
    }


WIRES = {
    "nixl": Wire(
        name="nixl",
        kv_in="vllm:nixl_xfer_time_seconds_count",
        prefill_params=nixl_prefill_params,
        check_decode_params=nixl_decode_params,
        prefill_drops=frozenset(
            {"stream_options", "stop", "stop_token_ids", "min_tokens", "min_completion_tokens"}
        ),
        prefill_adds={"ignore_eos": True},
        prefiller_holds_kv=True,
        local_kv="local",
        no_transfer_reason="null_params",
        notifies=False,
        retried_decoder_kv="pulled",
    ),
    "lmcache": Wire(
        name="lmcache",
        kv_in="pdsim:lmcache_hit_requests_total",
        prefill_params=lmcache_prefill_params,
        check_decode_params=lmcache_decode_params,
        prefill_drops=frozenset({"stream_options", "min_tokens", "min_completion_tokens"}),
        prefill_adds={},
        prefiller_holds_kv=False,
        local_kv="recomputed",
        no_transfer_reason="missing_params",
        notifies=True,
        retried_decoder_kv="recomputed",
    ),
}
CONNECTORS = tuple(WIRES)


@dataclass
class Topology:
    """Prefillers, decoders and the proxy in front of them, for one connector."""

    wire: Wire
    proxy: Proxy
    notify_port: int = 0
    receivers: list[Receiver] = field(default_factory=list)
    owned: list[Sim] = field(default_factory=list)  # stopped with the topology

    @property
    def prefill(self) -> list[Sim]:
        return self.proxy.prefill

    @property
    def decode(self) -> list[Sim]:
        return self.proxy.decode

    @property
    def url(self) -> str:
        return self.proxy.url

    def kv_in(self, decoder: Sim) -> float:
        """Requests of `decoder` whose prompt KV came from a prefiller, since the last reset."""
        return decoder.metric(self.wire.kv_in)

    def transfers(self) -> float:
        """KV transfers since the last reset: NIXL pulls by the decoders, LMCache pushes by the
        prefillers (an LMCache decoder also finds what was pushed for earlier requests, so its
        hits do not say whether this request moved anything)."""
        if self.wire.notifies:
            return self.sent()
        return sum(self.kv_in(d) for d in self.decode)

    def notified(self) -> float:
        """Transfers the prefillers reported to the proxy, and the proxy matched to a request
        (LMCache; since the proxy started)."""
        assert self.wire.notifies
        return self.proxy.metrics().total(NOTIFICATIONS, result="matched")

    def sent(self) -> float:
        """Notifications the prefillers sent, since the last reset (LMCache)."""
        assert self.wire.notifies
        return sum(p.metric("pdsim:lmcache_notifications_sent_total") for p in self.prefill)

    def reset(self) -> Topology:
        for sim in self.prefill + self.decode:
            sim.reset()
            if self.wire.name == "lmcache":
                sim.control("POST", "lmcache", {})
        return self

    def stop(self) -> None:
        self.proxy.stop()
        for sim in self.owned:
            sim.stop()


class Engines:
    """The simulated engines of one connector, started when first asked for and shared by its
    topologies (but LMCache prefillers, which belong to one proxy's notification port)."""

    def __init__(self, logs: Path, wire: Wire, nixl_sims: dict[str, Sim] | None = None) -> None:
        self.logs = logs
        self.wire = wire
        self._nixl = nixl_sims or {}
        self._decoders: list[tuple[Sim, Receiver | None]] = []
        self._started: list[Sim] = []

    def decoders(self, n: int) -> list[tuple[Sim, Receiver | None]]:
        """The first `n` shared decoders."""
        if self.wire.name == "nixl":
            return [(self._nixl[f"d{i}"], None) for i in range(n)]
        while len(self._decoders) < n:
            i = len(self._decoders)
            self._decoders.append(self.decoder(f"lmc-d{i}", LMCacheSetup()))
            self._started.append(self._decoders[-1][0])
        return self._decoders[:n]

    def decoder(self, name: str, setup: LMCacheSetup) -> tuple[Sim, Receiver]:
        """An LMCache receiver of its own (the caller stops it)."""
        rx = Receiver(
            [free_port() for _ in range(setup.tp)], [free_port() for _ in range(setup.tp)]
        )
        args = lmcache_args("receiver", rx, setup, *setup.receiver_args)
        return start_sim(self.logs, name, *args, role="decode"), rx

    def prefiller(self, name: str, notify_port: int, setup: LMCacheSetup) -> Sim:
        """A prefiller of its own (the caller stops it)."""
        if self.wire.name == "nixl":
            return start_sim(self.logs, name, *SPEED, role="prefill")
        args = lmcache_args("sender", None, setup, "--pd-proxy-port", str(notify_port))
        return start_sim(self.logs, name, *args, *setup.sender_args, role="prefill")

    def shared_prefillers(self, n: int) -> list[Sim] | None:
        return [self._nixl[f"p{i}"] for i in range(n)] if self.wire.name == "nixl" else None

    def stop(self) -> None:
        for sim in self._started:
            sim.stop()


def lmcache_args(role: str, rx: Receiver | None, setup: LMCacheSetup, *extra: str) -> list[str]:
    args = [*SPEED, "--tp", str(setup.tp), "--lmcache-chunk-size", str(setup.chunk_size)]
    args += ["--lmcache-role", role, *extra]
    if rx is not None:
        args += ["--pd-peer-init-port", ",".join(map(str, rx.init_ports))]
        args += ["--pd-peer-alloc-port", ",".join(map(str, rx.alloc_ports))]
    return args


@dataclass(frozen=True)
class LMCacheSetup:
    """How an LMCache topology's engines and proxy are configured; a topology with other than
    the defaults starts decoders of its own (sender and receiver must agree on the chunks)."""

    tp: int = 1
    chunk_size: int = 2
    sender_args: tuple[str, ...] = ()
    receiver_args: tuple[str, ...] = ()
    proxy_options: str = ""  # more keys of the proxy's `lmcache:` mapping, ", key: value"


def start_topology(
    engines: Engines,
    name: str,
    prefillers: int = 1,
    decoders: int = 1,
    config: str = "",
    own_prefillers: int = 0,
    lmcache: LMCacheSetup | None = None,
    workers: int = 1,
) -> Topology:
    """A proxy (`config` appended to its YAML; `workers` serving processes) over `decoders`
    shared decoders and `prefillers` prefillers, the first `own_prefillers` of which are started
    for it alone (as every LMCache prefiller is)."""
    wire = engines.wire
    setup = lmcache or LMCacheSetup()
    notify = free_port() if wire.name == "lmcache" else 0
    owned: list[Sim] = []
    try:
        shared = engines.shared_prefillers(prefillers - own_prefillers)
        if shared is None:
            own_prefillers, shared = prefillers, []
        for i in range(own_prefillers):
            owned.append(engines.prefiller(f"{wire.name}-{name}-p{i}", notify, setup))
        if setup == LMCacheSetup():
            decode = engines.decoders(decoders)
        else:
            decode = [engines.decoder(f"{wire.name}-{name}-d{i}", setup) for i in range(decoders)]
            owned += [sim for sim, _ in decode]
        proxy = start_proxy_over(engines, name, owned[:own_prefillers] + shared, decode, config,
                                 notify, setup, workers)  # fmt: skip
    except BaseException:
        for sim in owned:
            sim.stop()
        raise
    receivers = [rx for _, rx in decode if rx is not None]
    return Topology(wire, proxy, notify, receivers, owned)


def start_proxy_over(
    engines: Engines,
    name: str,
    prefill: list[Sim],
    decode: list[tuple[Sim, Receiver | None]],
    config: str = "",
    notify: int = 0,
    setup: LMCacheSetup | None = None,
    workers: int = 1,
) -> Proxy:
    """A proxy of `engines`' connector over these engines (`notify`: the LMCache notification
    port its prefillers send to), with `workers` serving processes."""
    wire = engines.wire
    lines = [f"connector: {wire.name}"]
    if wire.name == "lmcache":
        options = (setup or LMCacheSetup()).proxy_options
        lines.append(f"lmcache: {{notify_port: {notify}, notify_timeout: {DEADLINE}{options}}}")
    lines.append("prefill: [" + ", ".join(s.url for s in prefill) + "]")
    lines.append("decode:")
    for sim, rx in decode:
        if rx is None:
            lines.append(f"  - {sim.url}")
        else:
            lines.append(
                f"  - {{url: '{sim.url}', lmcache: {{init_ports: {rx.init_ports}, "
                f"alloc_ports: {rx.alloc_ports}}}}}"
            )
    path = engines.logs / f"{wire.name}-{name}.yaml"
    path.write_text("\n".join(lines) + "\n" + config)
    proxy = start_proxy_config(engines.logs, path, f"{wire.name}-{name}", workers)
    proxy.prefill, proxy.decode = prefill, [sim for sim, _ in decode]
    return proxy


def start_proxy_config(logs: Path, config: Path, name: str, workers: int = 1) -> Proxy:
    """`serve --config config` (`--workers N` for more than one), ready once /metrics answers
    and every serving process is connected; a test whose config the proxy refuses to run in
    several processes is skipped, quoting the refusal."""
    port = free_port()
    cmd = ["serve", "--port", str(port), "--stats-interval", "0", "--config", str(config)]
    return spawn_serving(cmd, port, logs / f"{name}-w{workers}-proxy.log", workers)


# -- requests and answers -------------------------------------------------------------------


def post(topo: Topology, body: Body, path: str = "/v1/completions", **kw: Any) -> httpx.Response:
    return httpx.post(topo.url + path, json=body, timeout=kw.pop("timeout", 30), **kw)


def direct(sim: Sim, path: str, body: Body) -> Body:
    """The same request served by one engine alone, no disaggregation."""
    data: Body = httpx.post(sim.url + path, json=body, timeout=30).json()
    return data


def openai_error(resp: httpx.Response) -> Body:
    """The error of an OpenAI-shaped error answer (JSON, the four keys, code = status)."""
    assert resp.headers["content-type"] == "application/json"
    error: Body = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == resp.status_code
    return error


def unique(prompt: str) -> str:
    """`prompt` made new from its first token: an LMCache decoder keeps what was pushed to it
    across tests, and serves any leading chunks of a prompt it holds."""
    return f"{uuid.uuid4().hex[:8]} {prompt}"


__all__ = ["MODEL", "RECOMPUTED", "WIRES", "Topology", "Wire", "start_topology"]
