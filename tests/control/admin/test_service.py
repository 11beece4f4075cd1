"""The admin service without sockets: who may use it, and LMCache receivers for newcomers."""

from __future__ import annotations

import pytest

from proxy.auth import Authenticator
from proxy.control.admin.config import AdminConfig
from proxy.control.admin.probes import Prober
from proxy.control.admin.service import AddWorker, Admin
from proxy.control.registry import WorkerRegistry
from proxy.engines.client import EngineClient
from proxy.engines.connectors.lmcache_config import LMCacheReceiverConfig, Receiver, receiver_for
from proxy.engines.connectors.nixl import NixlConnector
from proxy.errors import BadRequest, Forbidden, Unauthorized


def admin(host: str, admin_keys: tuple[bytes, ...] = (), **config: object) -> Admin:
    registry = WorkerRegistry.empty()
    registry.add("decode", "http://10.0.0.5:8200")
    engine = EngineClient(1.0)
    prober = Prober(engine, NixlConnector(engine, 1.0), registry, 1.0, 8)
    return Admin(
        AdminConfig.model_validate(config),
        registry,
        prober,
        Authenticator((), admin_keys),
        host,
        NixlConnector,
        1.0,
        lambda tasks, why: None,
    )


def test_open_on_loopback_refused_elsewhere_without_keys() -> None:
    admin("127.0.0.1").guard([])
    with pytest.raises(Forbidden, match=r"listens on 0\.0\.0\.0 without admin keys"):
        admin("0.0.0.0").guard([])
    admin("0.0.0.0", allow_unauthenticated=True).guard([])
    keyed = admin("0.0.0.0", (b"k",))
    keyed.guard([(b"authorization", b"Bearer k")])
    with pytest.raises(Unauthorized):
        keyed.guard([])


def test_the_default_allow_list_holds_the_workers_hosts() -> None:
    allowed = admin("127.0.0.1").allowed
    assert allowed.allows("http://10.0.0.5:9000") and allowed.allows("http://127.0.0.1:1")
    assert not allowed.allows("http://10.0.0.6:8200")


def test_add_bodies_are_checked_by_field() -> None:
    with pytest.raises(BadRequest, match="role") as info:
        AddWorker.parse({"url": "http://a:1", "role": "both"})
    assert info.value.param == "role"
    with pytest.raises(BadRequest, match="without a path"):
        AddWorker.parse({"url": "http://a:1/v1", "role": "decode"})
    assert AddWorker.parse({"url": "http://a:1/", "role": "decode"}).url == "http://a:1"


def test_a_joining_decoders_lmcache_receiver() -> None:
    taken = [Receiver("h", (7300,), (7400,)), Receiver("h", (7302,), (7402,))]
    assert receiver_for("http://h:8200", None, taken) == Receiver("h", (7301,), (7401,))
    assert receiver_for("http://other:8200", None, taken) == Receiver("other", (7300,), (7400,))
    given = LMCacheReceiverConfig(init_ports=(7600, 7601), alloc_ports=(7700, 7701))
    assert receiver_for("http://h:1", given, taken) == Receiver("h", (7600, 7601), (7700, 7701))
    with pytest.raises(ValueError, match="7300"):
        receiver_for("http://h:1", LMCacheReceiverConfig(init_ports=(7300,), alloc_ports=(7500,)),
                     taken)  # fmt: skip
