"""The CLI serves until SIGTERM and exits cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pdsim import cli
from pdsim.launch import free_port


def test_config_from_args_defaults() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = cli.config_from_args(parser.parse_args(["--port", "0", "--speed-factor", "0"]))
    assert cfg.side_channel_port == 0 and cfg.kv_lease_seconds == 30  # 0: a free one
    assert cfg.model == "pdsim/llama-8b" and not cfg.timing.enabled


def test_process_serves_and_stops_on_sigterm() -> None:
    cmd = [sys.executable, "-m", "pdsim", "--port", "0", "--side-channel-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(" on ")[1].split(" ")[0]
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_side_channel_port_flag_then_vllms_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", "5700")
    assert cli.side_channel_port(None) == 5700 and cli.side_channel_port(5800) == 5800
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_PORT", "x")
    with pytest.raises(ValueError, match="not a port"):
        cli.side_channel_port(None)


def test_a_prefiller_and_a_decoder_side_by_side_need_no_flags() -> None:
    """Both used to default to side-channel port 5600: the second one could not start."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_NIXL_SIDE_CHANNEL_PORT"}
    procs = []
    try:
        lines = []
        for role in ("prefill", "decode"):
            port = str(free_port())
            cmd = [sys.executable, "-m", "proxy", "sim", "--role", role, "--port", port]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
            procs.append(proc)
            assert proc.stdout is not None
            lines.append(proc.stdout.readline())
        sides = [line.split("side channel 127.0.0.1:")[1].split(",")[0] for line in lines]
        assert all(s.isdigit() and s != "0" for s in sides) and sides[0] != sides[1], lines
        for line in lines:
            url = line.split(" on ")[1].split(" ")[0]
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                assert resp.status == 200
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=10)
