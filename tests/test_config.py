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
