"""Fixtures for the cluster tests: the one-process reference run, two hosts as network namespaces (the demo's
sample set is tests/conftest.py's demo_dir)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The training tests' helpers (free-port torchrun, metrics.jsonl readers, the short-stage overrides).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster_helpers import require  # noqa: E402


@pytest.fixture(scope="session")
def reference(demo_dir, tmp_path_factory) -> Path:
    """The one-process run of the cluster tests' recipe. It reads the data with 2 logical loader workers: the
    data order is a function of the job's number of logical workers (dp x data.num_workers, data/loader.py), so
    this one process sees the global batches of every dp2 layout with 1 worker per rank."""
    from cluster_helpers import COMMON, RECIPE
    from train_helpers import env_for, run_cmd

    run_dir = tmp_path_factory.mktemp("ref") / "one_process"
    run_cmd([sys.executable, "-m", "train", RECIPE, f"run_dir={run_dir}", *COMMON, "data.num_workers=2"],
            env_for(demo_dir), 300)
    return run_dir


def _two_hosts():
    from netns import TwoHosts, unavailable_reason

    require(unavailable_reason())
    hosts = TwoHosts()
    try:
        hosts.__enter__()
    except RuntimeError as e:
        require(f"network namespaces cannot be created here: {e}")
    try:
        yield hosts
    finally:
        hosts.close()


@pytest.fixture
def two_hosts():
    """Two hosts (network namespaces + veth) for one test, removed after it whatever happened."""
    yield from _two_hosts()


@pytest.fixture(scope="module")
def module_two_hosts():
    """Two hosts shared by a module's fixtures (runs that several tests read)."""
    yield from _two_hosts()
