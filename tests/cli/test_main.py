import socket
import subprocess
import sys
from pathlib import Path

from proxy.cli.main import main


def test_config_error_is_reported_and_exit_2(tmp_path: Path, capsys: object) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: [http://a:1]\ndecode: [http://b:2]\nprefil_policy: round_robin\n")
    assert main(["serve", "--config", str(bad)]) == 2


def test_missing_workers_message() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--decode", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert "no prefill workers" in run.stderr


def test_help_lists_commands() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "proxy", "--help"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0
    assert all(word in run.stdout for word in ("serve", "sim", "demo"))


def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "proxy", "serve", "--prefill", "http://127.0.0.1:1",
             "--decode", "http://127.0.0.1:2", "--port", str(port)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip() == f"pdproxy: port {port} is taken on 127.0.0.1; pass --port N"
    assert run.stdout == ""
