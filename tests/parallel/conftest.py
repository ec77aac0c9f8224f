"""Make the helper modules of this folder (_dist, _synth, _workers) importable by the tests and by the
forkserver that starts the ranks, whatever pytest's import mode."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
