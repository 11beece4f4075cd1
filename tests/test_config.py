import re
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    return path


def test_yaml_with_url_strings_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "prefill: [http://a:1]\ndecode: ['http://b:2/']\n"))
    assert [w.url for w in cfg.prefill] == ["http://a:1"]
    assert [w.url for w in cfg.decode] == ["http://b:2"]
    assert cfg.port == 9100 and cfg.connector == "nixl"
    assert cfg.prefill_policy == cfg.decode_policy == "least_loaded"
    assert cfg.stats.interval == 5.0


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, "prefill: [http://a:1]\ndecode: [http://b:2]\nport: 9000\nstats: {window: 50}\n"
    )
    cfg = load_config(path, port=9200, decode=["http://c:3"], stats={"interval": 0})
    assert cfg.port == 9200
    assert [w.url for w in cfg.decode] == ["http://c:3"]
    assert cfg.stats.interval == 0 and cfg.stats.window == 50


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "prefill: [http://a:1]\ndecode: [http://b:2]\ntimeouts: {conect: 3}\n")
    with pytest.raises(ConfigError, match=r"timeouts\.conect: unknown key 'conect'"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decode": ["http://b:2"]}, "no prefill workers"),
        ({"prefill": ["ftp://a"], "decode": ["http://b:2"]}, "is not an http"),
        ({"prefill": ["http://a:1/v1"], "decode": ["http://b:2"]}, "without a path"),
        ({"prefill": ["http://a:1", "http://a:1"], "decode": ["http://b:2"]}, "more than once"),
        ({"prefill": ["http://a:1"], "decode": ["http://b:2"], "port": 70000}, "port"),
        ({"prefill": ["http://a:1"], "decode": ["http://b:2"], "prefill_policy": "x"}, "policy"),
    ],
)
def test_invalid_values_explain_themselves(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, **overrides)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize("name", ["proxy-1p1d.yaml", "proxy-xpyd.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / name)
    assert cfg.prefill and cfg.decode


def test_a_pool_alone_or_beside_dedicated_workers(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "pool: [http://a:1, 'http://b:2/']\n"))
    assert [w.url for w in cfg.pool] == ["http://a:1", "http://b:2"]
    assert cfg.prefill == () and cfg.decode == ()
    assert cfg.pool_mode == "adaptive" and cfg.pool_planner.min_prefill_tokens == 512
    cfg = load_config(None, pool=["http://a:1"], decode=["http://c:3"], pool_mode="colocated")
    assert cfg.pool_mode == "colocated" and [w.url for w in cfg.decode] == ["http://c:3"]
    cfg = load_config(None, pool=["http://a:1"], prefill=["http://p:1"])
    assert [w.url for w in cfg.prefill] == ["http://p:1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prefill": ["http://p:1"]}, "no decode workers: give --decode URL or a 'decode:' list"),
        ({"pool": ["http://a:1", "http://a:1"]}, "pool lists http://a:1 more than once"),
        (
            {"pool": ["http://a:1"], "decode": ["http://a:1"]},
            "http://a:1 is in the pool and a prefill or decode list",
        ),
        ({"pool": ["http://a:1"], "connector": "lmcache"}, "a pool needs connector nixl"),
        (
            {"pool": ["http://a:1"], "prefill": ["http://p:1"], "pool_mode": "colocated"},
            "pool_mode colocated serves every request whole",
        ),
        (
            {"pool": ["http://a:1"], "conditional_disagg": {"enabled": True}},
            "turn conditional_disagg off",
        ),
        ({"pool": ["http://a:1"], "pool_mode": "mixed"}, "pool_mode: Input should be"),
        (
            {"pool": ["http://a:1"], "pool_planner": {"decode_prefill_share": 0}},
            "pool_planner.decode_prefill_share: Input should be greater than 0",
        ),
        (
            {"pool": ["http://a:1"], "pool_planner": {"windw": 3}},
            "pool_planner.windw: unknown key 'windw'",
        ),
    ],
)
def test_pool_config_errors_say_what_to_change(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, **overrides)


def test_yaml_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "prefill: [http://a:1]\ndecode: [http://b:2\nport: 9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f'in "{path}", line' in message and "<unicode string>" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {
                "prefill": ["http://a:1"],
                "decode": ["http://127.0.0.1:8200", "http://localhost:8200"],
            },
            "decode lists http://127.0.0.1:8200 and http://localhost:8200, which are one engine "
            "(both reach this machine's port 8200)",
        ),
        (
            {"prefill": ["http://a:1"], "decode": ["http://b:80", "HTTP://B."]},
            "decode lists http://b:80 and HTTP://B., which are one engine (the same address)",
        ),
        (
            {"pool": ["http://localhost:8300"], "decode": ["http://[::1]:8300"]},
            "http://localhost:8300 is in the pool and http://[::1]:8300 in the decode list",
        ),
    ],
)
def test_one_engine_listed_twice_is_refused_naming_both(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, **overrides)
    # a prefiller may be a decoder too (an engine with kv_role kv_both)
    load_config(None, prefill=["http://127.0.0.1:8200"], decode=["http://localhost:8200"])
