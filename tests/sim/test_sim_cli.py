"""The CLI serves until SIGTERM and exits cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request

from proxy.sim import cli


def test_config_from_args_defaults() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cfg = cli.config_from_args(parser.parse_args(["--port", "0", "--speed-factor", "0"]))
    assert cfg.side_channel_port == 5600 and cfg.kv_lease_seconds == 30
    assert cfg.model == "pdsim/llama-8b" and not cfg.timing.enabled


def test_process_serves_and_stops_on_sigterm() -> None:
    cmd = [sys.executable, "-m", "proxy.sim", "--port", "0", "--side-channel-port", "0"]
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
