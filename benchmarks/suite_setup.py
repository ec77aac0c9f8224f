"""What the GPU suite (benchmarks/gpu_suite.py) settles before any part's alarm is armed, and what it watches
across parts.

- The oracle: parity is measured against transformers at the version pyproject.toml pins (its dev extra). A
  machine whose image holds another version (the lent H200: 5.17) gets the pinned wheel carried in `.whl/`
  (docs/perf/README.md says how it gets there), installed --no-deps into a temporary folder put first on
  sys.path, after a child process has shown that it imports with this machine's packages; else the suite
  reports the mismatch and goes on with what is installed.
- The process group: a 1-rank NCCL group in a child process (all_reduce, all_gather_into_tensor,
  reduce_scatter_tensor, broadcast: what the engine and FSDP2 call); when NCCL fails, the same with gloo, which
  the single-GPU configs then use. The error goes into the report once instead of into every config.
- Warm imports and a tiny compile: inductor, its Triton codegen and triton are imported, and a tiny function
  is compiled and differentiated (inductor on CUDA, aot_eager on CPU), so no alarm can land in a half-done
  import or in the first, coldest compile.
- Dynamo's recompile limit: every compiled block shares dynamo's per-code cache, and over the limit dynamo runs
  eager without an error; the limit is raised and `DynamoWatch` reports, per config, the cache entries added
  and every limit hit (a compiled figure that ran eager is marked invalid by the suite).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
"""Where the pinned oracle wheel travels with the working tree (ignored by git: .gitignore)."""
RECOMPILE_LIMIT = 64
"""Dynamo's per-code cache limit for the suite (torch's default is 8)."""
ACCUMULATED_RECOMPILE_LIMIT = 4096


# ------------------------------------------------------------------------------------------ the oracle
def pinned_version(package: str = "transformers", pyproject: Path = ROOT / "pyproject.toml") -> str | None:
    """The `package==X` pin of pyproject's dev extra (the oracle's version), or None."""
    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    for req in extras.get("dev", []):
        m = re.fullmatch(rf"\s*{re.escape(package)}\s*==\s*([\w.]+)\s*", req)
        if m:
            return m.group(1)
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def use_pinned_wheel(package: str, pin: str | None, wheel_dir: Path = WHEEL_DIR,
                     check: str | None = None, timeout: float = 180.0) -> dict[str, Any]:
    """Make `package` at version `pin` the one this process (and its children) imports, if it is not already.

    Call before anything imports `package`. When the installed version differs and wheel_dir holds
    `<package>-<pin>-*.whl`, the wheel is installed --no-deps into a fresh temporary folder; a child process
    imports it from there (plus `check`, Python code run after the import) on this machine's other packages;
    if that works, the folder goes first on sys.path and PYTHONPATH. Returns what happened: pinned, installed,
    used, and 'mismatch' / 'error' when the pinned version is not the one used."""
    rec: dict[str, Any] = {"package": package, "pinned": pin, "installed": _version(package)}
    if package in sys.modules:
        rec.update(used=rec["installed"], error=f"{package} was imported before the suite could choose its version")
        return rec
    if pin is None or rec["installed"] == pin:
        rec["used"] = rec["installed"]
        return rec
    name = package.replace("-", "_")
    wheels = sorted(wheel_dir.glob(f"{name}-{pin}-*.whl"))
    if not wheels:
        rec.update(used=rec["installed"], mismatch=f"{package} {rec['installed']} here, pinned {pin}; no "
                   f"{name}-{pin}-*.whl in {wheel_dir} (docs/perf/README.md: bring it with the tree)")
        return rec
    target = Path(tempfile.mkdtemp(prefix=f"gs_{name}_"))
    t0 = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(target), str(wheels[-1])],
                       check=True, capture_output=True, text=True, timeout=timeout)
        code = "\n".join([f"import {name}", check or "", f"print('VERSION', {name}.__version__)"])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *_pythonpath()])}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
        got = re.findall(r"^VERSION (\S+)$", p.stdout, re.M)
        if p.returncode != 0 or got != [pin]:
            raise RuntimeError(f"importing the pinned wheel failed here (exit {p.returncode}, version {got}): "
                               + (p.stderr.strip().splitlines() or ["no output"])[-1][:500])
    except (subprocess.SubprocessError, RuntimeError, OSError) as ex:
        err = ex.stderr if isinstance(ex, subprocess.CalledProcessError) and ex.stderr else str(ex)
        rec.update(used=rec["installed"], wheel=wheels[-1].name, error=f"{type(ex).__name__}: {err}"[:800],
                   mismatch=f"{package} {rec['installed']} here, pinned {pin}: the carried wheel did not import")
        return rec
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), *_pythonpath()])
    importlib.invalidate_caches()
    rec.update(used=_version(package), wheel=wheels[-1].name, target=str(target),
               install_s=round(time.perf_counter() - t0, 2))
    return rec


def _pythonpath() -> list[str]:
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


# ------------------------------------------------------------------------------------------ process group
_PG_SMOKE = r"""
import datetime, json, sys, time
import torch, torch.distributed as dist
backend, device = sys.argv[1], torch.device(sys.argv[2])
t0 = time.perf_counter()
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
x = torch.arange(8, dtype=torch.float32, device=device)
dist.all_reduce(x)
g = torch.empty(8, device=device)
dist.all_gather_into_tensor(g, x)
r = torch.empty(8, device=device)
dist.reduce_scatter_tensor(r, g)
dist.broadcast(r, 0)
ok = bool(torch.equal(r.cpu(), torch.arange(8, dtype=torch.float32)))
dist.destroy_process_group()
print("PG_SMOKE " + json.dumps({"ok": ok, "seconds": round(time.perf_counter() - t0, 2)}))
"""


class ProcessGroupSmoke:
    """A 1-rank process group of `backend` on `device` in a child process (started at once, read by result())."""

    def __init__(self, backend: str, device: str) -> None:
        self.backend, self.device = backend, device
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-c", _PG_SMOKE, backend, device], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float) -> dict[str, Any]:
        """{'backend', 'ok', 'seconds'} and the error's last lines when it failed or did not end in `timeout`."""
        rec: dict[str, Any] = {"backend": self.backend, "device": self.device}
        try:
            out, err = self.proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {**rec, "ok": False, "error": f"no answer in {timeout:.0f} s (killed)"}
        found = re.findall(r"^PG_SMOKE (.*)$", out, re.M)
        if self.proc.returncode == 0 and found:
            return {**rec, **json.loads(found[-1])}
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-3:]
        return {**rec, "ok": False, "error": f"exit {self.proc.returncode}: " + " | ".join(tail)[-800:],
                "seconds": round(time.perf_counter() - self.t0, 2)}


