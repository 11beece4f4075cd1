"""launchers/disagg.sh --dry-run: the plan it prints is complete and correct (no engines)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.config.sections import KvEventsConfig
from tests.launchers.plan import LAUNCHER, Plan, dry_run_plan

REPO = LAUNCHER.parents[1]
PY = "/opt/vllm/bin/python"


def dry_run(*args: str, tmp_path: Path, env: dict[str, str] | None = None) -> Plan:
    return dry_run_plan(["--python", PY, "--log-dir", str(tmp_path), *args], env)


def run_launcher(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(LAUNCHER), *args], capture_output=True, text=True, timeout=120
    )


def test_1p1d_nixl_cuda(tmp_path: Path) -> None:
    plan = dry_run("--model", "org/model", "--proxy-cmd", "pdproxy", tmp_path=tmp_path)
    assert plan.order == ["prefill-0", "decode-0", "proxy"]
    prefill, decode = plan.commands["prefill-0"], plan.commands["decode-0"]
    for cmd, port in ((prefill, "7100"), (decode, "7200")):
        assert cmd.argv[:3] == [PY, "-m", "vllm.entrypoints.openai.api_server"]
        assert cmd.flag("--model") == "org/model"
        assert cmd.flag("--port") == port
        assert cmd.flag("--host") == "127.0.0.1"
        assert cmd.env["PYTHONHASHSEED"] == "0"
        assert cmd.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
        assert "--enforce-eager" not in cmd.argv
        assert "VLLM_CPU_OMP_THREADS_BIND" not in cmd.env
    assert prefill.kv_config == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_buffer_device": "cuda",
        "kv_connector_extra_config": {"enable_cross_layers_blocks": True},
    }
    assert decode.kv_config == dict(prefill.kv_config, kv_role="kv_consumer")
    # cross-layer blocks exist on vLLM's V1 model runner only
    assert prefill.env["VLLM_USE_V2_MODEL_RUNNER"] == decode.env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert prefill.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert decode.env["CUDA_VISIBLE_DEVICES"] == "1"
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5700"
    proxy = plan.commands["proxy"]
    assert proxy.argv[:2] == ["pdproxy", "serve"]
    assert proxy.flags("--prefill") == ["http://127.0.0.1:7100"]
    assert proxy.flags("--decode") == ["http://127.0.0.1:7200"]
    assert proxy.flag("--port") == "9100"
    assert proxy.flag("--connector") == "nixl"
    assert not plan.files


def test_2p2d_nixl_tp_and_gpus(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "m", "--prefill", "2", "--decode", "2", "--prefill-tp", "2",
        "--decode-tp", "2", "--prefill-gpus", "4,5,6,7", "--decode-gpus", "0,1,2,3",
        "--proxy-port", "9200", tmp_path=tmp_path,
    )  # fmt: skip
    prefills, decodes = plan.engines("prefill"), plan.engines("decode")
    assert [c.flag("--port") for c in prefills] == ["7100", "7101"]
    assert [c.flag("--port") for c in decodes] == ["7200", "7201"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in prefills] == ["4,5", "6,7"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in decodes] == ["0,1", "2,3"]
    assert all(c.flag("--tensor-parallel-size") == "2" for c in prefills + decodes)
    assert {c.kv_config["kv_role"] for c in prefills} == {"kv_producer"}
    assert {c.kv_config["kv_role"] for c in decodes} == {"kv_consumer"}
    side = [c.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for c in prefills + decodes]
    assert len(set(side)) == 4
    http = {c.flag("--port") for c in prefills + decodes}
    assert not http & set(side)
    proxy = plan.commands["proxy"]
    assert proxy.flags("--prefill") == ["http://127.0.0.1:7100", "http://127.0.0.1:7101"]
    assert proxy.flags("--decode") == ["http://127.0.0.1:7200", "http://127.0.0.1:7201"]
    assert proxy.flag("--port") == "9200"


def test_default_gpus_follow_prefillers(tmp_path: Path) -> None:
    plan = dry_run("--model", "m", "--prefill", "2", "--decode", "2", tmp_path=tmp_path)
    gpus = [c.env["CUDA_VISIBLE_DEVICES"] for c in plan.engines("prefill") + plan.engines("decode")]
    assert gpus == ["0", "1", "2", "3"]


def test_cpu_binds_each_instance_to_its_core(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "/models/tiny", "--device", "cpu", "--cpus", "2",
        "--", "--served-model-name", "tiny", "--max-model-len", "1024", tmp_path=tmp_path,
    )  # fmt: skip
    prefill, decode = plan.commands["prefill-0"], plan.commands["decode-0"]
    assert prefill.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    for cmd in (prefill, decode):
        assert "CUDA_VISIBLE_DEVICES" not in cmd.env
        assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
        assert cmd.flag("--dtype") == "float32"
        assert "--enforce-eager" in cmd.argv
        assert cmd.kv_config["kv_buffer_device"] == "cpu"
        assert cmd.argv[-4:] == ["--served-model-name", "tiny", "--max-model-len", "1024"]


def test_1p1d_lmcache_starts_proxy_first(tmp_path: Path) -> None:
    plan = dry_run("--model", "m", "--connector", "lmcache", tmp_path=tmp_path)
    assert plan.order == ["proxy", "prefill-0", "decode-0"]
    prefill, decode = plan.commands["prefill-0"], plan.commands["decode-0"]
    assert prefill.kv_config == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {
            "discard_partial_chunks": False,
            "lmcache_rpc_port": "producer1",
        },
    }
    assert decode.kv_config == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_consumer",
        "kv_connector_extra_config": {
            "discard_partial_chunks": False,
            "lmcache_rpc_port": "consumer1",
            "skip_last_n_tokens": 0,
        },
    }
    for cmd in (prefill, decode):
        assert cmd.env["PYTHONHASHSEED"] == "0"
        assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in cmd.env
        assert cmd.env["LMCACHE_CONFIG_FILE"] in plan.files
    sender = yaml.safe_load(plan.files[prefill.env["LMCACHE_CONFIG_FILE"]])
    receiver = yaml.safe_load(plan.files[decode.env["LMCACHE_CONFIG_FILE"]])
    assert sender["enable_pd"] is True and receiver["enable_pd"] is True
    assert sender["pd_role"] == "sender" and receiver["pd_role"] == "receiver"
    assert sender["transfer_channel"] == receiver["transfer_channel"] == "nixl"
    assert (sender["pd_proxy_host"], sender["pd_proxy_port"]) == ("127.0.0.1", 7500)
    assert receiver["pd_peer_host"] == "127.0.0.1"
    assert receiver["pd_peer_init_port"] == [7300]
    assert receiver["pd_peer_alloc_port"] == [7400]
    assert receiver["nixl_backends"] == ["UCX"]
    assert sender["pd_buffer_device"] == receiver["pd_buffer_device"] == "cuda"
    assert sender["save_unfull_chunk"] is True
    assert plan.commands["proxy"].flag("--connector") == "lmcache"


def test_lmcache_decoder_loads_every_chunk_it_was_pushed(tmp_path: Path) -> None:
    """The receive buffer frees a pushed chunk only when the decoder loads it (LMCache 0.5.0).

    The proxy sends the decoder the client's own N-token prompt and the prefiller pushed chunks
    of exactly those N tokens: looking up N - 1 (skip_last_n_tokens 1) misses the last chunk's
    hash, and chunks that vLLM's prefix cache already holds are not loaded either; both would
    stay in the buffer for good until pushes block (issue 23)."""
    plan = dry_run("--model", "m", "--connector", "lmcache", "--decode", "2", tmp_path=tmp_path)
    for decode in plan.engines("decode"):
        assert decode.kv_config["kv_connector_extra_config"]["skip_last_n_tokens"] == 0
        assert "--no-enable-prefix-caching" in decode.argv
    prefill = plan.commands["prefill-0"]
    assert "skip_last_n_tokens" not in prefill.kv_config["kv_connector_extra_config"]
    assert "--no-enable-prefix-caching" not in prefill.argv  # a sender pushes every chunk anyway
    # a user's own choice comes later on the command line, so it wins
    plan = dry_run(
        "--model", "m", "--connector", "lmcache", "--decode-args", "--enable-prefix-caching",
        tmp_path=tmp_path,
    )  # fmt: skip
    argv = plan.commands["decode-0"].argv
    assert argv.index("--enable-prefix-caching") > argv.index("--no-enable-prefix-caching")
    nixl = dry_run("--model", "m", tmp_path=tmp_path)
    assert "--no-enable-prefix-caching" not in nixl.commands["decode-0"].argv


@pytest.mark.parametrize(
    ("size", "expected"), [("8G", 8 << 30), ("512M", 512 << 20), ("3000", 3000)]
)
def test_lmcache_buffer_size_sets_the_receivers_buffer_only(
    tmp_path: Path, size: str, expected: int
) -> None:
    plan = dry_run(
        "--model", "m", "--connector", "lmcache", "--decode", "2",
        "--lmcache-buffer-size", size, tmp_path=tmp_path,
    )  # fmt: skip
    sender = yaml.safe_load(plan.files[plan.commands["prefill-0"].env["LMCACHE_CONFIG_FILE"]])
    assert sender["pd_buffer_size"] == 1 << 30  # the template's: a sender stages, not receives
    for decode in plan.engines("decode"):
        receiver = yaml.safe_load(plan.files[decode.env["LMCACHE_CONFIG_FILE"]])
        assert receiver["pd_buffer_size"] == expected


def test_lmcache_alloc_timeout_bounds_the_receivers_wait_only(tmp_path: Path) -> None:
    plan = dry_run("--model", "m", "--connector", "lmcache", tmp_path=tmp_path)
    for cmd in plan.engines("prefill") + plan.engines("decode"):
        assert "pd_allocation_timeout_sec" not in yaml.safe_load(
            plan.files[cmd.env["LMCACHE_CONFIG_FILE"]]
        )  # LMCache's default: no limit
    plan = dry_run(
        "--model", "m", "--connector", "lmcache", "--decode", "2",
        "--lmcache-alloc-timeout", "7.5", tmp_path=tmp_path,
    )  # fmt: skip
    sender = yaml.safe_load(plan.files[plan.commands["prefill-0"].env["LMCACHE_CONFIG_FILE"]])
    assert "pd_allocation_timeout_sec" not in sender  # its staging frees once the receiver answers
    for decode in plan.engines("decode"):
        receiver = yaml.safe_load(plan.files[decode.env["LMCACHE_CONFIG_FILE"]])
        assert receiver["pd_allocation_timeout_sec"] == 7.5
        assert receiver["pd_role"] == "receiver"


def test_2p2d_lmcache_unique_ports_and_rpc_names(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "m", "--connector", "lmcache", "--prefill", "2", "--decode", "2",
        "--decode-tp", "2", tmp_path=tmp_path,
    )  # fmt: skip
    engines = plan.engines("prefill") + plan.engines("decode")
    rpc = [c.kv_config["kv_connector_extra_config"]["lmcache_rpc_port"] for c in engines]
    assert rpc == ["producer1", "producer2", "consumer1", "consumer2"]
    files = [c.env["LMCACHE_CONFIG_FILE"] for c in engines]
    assert len(set(files)) == 4
    receivers = [yaml.safe_load(plan.files[c.env["LMCACHE_CONFIG_FILE"]]) for c in engines[2:]]
    assert [r["pd_peer_init_port"] for r in receivers] == [[7300, 7301], [7302, 7303]]
    assert [r["pd_peer_alloc_port"] for r in receivers] == [[7400, 7401], [7402, 7403]]
    senders = [yaml.safe_load(plan.files[c.env["LMCACHE_CONFIG_FILE"]]) for c in engines[:2]]
    assert {s["pd_proxy_port"] for s in senders} == {7500}
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in engines] == ["0", "1", "2,3", "4,5"]


def test_cuda_engines_get_the_ucx_get_zcopy_fix_by_default(tmp_path: Path) -> None:
    plan = dry_run("--model", "m", tmp_path=tmp_path)
    for cmd in plan.engines("prefill") + plan.engines("decode"):
        assert cmd.env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
    assert plan.commands["proxy"].env["PDPROXY_ENGINE_UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
    cpu = dry_run("--model", "m", "--device", "cpu", tmp_path=tmp_path)
    assert all("UCX_CUDA_IPC_ENABLE_GET_ZCOPY" not in c.env for c in cpu.commands.values())
    assert not cpu.commands["proxy"].env


def test_ucx_get_zcopy_from_the_environment_or_the_flag(tmp_path: Path) -> None:
    env = {**os.environ, "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "auto"}
    plan = dry_run("--model", "m", tmp_path=tmp_path, env=env)
    assert {c.env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] for c in plan.engines("decode")} == {"auto"}
    plan = dry_run("--model", "m", "--ucx-get-zcopy", "n", tmp_path=tmp_path, env=env)
    assert {c.env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] for c in plan.engines("prefill")} == {"n"}
    # the proxy is told what the engines got, for the advice of its slow-KV warning
    assert plan.commands["proxy"].env["PDPROXY_ENGINE_UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "n"


def test_cross_layer_blocks_and_the_model_runner(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    plan = dry_run("--model", "m", "--no-cross-layer-blocks", tmp_path=tmp_path, env=env)
    for cmd in plan.engines("prefill") + plan.engines("decode"):
        assert "kv_connector_extra_config" not in cmd.kv_config
        assert "VLLM_USE_V2_MODEL_RUNNER" not in cmd.env  # vLLM's own choice
    plan = dry_run("--model", "m", "--device", "cpu", tmp_path=tmp_path, env=env)
    for cmd in plan.engines("prefill") + plan.engines("decode"):
        assert "kv_connector_extra_config" not in cmd.kv_config
        assert "VLLM_USE_V2_MODEL_RUNNER" not in cmd.env
    plan = dry_run("--model", "m", "--pool", "2", "--prefill", "0", "--decode", "0",
                   tmp_path=tmp_path, env=env)  # fmt: skip
    for cmd in plan.engines("pool"):
        assert cmd.kv_config["kv_connector_extra_config"] == {"enable_cross_layers_blocks": True}
        assert cmd.env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    # the user's own choice of runner is kept, with a warning where it defeats the layout
    result = subprocess.run(
        ["bash", str(LAUNCHER), "--dry-run", "--python", PY, "--log-dir", str(tmp_path),
         "--model", "m"],
        capture_output=True, text=True, timeout=120,
        env={**env, "VLLM_USE_V2_MODEL_RUNNER": "1"},
    )  # fmt: skip
    assert result.returncode == 0
    assert "VLLM_USE_V2_MODEL_RUNNER=0" not in result.stdout
    assert "cross-layer blocks have no effect on vLLM's V2 model runner" in result.stderr


def test_per_role_kv_and_engine_options(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "m", "--block-size", "64", "--decode-block-size", "16",
        "--nixl-threads", "8", "--cross-layer-blocks", "--kv-buffer-device", "cpu",
        "--kv-extra", "kv_lease_duration=60", "--kv-extra", "note=a \"b\"",
        "--decode-kv-extra", "num_threads=2", "--prefill-args", "--max-num-seqs 8",
        "--decode-args", "--max-num-seqs 128 --seed 1", "--proxy-args", "--stats-interval 2",
        "--", "--enforce-eager", tmp_path=tmp_path,
    )  # fmt: skip
    prefill, decode = plan.commands["prefill-0"], plan.commands["decode-0"]
    assert prefill.kv_config == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_buffer_device": "cpu",
        "kv_connector_extra_config": {
            "num_threads": 8,
            "enable_cross_layers_blocks": True,
            "kv_lease_duration": 60,
            "note": 'a "b"',
        },
    }
    assert decode.kv_config["kv_connector_extra_config"]["num_threads"] == 2
    assert prefill.flag("--block-size") == "64" and decode.flag("--block-size") == "16"
    # the common args after --, then the role's own
    assert prefill.argv[-3:] == ["--enforce-eager", "--max-num-seqs", "8"]
    assert decode.argv[-5:] == ["--enforce-eager", "--max-num-seqs", "128", "--seed", "1"]
    assert plan.commands["proxy"].argv[-2:] == ["--stats-interval", "2"]


def test_no_kv_extra_by_default_and_lmcache_extras_merge(tmp_path: Path) -> None:
    plan = dry_run("--model", "m", "--no-cross-layer-blocks", tmp_path=tmp_path)
    assert "kv_connector_extra_config" not in plan.commands["decode-0"].kv_config
    assert "--block-size" not in plan.commands["decode-0"].argv
    plan = dry_run(
        "--model",
        "m",
        "--connector",
        "lmcache",
        "--decode-kv-extra",
        "skip_last_n_tokens=2",
        tmp_path=tmp_path,
    )
    extra = plan.commands["decode-0"].kv_config["kv_connector_extra_config"]
    assert extra["skip_last_n_tokens"] == 2 and extra["lmcache_rpc_port"] == "consumer1"


def test_templates_are_valid_yaml() -> None:
    sender = yaml.safe_load((REPO / "configs" / "lmcache-prefiller.yaml").read_text())
    receiver = yaml.safe_load((REPO / "configs" / "lmcache-decoder.yaml").read_text())
    assert sender["pd_role"] == "sender" and receiver["pd_role"] == "receiver"
    for key in ("pd_buffer_size", "pd_buffer_device"):
        assert key in sender and key in receiver


def test_a_pool_alone_kv_both_with_its_own_ports_and_gpus(tmp_path: Path) -> None:
    plan = dry_run("--model", "m", "--pool", "3", "--proxy-cmd", "pdproxy", tmp_path=tmp_path)
    assert plan.order == ["pool-0", "pool-1", "pool-2", "proxy"]
    engines = plan.engines("pool")
    assert [c.flag("--port") for c in engines] == ["7600", "7601", "7602"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in engines] == ["0", "1", "2"]
    assert [c.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for c in engines] == ["5800", "5810", "5820"]
    assert all(
        c.kv_config
        == {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cuda",
            "kv_connector_extra_config": {"enable_cross_layers_blocks": True},
        }
        for c in engines
    )
    proxy = plan.commands["proxy"]
    assert proxy.flags("--pool") == [f"http://127.0.0.1:760{i}" for i in range(3)]
    assert proxy.flags("--prefill") == [] and proxy.flags("--decode") == []
    assert proxy.flag("--pool-mode") == "adaptive"


def test_a_pool_beside_dedicated_engines_takes_the_next_gpus(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "m", "--prefill", "1", "--decode", "1", "--pool", "2", "--pool-tp", "2",
        "--pool-port", "8600", "--pool-args", "--max-num-seqs 64",
        "--pool-kv-extra", "num_threads=8", tmp_path=tmp_path,
    )  # fmt: skip
    assert plan.order == ["prefill-0", "decode-0", "pool-0", "pool-1", "proxy"]
    pool = plan.engines("pool")
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in pool] == ["2,3", "4,5"]
    assert [c.flag("--port") for c in pool] == ["8600", "8601"]
    assert all(c.flag("--tensor-parallel-size") == "2" for c in pool)
    assert all(c.flag("--max-num-seqs") == "64" for c in pool)
    assert all(
        c.kv_config["kv_connector_extra_config"]
        == {"num_threads": 8, "enable_cross_layers_blocks": True}
        for c in pool
    )
    assert "--max-num-seqs" not in plan.commands["decode-0"].argv
    side = [c.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for n, c in plan.commands.items() if n != "proxy"]
    assert len(set(side)) == 4
    proxy = plan.commands["proxy"]
    assert proxy.flags("--prefill") == ["http://127.0.0.1:7100"]
    assert proxy.flags("--pool") == ["http://127.0.0.1:8600", "http://127.0.0.1:8601"]


def test_a_colocated_pool_of_plain_engines(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "m", "--pool", "2", "--pool-connector", "none", "--device", "cpu",
        tmp_path=tmp_path,
    )  # fmt: skip
    for cmd in plan.engines("pool"):
        assert "--kv-transfer-config" not in cmd.argv
        assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in cmd.env
    assert [c.env["VLLM_CPU_OMP_THREADS_BIND"] for c in plan.engines("pool")] == ["0", "1"]
    assert plan.commands["proxy"].flag("--pool-mode") == "colocated"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "m", "--connector", "mooncake"], "--connector must be nixl or lmcache"),
        (["--model", "m", "--device", "tpu"], "--device must be cuda or cpu"),
        (["--prefill", "1"], "--model is required"),
        (["--model", "m", "--prefill", "x"], "NUM_PREFILL must be"),
        (["--model", "m", "--prefill-gpus", "0,1"], "has 2 id(s); 1 needed"),
        (["--model", "m", "--bogus"], "unknown option '--bogus'"),
        (["--model"], "--model needs a value"),
        (["--model", "m", "--ucx-get-zcopy", "maybe"], "--ucx-get-zcopy must be y, n or auto"),
        (["--model", "m", "--block-size", "big"], "BLOCK_SIZE must be a positive integer"),
        (["--model", "m", "--kv-extra", "novalue"], "kv extra 'novalue' is not KEY=VALUE"),
        (["--model", "m", "--kv-buffer-device", "disk"], "--kv-buffer-device must be cuda"),
        (["--model", "m", "--prefill", "0"], "need at least one prefiller and one decoder, or a"),
        (
            ["--model", "m", "--pool", "2", "--connector", "lmcache"],
            "--pool needs --connector nixl",
        ),
        (["--model", "m", "--pool", "2", "--pool-connector", "ucx"], "--pool-connector must be"),
        (
            ["--model", "m", "--pool", "2", "--pool-connector", "none", "--pool-mode", "adaptive"],
            "--pool-connector none moves no KV: it needs --pool-mode colocated",
        ),
        (
            ["--model", "m", "--pool", "2", "--prefill", "1", "--pool-mode", "colocated"],
            "it has no use for --prefill engines",
        ),
        (["--model", "m", "--pool", "2", "--pool-gpus", "0"], "--pool-gpus '0' has 1 id(s); 2"),
        (["--model", "m", "--pool", "11"], "at most 10 instances per role"),
        (["--model", "m", "--lmcache-buffer-size", "8X"], "'8X' is not a size"),
        (["--model", "m", "--lmcache-buffer-size", "0"], "'0' is not a size"),
        (["--model", "m", "--lmcache-alloc-timeout", "0"], "not a positive number of seconds"),
        (["--model", "m", "--lmcache-alloc-timeout", "soon"], "not a positive number of seconds"),
    ],
)
def test_bad_arguments_fail_clearly(args: list[str], message: str) -> None:
    result = run_launcher("--dry-run", *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_missing_vllm_fails_fast(tmp_path: Path) -> None:
    result = run_launcher(
        "--model", "m", "--python", "/bin/false", "--log-dir", str(tmp_path), "--no-proxy"
    )
    assert result.returncode != 0
    assert "vLLM is not importable" in result.stderr


def test_taken_port_fails_fast(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_launcher(
            "--model", "m", "--python", "true", "--proxy-cmd", "true",
            "--log-dir", str(tmp_path), "--proxy-port", str(port),
        )  # fmt: skip
    assert result.returncode != 0
    assert f"port(s) already in use on 127.0.0.1: {port}" in result.stderr


@pytest.mark.parametrize(
    ("args", "first", "second"),
    [
        (
            ["--prefill", "2", "--decode-port", "7101"],
            "prefill-1's HTTP server (--prefill-port)",
            "decode-0's HTTP server (--decode-port)",
        ),
        (
            ["--proxy-port", "7100"],
            "the proxy (--proxy-port)",
            "prefill-0's HTTP server (--prefill-port)",
        ),
        (
            ["--side-channel-port", "7200"],  # prefill-0's side channel on decode-0's HTTP port
            "prefill-0's NIXL side channel (--side-channel-port)",
            "decode-0's HTTP server (--decode-port)",
        ),
        (
            ["--pool", "1", "--pool-port", "5800"],  # the pool engine's side channel: 5600+200
            "pool-0's HTTP server (--pool-port)",
            "pool-0's NIXL side channel (--side-channel-port)",
        ),
        (
            ["--connector", "lmcache", "--decode", "2", "--lmcache-alloc-port", "7301"],
            "decode-0's LMCache alloc port, TP rank 0 (--lmcache-alloc-port)",
            "decode-1's LMCache init port, TP rank 0 (--lmcache-init-port)",
        ),
        (
            ["--connector", "lmcache", "--notify-port", "9100"],
            "the proxy (--proxy-port)",
            "the proxy's LMCache notifications (--notify-port)",
        ),
    ],
)
def test_colliding_ports_refused_naming_both_users(
    args: list[str], first: str, second: str
) -> None:
    result = run_launcher("--dry-run", "--model", "m", *args)
    assert result.returncode != 0 and not result.stdout
    port = next(a for a in args if a.isdigit() and len(a) == 4)
    assert f"port {port} is planned for both {first} and {second}" in result.stderr


def test_dry_run_summary_first_then_commands_then_yaml(tmp_path: Path) -> None:
    """A 2P2D LMCache plan: GPUs, ports and start order on top; the long YAML files last."""
    args = ["--model", "m", "--prefill", "2", "--decode", "2", "--decode-tp", "2",
            "--connector", "lmcache", "--proxy-cmd", "pdproxy",
            "--log-dir", str(tmp_path)]  # fmt: skip
    result = run_launcher("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    head = lines[: lines.index(f"mkdir -p {tmp_path}")]
    assert (
        "# GPUs: 6 needed (0,1,2,3,4,5): prefill-0 0; prefill-1 1; decode-0 2,3; decode-1 4,5"
        in head
    )
    assert "#   7101  prefill-1's HTTP server (--prefill-port)" in head
    assert "#   7403  decode-1's LMCache alloc port, TP rank 1 (--lmcache-alloc-port)" in head
    assert "#   7500  the proxy's LMCache notifications (--notify-port)" in head
    assert "# start order: proxy prefill-0 prefill-1 decode-0 decode-1 (commands below)" in head
    commands = [i for i, line in enumerate(lines) if line.startswith("env ")]
    files = [i for i, line in enumerate(lines) if line.startswith("cat > ")]
    assert len(commands) == 5 and len(files) == 4
    assert max(commands) < min(files)  # every command before the first YAML
    plan = dry_run_plan(args)
    assert plan.order == ["proxy", "prefill-0", "prefill-1", "decode-0", "decode-1"]


def test_yaml_comments_name_their_instance(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "m", "--prefill", "2", "--decode", "2", "--connector", "lmcache",
        tmp_path=tmp_path,
    )  # fmt: skip
    for cmd in plan.engines("prefill") + plan.engines("decode"):
        path = cmd.env["LMCACHE_CONFIG_FILE"]
        text = plan.files[path]
        assert text.startswith(f"# {cmd.name}: written by launchers/disagg.sh from configs/")
        rpc = cmd.kv_config["kv_connector_extra_config"]["lmcache_rpc_port"]
        comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        assert f'"lmcache_rpc_port":"{rpc}"' in comments, cmd.name
        assert f"LMCACHE_CONFIG_FILE={path}" in comments
    second = plan.files[plan.engines("decode")[1].env["LMCACHE_CONFIG_FILE"]]
    assert "consumer1" not in second and "producer1" not in second


def test_dry_run_summary_counts_cpu_cores(tmp_path: Path) -> None:
    result = run_launcher(
        "--dry-run", "--model", "m", "--device", "cpu", "--cpus", "2", "--log-dir", str(tmp_path)
    )
    assert "# CPU cores: 2 of 2 (0,1): prefill-0 0; decode-0 1" in result.stdout.splitlines()


def test_every_engine_publishes_kv_events_where_the_proxys_rule_looks(tmp_path: Path) -> None:
    plan = dry_run(
        "--model", "m", "--prefill", "2", "--decode", "1", "--pool", "1", "--proxy-cmd",
        "pdproxy", tmp_path=tmp_path,
    )  # fmt: skip
    proxy = plan.commands["proxy"]
    assert "--kv-events" in proxy.argv
    rule = KvEventsConfig(enabled=True)
    engines = [*plan.engines("prefill"), *plan.engines("decode"), *plan.engines("pool")]
    assert len(engines) == 4
    for cmd in engines:
        config = json.loads(cmd.flag("--kv-events-config"))
        expected = rule.endpoint_for(f"http://127.0.0.1:{cmd.flag('--port')}")
        assert config["enable_kv_cache_events"] is True and config["publisher"] == "zmq"
        assert config["endpoint"] == expected.publisher and expected.bind  # the engine connects
        assert config["replay_endpoint"] == expected.replay
    off = dry_run("--model", "m", "--no-kv-events", "--proxy-cmd", "pdproxy", tmp_path=tmp_path)
    assert all("--kv-events-config" not in c.argv for c in off.commands.values())
    assert "--kv-events" not in off.commands["proxy"].argv
