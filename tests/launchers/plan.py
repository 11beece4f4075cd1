"""What launchers/disagg.sh --dry-run prints, parsed: each command (its name, environment and
argv) in start order, and the files it writes; `dry_run_plan` runs it and parses."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAUNCHER = Path(__file__).resolve().parents[2] / "launchers" / "disagg.sh"


@dataclass
class Command:
    name: str
    env: dict[str, str]
    argv: list[str]

    def flag(self, name: str) -> str:
        return self.argv[self.argv.index(name) + 1]

    def flags(self, name: str) -> list[str]:
        return [self.argv[i + 1] for i, a in enumerate(self.argv) if a == name]

    @property
    def kv_config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads(self.flag("--kv-transfer-config"))
        return config


@dataclass
class Plan:
    commands: dict[str, Command] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def engines(self, role: str) -> list[Command]:
        return [c for n, c in self.commands.items() if n.startswith(f"{role}-")]


def parse_plan(text: str) -> Plan:
    plan = Plan()
    lines = iter(text.splitlines())
    name = ""
    for line in lines:
        if m := re.fullmatch(r"cat > (\S+) <<'YAML'", line):
            body = []
            for inner in lines:
                if inner == "YAML":
                    break
                body.append(inner)
            plan.files[m.group(1)] = "\n".join(body) + "\n"
        elif m := re.fullmatch(r"# (\S+): log (\S+)", line):
            name = m.group(1)
        elif line.startswith("env "):
            words = shlex.split(line)[1:]
            env: dict[str, str] = {}
            while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            plan.commands[name] = Command(name, env, words)
            plan.order.append(name)
    return plan


def dry_run_plan(args: list[str], env: dict[str, str] | None = None) -> Plan:
    """The plan of `launchers/disagg.sh --dry-run ARGS`; the launcher must accept ARGS."""
    out = subprocess.run(
        ["bash", str(LAUNCHER), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=120,  # a loaded CI machine forks slowly
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return parse_plan(out.stdout)
