"""Run by Python at start-up when this folder is on PYTHONPATH: the cluster tests put it there for a job with a
slow rank (tests/cluster/slow_rank.py)."""

import os
import sys

if os.environ.get("QWEN2VL_SLOW_RANK"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import slow_rank

    slow_rank.install()
