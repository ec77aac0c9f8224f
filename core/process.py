"""Whether a process is alive, for stale-lock rules: a lock whose owner died on this host may be taken over (the
video decode cache, the cluster tests' namespace harness)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists on this host (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
