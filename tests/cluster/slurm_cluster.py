"""A real SLURM on one machine: munged, slurmctld and one slurmd, with their own config, key, state and logs
under one folder, started in the foreground and stopped (by their pids) when the context ends.

    with LocalSlurm(tmp_path / "slurm") as slurm:   # also stopped at interpreter exit (atexit)
        job = slurm.sbatch(["--ntasks=2", "launch/slurm.sbatch", ...], env, cwd=REPO)
        slurm.wait(job, timeout=300)                # -> the job's final state, e.g. "COMPLETED"

Debian's packages: munge, slurmctld, slurmd, slurm-client (.ci/run installs them). The node is this machine
(NodeName = its hostname, address 127.0.0.1) with all of its CPUs; the ports are free ones picked at start, so a
system SLURM on the default ports is left alone. Client commands find the cluster through SLURM_CONF, which
`env()` sets.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun")


def unavailable_reason() -> str | None:
    """Why a one-machine SLURM cannot run here, or None."""
    if os.geteuid() != 0:
        return "the one-machine SLURM runs its daemons as root (CI runs as root)"
    missing = [t for t in (*DAEMONS, *CLIENTS, "mungekey") if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (apt-get install munge slurmctld slurmd slurm-client; "
                ".ci/run does)")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd of a one-node cluster under `root`; see the module docstring."""

    def __init__(self, root: Path, cluster: str = "qvtest") -> None:
        self.root, self.cluster = Path(root), cluster
        self.node = socket.gethostname()
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ config
    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        subprocess.run(["mungekey", "--create", f"--keyfile={r / 'munge' / 'munge.key'}", "--force"], check=True,
                       capture_output=True, timeout=30)
        cpus = os.cpu_count() or 2
        self.conf.write_text(f"""\
ClusterName={self.cluster}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's next start (begin time = requeue + cred_expire + 1; default 120 s).
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}
SlurmdPidFile={r / 'spool' / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
# No cgroups here (containers, CI machines): processes are tracked by their parent ids.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# Schedule every 2 s (default 60): a requeued job becomes eligible at a time, and no event wakes the scheduler.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose SLURM client commands talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ------------------------------------------------------------------ lifecycle
    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 - the daemon holds it until stopped
        self._procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                             start_new_session=True)
        log.close()

    def __enter__(self) -> LocalSlurm:
        atexit.register(self.stop)
        try:
            self._write_config()
            m = self.root / "munge"
            self._start("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                                   f"--seed-file={m / 'munged.seed'}", f"--log-file={m / 'munged.log'}"])
            self._wait_for(lambda: self.munge_socket.exists(), "munged", 20)
            self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait_for(lambda: self._scontrol("ping").returncode == 0, "slurmctld", 30)
            self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_for(self._node_ready, "slurmd", 60)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop the daemons this object started (SIGTERM, then SIGKILL) in reverse
        order, and kill what is left of the jobs' processes (idempotent)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=self.env(), capture_output=True,
                           timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._squeue():
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            p = self._procs.pop(name, None)
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self._kill_job_processes()
        atexit.unregister(self.stop)

    def _squeue(self) -> list[str]:
        res = subprocess.run(["squeue", "--noheader", "--format=%i"], env=self.env(), capture_output=True,
                             text=True, timeout=30)
        return res.stdout.split() if res.returncode == 0 else []

    def _kill_job_processes(self) -> None:
        """SIGKILL every process that runs with this cluster's SLURM_CONF (the jobs' tasks inherit it from
        sbatch): a job step that outlived its slurmd must not outlive the test."""
        mark = f"SLURM_CONF={self.conf}".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if mark in (d / "environ").read_bytes().split(b"\0"):
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def _wait_for(self, ok, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            p = self._procs[name]
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start (exit code {p.poll()}): {self.daemon_log(name)[-3000:]}")
            time.sleep(0.2)

    def daemon_log(self, name: str) -> str:
        paths = [self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log",
                 self.root / "munge" / f"{name}.log"]
        return "".join(f"--- {p}\n{p.read_text(errors='replace')}" for p in paths if p.is_file())

    # ------------------------------------------------------------------ client commands
    def _scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["scontrol", *args], env=self.env(), capture_output=True, text=True, timeout=30)

    def _node_ready(self) -> bool:
        out = self._scontrol("show", "node", self.node).stdout
        return "State=IDLE" in out

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path) -> int:
        """Submit; returns the job id."""
        res = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd, capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {res.stderr.strip()}")
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self._scontrol("show", "job", "--oneliner", str(job_id)).stdout
        fields = {}
        for tok in out.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields.setdefault(k, v)
        return fields

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job has ended for good (not pending, running or requeued); returns its record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state and state not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING",
                                       "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout}s: {info}")
            time.sleep(0.5)