def choose_backend(first: dict[str, Any], fallback: Any | None) -> tuple[str, dict[str, Any]]:
    """(backend the configs use, record): the first smoke test's backend when it passed, else the fallback's
    (a ProcessGroupSmoke to read, or None) when that one passed, else the first (its error is the finding)."""
    rec = {"tried": [first]}
    if first["ok"]:
        return first["backend"], {**rec, "backend": first["backend"]}
    if fallback is not None:
        second = fallback.result(60.0)
        rec["tried"].append(second)
        if second["ok"]:
            return second["backend"], {**rec, "backend": second["backend"],
                                       "fallback": f"{first['backend']} failed: the configs use {second['backend']}"}
    return first["backend"], {**rec, "backend": first["backend"], "fallback": None}


# ------------------------------------------------------------------------------------------ warm imports
WARM_MODULES = ("sympy", "torch._dynamo", "torch._inductor", "torch._inductor.config", "torch._inductor.compile_fx",
                "torch._inductor.codegen.triton", "torch._inductor.codegen.wrapper", "torch._functorch.aot_autograd",
                "triton", "triton.language", "torch.distributed.fsdp", "torch.profiler",
                "torch.nn.attention.flex_attention", "torch.nn.attention.varlen", "torch.utils._python_dispatch",
                "model.qwen2_vl", "model.loss", "model.flops", "model.parity", "parallel", "train.trainer",
                "train.dry_run", "tiny_corpus", "transformers")


def preimport(modules: tuple[str, ...] = WARM_MODULES) -> dict[str, str]:
    """Import what the parts use; an alarm that lands inside an import leaves a half-initialized module behind
    (seen: sympy), which breaks every later part. Returns {module: error} for those that failed (the part that
    needs one records its own error)."""
    failed = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as ex:  # noqa: BLE001 - recorded; e.g. triton is absent on CPU-only machines
            failed[name] = f"{type(ex).__name__}: {ex}"[:200]
    return failed


