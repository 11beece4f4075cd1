"""Timing profiles: the simulator's delays as measured on real hardware, in small JSON files.

A profile holds the ``Timing`` fields (milliseconds) under ``"timing"``, with where they come
from (``"source"``) and the measurements they were fitted to (``"measured"``). ``pdproxy sim
--timing-profile NAME|FILE`` loads one: a NAME is a profile shipped in ``pdsim/profiles``;
explicit timing flags still override its values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pdsim.config import Timing

PROFILES = Path(__file__).with_name("profiles")
TIMING_KEYS = tuple(f.name for f in fields(Timing) if f.name != "speed_factor")


class ProfileError(ValueError):
    """The profile cannot be used; the message says why."""


@dataclass(frozen=True)
class TimingProfile:
    name: str
    source: str
    timing: dict[str, float]


def shipped() -> list[str]:
    return sorted(p.stem for p in PROFILES.glob("*.json"))


def load_profile(ref: str) -> TimingProfile:
    """A shipped profile by name, or a JSON file by path."""
    path = PROFILES / f"{ref}.json" if ref in shipped() else Path(ref)
    try:
        data: Any = json.loads(path.read_text())
    except OSError as exc:
        known = ", ".join(shipped())
        raise ProfileError(f"timing profile {ref!r}: {exc.strerror} (shipped: {known})") from None
    except ValueError as exc:
        raise ProfileError(f"timing profile {path} is not valid JSON: {exc}") from None
    timing = data.get("timing") if isinstance(data, dict) else None
    if not isinstance(timing, dict):
        raise ProfileError(f"timing profile {path} has no 'timing' mapping")
    unknown = sorted(set(timing) - set(TIMING_KEYS))
    if unknown:
        raise ProfileError(f"timing profile {path}: unknown keys {unknown}; known: {TIMING_KEYS}")
    for key, value in timing.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ProfileError(f"timing profile {path}: {key} must be a number >= 0")
    return TimingProfile(str(data.get("name", path.stem)), str(data.get("source", "")), timing)


def build_timing(
    profile: TimingProfile | None, overrides: dict[str, float | None], speed_factor: float
) -> Timing:
    """Timing defaults, then the profile's values, then the explicit flags."""
    values: dict[str, float] = dict(profile.timing) if profile else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Timing(**values, speed_factor=speed_factor)
