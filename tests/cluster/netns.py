"""Two "hosts" on one machine: Linux network namespaces joined by a veth pair (needs root and iproute2).

    with TwoHosts() as hosts:                       # also removed at interpreter exit (atexit)
        agent = hosts.popen(0, ["bash", "launch/torchrun.sh", ...], env, log_path)
        ...
        hosts.kill(1)                               # SIGKILL every process of host 1, its torchrun agent included

Host i is namespace `<prefix>h<i>` with interface IFNAME (the same name on both hosts, like a cluster's NIC)
holding address 10.77.0.<i+1>/24, and hostname `clhost<i>`: every command runs in its own UTS namespace with
that hostname, and /etc/netns/<ns>/hosts (which `ip netns exec` bind-mounts over /etc/hosts) resolves both
hostnames to their addresses. torchrun's c10d rendezvous needs exactly this: the agent whose hostname resolves
to the rendezvous endpoint hosts the store, and workers reach the master by its hostname.

The namespaces hold only `lo` and the veth end, with one route (the /24 on the veth): traffic between the hosts
crosses the veth pair and nothing else, and nothing leaves for the root namespace or the outside.

Cleanup (context exit, atexit, and at the next start for namespaces whose creating process died without it):
SIGKILL every process in the namespaces, delete them and their /etc/netns folders.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from core.process import pid_alive

PREFIX = "qvc"
IFNAME = "veth-cl"
SUBNET = "10.77.0"
NETNS_ETC = Path("/etc/netns")
_counter = 0


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def namespace_pids(ns: str) -> list[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in res.stdout.split()] if res.returncode == 0 else []


def _kill_all(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process whose network namespace is `ns` (repeated: a dying parent may still fork)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _remove_namespace(ns: str) -> None:
    _kill_all(ns)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def remove_stale() -> None:
    """Delete namespaces (and /etc/netns folders) of this harness whose creating process is gone (it was
    SIGKILLed, say): their names start with PREFIX + the creator's pid."""
    listed = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.split()]
    folders = [p.name for p in NETNS_ETC.glob(f"{PREFIX}*")] if NETNS_ETC.is_dir() else []
    for ns in sorted(set(listed + folders)):
        if not ns.startswith(PREFIX):
            continue
        try:
            owner = int(ns[len(PREFIX):].split("x")[0])
        except ValueError:
            continue
        if not pid_alive(owner):
            _remove_namespace(ns)


class TwoHosts:
    """Two network namespaces joined by a veth pair; see the module docstring."""

    def __init__(self) -> None:
        global _counter
        _counter += 1
        self.tag = f"{PREFIX}{os.getpid()}x{_counter}"
        self.ns = [f"{self.tag}h{i}" for i in range(2)]
        self.addr = [f"{SUBNET}.{i + 1}" for i in range(2)]
        self.hostname = [f"clhost{i}" for i in range(2)]
        self.ifname = IFNAME
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []
        self._up = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> TwoHosts:
        remove_stale()
        atexit.register(self.close)
        try:
            for ns in self.ns:
                _ip("netns", "add", ns)
            self._up = True
            # Both ends are created inside their namespaces: the pair never exists in the root namespace.
            _ip("link", "add", IFNAME, "netns", self.ns[0], "type", "veth", "peer", "name", IFNAME, "netns", self.ns[1])
            hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(self.addr, self.hostname))
            for ns, addr in zip(self.ns, self.addr):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", IFNAME, "up")
                (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
                (NETNS_ETC / ns / "hosts").write_text(hosts)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill everything in both hosts and delete them (idempotent)."""
        if self._up:
            for ns in self.ns:
                _remove_namespace(ns)
            self._up = False
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for f in self._logs:
            f.close()
        self._procs, self._logs = [], []
        atexit.unregister(self.close)

    # ------------------------------------------------------------------ running things on a host
    def popen(self, host: int, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
              ) -> subprocess.Popen:
        """Start `cmd` on host `host` (its namespace and hostname), stdout+stderr appended to `log`."""
        wrapped = ["ip", "netns", "exec", self.ns[host], "unshare", "--uts", "--",
                   "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname[host], *cmd]
        f = open(log, "a")  # noqa: SIM115 - closed in close()
        self._logs.append(f)
        p = subprocess.Popen(wrapped, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        self._procs.append(p)
        return p

    def run(self, host: int, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a short command on host `host` and return its output."""
        return subprocess.run(["ip", "netns", "exec", self.ns[host], *cmd], capture_output=True, text=True,
                              timeout=timeout)

    def pids(self, host: int) -> list[int]:
        return namespace_pids(self.ns[host])

    def kill(self, host: int) -> list[int]:
        """SIGKILL every process of `host` (a host that crashed or lost power); returns the pids killed."""
        pids = self.pids(host)
        _kill_all(self.ns[host])
        return pids

    def link_down(self, host: int) -> None:
        """Take the host's interface down: its peers get no reset, packets to it vanish (a partition)."""
        _ip("-n", self.ns[host], "link", "set", IFNAME, "down")

    # ------------------------------------------------------------------ what the network saw
    def link_stats(self, host: int) -> dict[str, int]:
        """Bytes sent and received on the host's veth end."""
        info = json.loads(_ip("-n", self.ns[host], "-j", "-s", "link", "show", "dev", IFNAME).stdout)[0]
        return {"tx_bytes": info["stats64"]["tx"]["bytes"], "rx_bytes": info["stats64"]["rx"]["bytes"]}

    def interfaces(self, host: int) -> list[str]:
        return [i["ifname"] for i in json.loads(_ip("-n", self.ns[host], "-j", "link", "show").stdout)]

    def routes(self, host: int) -> list[dict]:
        """The host's routing table (main)."""
        return json.loads(_ip("-n", self.ns[host], "-j", "route", "show").stdout)
