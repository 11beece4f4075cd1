"""Makes ``sim_helpers`` importable by the simulator tests (pytest runs in importlib mode)."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