def warm_compile(device: Any) -> dict[str, Any]:
    """Compile and differentiate a tiny function with dynamic shapes, as the configs do (inductor on CUDA,
    aot_eager on CPU), and run the loss head once per dtype: the compile workers, Triton's first kernel build,
    the loss head's chunk kernels and dynamo's caches start here, not under a part's alarm. Returns its time
    (or its error)."""
    import torch

    backend = "inductor" if device.type == "cuda" else "aot_eager"
    t0 = time.perf_counter()
    try:
        def f(x, w):
            return torch.nn.functional.silu(x @ w).sum(-1)

        cf = torch.compile(f, backend=backend, dynamic=True)
        for n in (16, 24):  # two lengths: the dynamic graph is the one reused
            x = torch.randn(n, 32, device=device)
            w = torch.randn(32, 32, device=device, requires_grad=True)
            cf(x, w).sum().backward()
        # The loss head's chunk kernels, compiled on CUDA even in eager configs (model/loss.py chunk_fns): their
        # first build here, in both dtypes (later builds hit inductor's caches).
        from model.loss import lm_loss

        for dt in (torch.float32, torch.bfloat16):
            h = torch.randn(24, 32, device=device, dtype=dt, requires_grad=True)
            w = torch.randn(64, 32, device=device, dtype=dt, requires_grad=True)
            lm_loss(h, w, torch.randint(0, 64, (24,), device=device), chunk_size=16)[0].backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as ex:  # noqa: BLE001 - recorded; the compiled parts then fail with their own errors
        return {"backend": backend, "error": f"{type(ex).__name__}: {ex}"[:500]}
    finally:
        torch._dynamo.reset()  # the configs start from an empty dynamo cache
    return {"backend": backend, "seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------ dynamo
def raise_recompile_limits(limit: int = RECOMPILE_LIMIT, accumulated: int = ACCUMULATED_RECOMPILE_LIMIT) -> dict:
    """Raise dynamo's per-code recompile limit (named cache_size_limit before torch 2.6) and its accumulated
    limit; returns the values set."""
    import torch._dynamo.config as dc

    out = {}
    for names, value in ((("recompile_limit", "cache_size_limit"), limit),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), accumulated)):
        name = next(n for n in names if hasattr(dc, n))
        setattr(dc, name, value)
        out[name] = value
    return out


class _LimitHits(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if re.search(r"hit config\.\w+", msg):
            self.hits.append(" ".join(msg.split("\n")[:3])[:300])


def _code_objects(blocks: list[Any]) -> list[Any]:
    import torch

    codes = {torch.nn.Module._call_impl.__code__, torch.nn.Module._wrapped_call_impl.__code__}
    codes |= {type(b).forward.__code__ for b in blocks}
    return sorted(codes, key=lambda c: (c.co_filename, c.co_firstlineno))


def cache_entries(blocks: list[Any]) -> int | None:
    """Dynamo cache entries (compiled variants) on the code objects a compiled block runs through; None where
    this torch has no way to list them (the limit-hit warnings are read either way)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        return sum(len(_debug_get_cache_entry_list(c)) for c in _code_objects(blocks))
    except Exception:  # noqa: BLE001 - a private debugging helper: its absence must not stop a measurement
        return None


class DynamoWatch:
    """Compiles and recompile-limit hits between start() and stop(): the cache entries added on the compiled
    blocks' code, dynamo's unique-graph counter, and every 'hit config.recompile_limit' warning."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self) -> None:
        self.handler = _LimitHits()
        self.blocks: list[Any] = []
        self.entries0: int | None = 0
        self.graphs0 = 0

    def start(self, blocks: list[Any]) -> DynamoWatch:
        from torch._dynamo.utils import counters

        self.blocks = blocks
        self.entries0 = cache_entries(blocks)
        self.graphs0 = int(counters["stats"].get("unique_graphs", 0))
        logging.getLogger(self.LOGGER).addHandler(self.handler)
        return self

    def stop(self) -> dict[str, Any]:
        import torch._dynamo.config as dc
        from torch._dynamo.utils import counters

        logging.getLogger(self.LOGGER).removeHandler(self.handler)
        limit = getattr(dc, "recompile_limit", getattr(dc, "cache_size_limit", None))
        entries = cache_entries(self.blocks)
        return {"cache_entries_added": None if entries is None or self.entries0 is None else entries - self.entries0,
                "unique_graphs_added": int(counters["stats"].get("unique_graphs", 0)) - self.graphs0,
                "recompile_limit": limit, "limit_hits": list(self.handler.hits)}

