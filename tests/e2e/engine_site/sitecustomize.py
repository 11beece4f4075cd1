"""Started by every Python process of the real-vLLM tests' engines (this directory is put on
their PYTHONPATH; see `real_vllm_fixtures.engine_env`): gives NIXL's progress thread a poll
timeout, so that an idle engine does not spin a core.

NIXL's Python API (1.5) builds its agent with ``pthrDelay = 0``, and vLLM offers no setting for
it: the UCX backend's progress thread then polls with a zero timeout, a whole core per engine
even with nothing to move (a bare ``nixl_agent`` measured 100 % of a core over 3 s idle, 2 % with
a delay of 1,000 µs). A GPU host has cores to spare; the 2-core box that runs these tests has
two engines, and their two spinning threads left the API servers, the proxy and the tests the
rest: an engine's API server went unanswered for 20 to 30 s at a time (its chat template render
timed out at vLLM's 30 s). The delay only bounds how long the thread sleeps when UCX has
nothing armed to wake it; the transfers are the same.

PDPROXY_NIXL_PROGRESS_DELAY_US sets it; unset, nothing is changed. Nothing is imported until the
program imports NIXL itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any

_MODULES = ("nixl_cu12._api", "nixl_cu13._api", "nixl_rocm._api")


def _delayed(bindings: Any, delay_us: int) -> Any:
    """A stand-in for NIXL's bindings module whose `nixlAgent` sets the delay first."""

    def nixl_agent(name: str, config: Any) -> Any:
        config.pthrDelay = delay_us
        return bindings.nixlAgent(name, config)

    stand_in = types.ModuleType(bindings.__name__)
    stand_in.__dict__.update(bindings.__dict__)
    stand_in.nixlAgent = nixl_agent  # type: ignore[attr-defined]
    return stand_in


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, delay_us: int) -> None:
        self.delay_us = delay_us

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        loader, delay_us = spec.loader, self.delay_us
        run = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            module.nixlBind = _delayed(module.nixlBind, delay_us)  # type: ignore[attr-defined]

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_delay = os.environ.get("PDPROXY_NIXL_PROGRESS_DELAY_US", "")
if _delay.isdigit():
    sys.meta_path.insert(0, _Finder(int(_delay)))
