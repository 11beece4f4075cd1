import re

import pytest

from proxy.control.admin.hosts import HostAllowList, is_loopback, parse_entry


def test_default_is_the_configured_hosts_and_loopback() -> None:
    allowed = HostAllowList.default(["http://10.0.0.7:8100", "http://gpu-3.lan:8200"])
    assert allowed.allows("http://10.0.0.7:9999") and allowed.allows("http://GPU-3.lan.:1")
    assert allowed.allows("http://127.0.0.1:1") and allowed.allows("http://[::1]:1")
    assert allowed.allows("http://localhost:8000")
    assert not allowed.allows("http://10.0.0.8:8100") and not allowed.allows("http://gpu-4.lan")
    assert not allowed.allows("http://169.254.169.254/") and not allowed.allows("not a url")


def test_names_are_never_resolved_and_networks_match_literals_only() -> None:
    allowed = HostAllowList(["10.1.0.0/16", "fd00::/8", "engines.internal"])
    assert allowed.allows("http://10.1.200.3:80") and allowed.allows("http://[fd00::5]:80")
    assert not allowed.allows("http://10.2.0.1:80")
    assert allowed.allows("http://engines.internal:80")
    assert not allowed.allows("http://evil.engines.internal:80")  # exact names only
    assert not allowed.allows("http://localhost:80")  # not listed: loopback is only a default


def test_bad_entries_are_named() -> None:
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33'")):
        parse_entry("10.0.0.0/33")
    with pytest.raises(ValueError, match="empty"):
        parse_entry(" ")


def test_loopback_listen_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("::")
