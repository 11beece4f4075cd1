"""discovery.leader: validated at start-up, and refused where it cannot work (LMCache)."""

from __future__ import annotations

import re

import pytest

from proxy.config import ConfigError, load_config

KUBE = {"source": "kubernetes", "selectors": {"decode": "role=decode"}}


def test_a_leader_section_is_read_with_its_defaults() -> None:
    config = load_config(None, discovery={**KUBE, "leader": {"identity": "r0"}})
    leader = config.discovery.leader
    assert leader is not None and leader.identity == "r0"
    assert (leader.lease_name, leader.lease_duration, leader.renew_interval) == (
        "pdproxy-leader",
        15.0,
        5.0,
    )
    assert leader.effective_delay is None  # renew_interval + 1 (the shared decisions)
    assert load_config(None, discovery=KUBE).discovery.leader is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"discovery": {**KUBE, "leader": {"lease_duration": 2, "renew_interval": 2}}},
            "renew_interval must be shorter than leader.lease_duration",
        ),
        (
            {"discovery": {**KUBE, "leader": {"renew_interval": 2, "effective_delay": 2}}},
            "effective_delay must be longer than leader.renew_interval",
        ),
        (
            {"discovery": {**KUBE, "leader": {"peers": "app=pdproxy,"}}},
            "label selector 'app=pdproxy,' has an empty term",
        ),
        ({"discovery": {"leader": {}}}, "discovery.leader needs source kubernetes"),
        (
            {"discovery": {**KUBE, "leader": {}}, "connector": "lmcache"},
            "prefiller sends its 'transfer done' notification to the one pd_proxy_host:port",
        ),
    ],
)
def test_leader_config_errors_say_why(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, **overrides)
