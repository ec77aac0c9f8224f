"""python benchmarks/gpu_suite.py --out DIR           # one H200 (or H100): correctness, then MFU, <= 540 s
python benchmarks/gpu_suite.py --out DIR --cpu     # the same code paths on tiny shapes (CI runs it)

The one prepared GPU command of issues 10 and 19 (docs/perf/README.md gives it exactly). It downloads nothing;
it writes DIR/report.json and DIR/report.md (device, versions, date) after every part, so a run cut short, or a
part that fails (its error is recorded, the others still run), still leaves a report; commit it under docs/perf/.

Before any part's alarm is armed (benchmarks/suite_setup.py): the pinned transformers oracle is put in place
(from a wheel carried in .whl/ when the machine has another version; else the mismatch is reported), the parts'
modules, inductor and triton are imported, a tiny function is compiled and differentiated, and dynamo's
recompile limit is raised (each compiled config reports its compiles and any limit hit).

Parts, the answer first (docs/perf/README.md says what each measures and its tolerance):
  env          device, versions, attention kernels, a measured bf16 matmul rate; a 1-rank NCCL smoke test in a
               child process (gloo for the configs when NCCL fails)
  parity       model.parity against transformers on a tiny random checkpoint: fp32 (tol 1e-4) and bf16
  a_eager      config (a): throughput, MFU (3 conventions, named by what they count), peak memory vs the dry
               run's estimate
  a_compiled   config (a) with parallel.compile; its compile time decides which later compiled configs run
  a_profile    config (a): step time split, top-15 kernels (torch.profiler), host-device syncs in one step
  backends     every attention backend against an fp32 per-segment SDPA reference on packed ViT and LLM
               shapes, forward and backward, with timings, then the whole model per backend; flex last, in a
               child process that is killed if its compiles outlast the share, timed with a prebuilt block mask
  golden       30 steps of the tiny golden recipe through train.trainer (loader, process group, prefetcher,
               fused AdamW) against the CPU losses recorded in tests/assets/tiny_train_losses.json
  gpu_tests    pytest -m gpu on the test files that hold GPU-marked tests, minus the flex cases (backends
               covers them); on a GPU every selected test must pass (the optional flash-attn case may skip)
  loss_head    the chunked fused loss head in bf16 against fp32 (agreement and time)
  b, c, d, e   configs (b)-(e), eager then compiled, each in half the part's share; a compiled mode whose half
               is shorter than (a)'s compile time is skipped
  ac_limits    the largest microbatch of config (a) that fits, per activation-checkpointing policy

Every throughput step runs MICROBATCHES_PER_STEP (4) microbatches (gradient accumulation). A config (or its
no-AC mode) that the dry run's estimate puts above the device's free memory is skipped (or run with full AC)
instead of spending its share on an out-of-memory error; an out-of-memory step without AC is recorded and the
config runs again with full AC, after the failed attempt's memory is released.

Time: --time-limit (default 540 s GPU, 150 s CPU; plus ~5 s of Python and torch start-up before the clock) is
shared out by fixed weights; a part stops when its share is spent (a SIGALRM interrupts it; it keeps what it
measured) and unspent time goes to the parts after it. The alarm never lands inside a compile: while a
compiled config warms up it is deferred to the end of the warm-up. A watchdog ends the process 20 s after the
limit whatever is running; the report written so far stays.

Verdicts: the correctness parts (parity, backends, golden, gpu_tests, loss_head) pass or FAIL; report.json's
meta.correctness sums them up: a part cut short by its share has no verdict ('incomplete', not a failure of
the code), and gpu_tests on a machine without CUDA is 'not run' and left out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import suite_setup as SS  # noqa: E402
import suite_workloads as W  # noqa: E402
import torch  # noqa: E402
from suite_backends import backend_checks  # noqa: E402
from suite_report import markdown  # noqa: E402

# Relative weights of the parts' time shares (GPU; --cpu uses CPU_WEIGHTS), in the order the parts run.
WEIGHTS = {"env": 15, "parity": 30, "a_eager": 35, "a_compiled": 110, "a_profile": 30, "backends": 55,
           "golden": 30, "gpu_tests": 35, "loss_head": 10, "b": 40, "c": 35, "d": 40, "e": 35, "ac_limits": 40}
CPU_WEIGHTS = {"env": 6, "parity": 8, "a_eager": 4, "a_compiled": 32, "a_profile": 5, "backends": 14,
               "golden": 12, "gpu_tests": 12, "loss_head": 1, "b": 3, "c": 3, "d": 3, "e": 3, "ac_limits": 5}
CORRECTNESS = ("parity", "backends", "golden", "gpu_tests", "loss_head")
"""The parts with a pass / FAIL verdict (meta.correctness)."""
BF16_U = 2.0**-8
"""bf16 unit roundoff (8 significand bits)."""
PARITY_TOL = {"fp32": 1e-4, "bf16_rel": 8 * BF16_U}
"""model.parity: fp32 max |logit diff| <= 1e-4 (its default); bf16 <= 8 bf16 ulps of the largest |logit|."""
LOSS_HEAD_TOL = {"loss_rel": 2 * BF16_U, "grad_rel": 4 * BF16_U}
"""bf16 loss head vs fp32: loss within 2 ulps, gradients (relative L2) within 4 ulps of bf16."""
FIT_MARGIN = 0.95
"""A config runs when the dry run's estimate is at most this share of the device's free memory (the estimate
leaves out the caching allocator's fragmentation and cuBLAS / NCCL workspaces: docs/perf/README.md)."""


class PartTimeout(BaseException):
    """A part's time share is spent (a BaseException: the parts' `except Exception` must not swallow it)."""


# ------------------------------------------------------------------------------------------ the runner
class Suite:
    active: Suite | None = None
    """The suite whose parts are running (the alarm handler defers to its compile sections)."""

    def __init__(self, out: Path, cpu: bool, time_limit: float) -> None:
        self.out, self.cpu, self.time_limit = out, cpu, time_limit
        self.device = torch.device("cpu") if cpu else torch.device("cuda", 0)
        self.t0 = time.perf_counter()
        self.report: dict[str, Any] = {"meta": {}, "parts": {}}
        self.lock = threading.Lock()
        self.current: str | None = None
        self.deadline = 0.0
        self.backend = "gloo" if cpu else "nccl"
        """Process-group backend of the configs (gloo when NCCL failed env's smoke test)."""
        self.compile_s: float | None = None
        """Compile time of config (a) (a_compiled): later compiled modes with a shorter share are skipped."""
        self.compile_depth = 0
        self.alarm_pending = False
        self.in_part = False
        self.smoke: SS.ProcessGroupSmoke | None = None
        """The process group's smoke test, started by main before the setup, read by env."""

    def left(self) -> float:
        return self.time_limit - (time.perf_counter() - self.t0)

    def write(self) -> None:
        with self.lock:
            self.report["meta"]["wall_s"] = round(time.perf_counter() - self.t0, 2)
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / "report.json.tmp"
            tmp.write_text(json.dumps(self.report, indent=1, default=str))
            tmp.replace(self.out / "report.json")
            (self.out / "report.md").write_text(markdown(self.report))

    @contextlib.contextmanager
    def alarm_deferred(self):
        """A section the part's alarm must not cut: a compile (an alarm inside dynamo / inductor could leave
        their state half-updated for every later part) or the process-group decision. An alarm that rings inside
        is raised when the section ends."""
        self.compile_depth += 1
        try:
            yield
        finally:
            self.compile_depth -= 1
        if self.compile_depth == 0 and self.alarm_pending:
            self.alarm_pending = False
            raise PartTimeout()

    def run(self, parts: dict[str, Callable[[Suite, dict], None]], weights: dict[str, float]) -> None:
        names = list(parts)
        Suite.active = self
        for i, name in enumerate(names):
            rest = sum(weights[n] for n in names[i:])
            share = max(1.0, self.left() * weights[name] / rest)
            rec: dict[str, Any] = {"status": "running", "share_s": round(share, 1)}
            self.report["parts"][name] = rec
            self.current = name
            if self.left() < 1.0:
                rec["status"] = "skipped: the suite's time limit was reached"
                self.write()
                continue
            t = time.perf_counter()
            self.deadline = t + share
            self.alarm_pending = False
            self.in_part = True
            signal.setitimer(signal.ITIMER_REAL, share)
            try:
                try:
                    parts[name](self, rec)
                    rec["status"] = rec.get("verdict", "ok")
                except Exception as ex:  # noqa: BLE001 - one failing part must not stop the suite
                    self.in_part = False
                    rec["status"] = "error"
                    rec["error"] = f"{type(ex).__name__}: {ex}"[:2000]
                    rec["traceback"] = traceback.format_exc()[-4000:]
            except PartTimeout:  # (outside: also an alarm that rang while an error was being recorded)
                rec["status"] = "stopped: time share spent (what it measured is kept)"
            finally:
                self.in_part = False  # from here on the alarm raises nothing (_alarm)
                signal.setitimer(signal.ITIMER_REAL, 0)
                self.alarm_pending = False
                W.free_engine(None)
            rec["seconds"] = round(time.perf_counter() - t, 2)
            print(f"[gpu_suite] {name}: {rec['status']} ({rec['seconds']} s)", flush=True)
            self.write()
        self.current = None
        Suite.active = None


def _alarm(signum, frame):  # noqa: ARG001
    s = Suite.active
    if s is not None and not s.in_part:
        return  # the part has ended: its bookkeeping must not be cut
    if s is not None and s.compile_depth > 0:
        s.alarm_pending = True  # raised when the section ends (Suite.alarm_deferred)
        return
    raise PartTimeout()


def _watchdog(suite: Suite, grace: float) -> None:
    while True:
        time.sleep(1.0)
        if suite.left() < -grace:
            rec = suite.report["parts"].get(suite.current or "", {})
            rec["status"] = "killed: the suite's hard limit was reached"
            try:
                suite.write()
            finally:
                print("[gpu_suite] hard time limit reached: exiting", flush=True)
                os._exit(3)


def correctness(parts: dict[str, dict]) -> dict[str, Any]:
    """The correctness verdict over CORRECTNESS: 'pass' when every part that ran passed, 'FAIL' when one failed
    or raised, else 'incomplete' when one was cut short or skipped; a part 'not run' (gpu_tests without CUDA)
    is left out."""
    out: dict[str, Any] = {"failed": [], "incomplete": [], "not_run": [], "passed": []}
    for name in CORRECTNESS:
        if name not in parts:
            continue
        st = str(parts[name].get("status"))
        key = ("passed" if st.startswith("pass") else "not_run" if st.startswith("not run")
               else "failed" if st.startswith(("FAIL", "error")) else "incomplete")
        out[key].append(name)
    out["verdict"] = "FAIL" if out["failed"] else "incomplete" if out["incomplete"] else "pass"
    return out


# ------------------------------------------------------------------------------------------ parts
def part_env(s: Suite, rec: dict) -> None:
    from model.attention import _torch_varlen, _torch_varlen_params, available_backends
    from train.metrics import device_peak_tflops

    dev = s.device

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    rec.update(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        triton=version("triton") or version("pytorch-triton"), transformers=version("transformers"),
        flash_attn=version("flash-attn"), python=platform.python_version(),
        backends_bf16=available_backends(dev, torch.bfloat16), backends_fp32=available_backends(dev, torch.float32),
        torch_varlen_kwargs=sorted(_torch_varlen_params()) if _torch_varlen() is not None else None,
        peak_bf16_tflops=device_peak_tflops(dev), cpu_threads=torch.get_num_threads(),
        setup=s.report["meta"].get("setup"),
    )
    if dev.type == "cuda":
        rec["gpu_memory_gb"] = round(torch.cuda.get_device_properties(dev).total_memory / 1e9, 1)
    # The achievable dense bf16 rate on this device (random data), to read MFU against.
    n, reps = (8192, 10) if dev.type == "cuda" else (512, 3)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    W.sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    W.sync(dev)
    rec["matmul_bf16_tflops_measured"] = round(2 * n**3 * reps / (time.perf_counter() - t) / 1e12, 2)
    rec["matmul_n"] = n
    del a, b
    # The smoke test started with the suite (main), in a child; the configs' backend is decided here, whatever
    # the share says (the alarm waits).
    with s.alarm_deferred():
        first = s.smoke.result(max(30.0, s.deadline - time.perf_counter()))
        fallback = SS.ProcessGroupSmoke("gloo", s.smoke.device) if not first["ok"] and s.backend != "gloo" else None
        s.backend, rec["process_group"] = SS.choose_backend(first, fallback)
    s.report["meta"].update({k: rec[k] for k in ("device", "torch", "cuda", "triton")}, backend=s.backend)
    if not first["ok"]:
        err = first.get("error", "")[:300]
        rec["verdict"] = f"FAIL ({first['backend']} smoke test: {err}; the configs use {s.backend})"


def part_parity(s: Suite, rec: dict) -> None:
    from model.parity import make_tiny_checkpoint, run_parity

    oracle = (s.report["meta"].get("setup") or {}).get("oracle") or {}
    rec["oracle"] = {k: oracle.get(k) for k in ("pinned", "installed", "used", "mismatch", "error") if oracle.get(k)}
    note = (f" (against transformers {oracle.get('used')}, pinned {oracle.get('pinned')})"
            if oracle.get("used") != oracle.get("pinned") else "")
    dev = s.device.type
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_checkpoint(tmp)
        worst, res = run_parity(tmp, tol=PARITY_TOL["fp32"], dtype="fp32", device=dev, print_fn=lambda _: None)
        rec["fp32"] = {"max_abs_logit_diff": worst, "tol": PARITY_TOL["fp32"], "ok": worst <= PARITY_TOL["fp32"],
                       "cases": {r.name: r.max_abs_diff for r in res}}
        if s.cpu:
            # On CPU transformers and this model run the same bf16 kernels (bitwise equal logits): the bf16 check
            # means something on CUDA only, where our varlen kernel meets transformers' SDPA.
            rec["bf16"] = {"ok": True, "note": "GPU only"}
            rec["verdict"] = ("pass" if rec["fp32"]["ok"] else "FAIL") + note
            return
        worst, res = run_parity(tmp, tol=1.0, dtype="bf16", device=dev, print_fn=lambda _: None)
        scale = max(r.max_abs_logit for r in res)
        tol = PARITY_TOL["bf16_rel"] * max(scale, 1.0)
        rec["bf16"] = {"max_abs_logit_diff": worst, "tol": tol, "ok": worst <= tol, "max_abs_logit": scale,
                       "cases": {r.name: r.max_abs_diff for r in res}}
    rec["verdict"] = ("pass" if rec["fp32"]["ok"] and rec["bf16"]["ok"] else "FAIL") + note


def part_backends(s: Suite, rec: dict) -> None:
    from model.attention import available_backends

    dtype = torch.float32 if s.cpu else torch.bfloat16
    order = _order(available_backends(s.device, dtype, training=False))
    res = backend_checks(s.device, [b for b in order if b != "flex"])
    rec.update(res)
    s.write()
    if "flex" in order:
        # Last, in a child process: flex compiles its kernels on first use on CUDA (cold Triton builds); a child
        # that outlasts the share is killed cleanly, with nothing half-compiled left in this process.
        flex = _flex_child(s, timeout=s.deadline - time.perf_counter() - 2)
        rec["flex_child"] = {k: v for k, v in flex.items() if k not in ("kernels", "model")}
        for kind, r in (flex.get("kernels") or {}).items():
            rec["kernels"][kind]["flex"] = r.get("flex", {"ok": None, "error": "missing"})
        if "model" in flex:
            rec["model"]["flex"] = flex["model"].get("flex", {"ok": None, "error": "missing"})
    ok, unsupported = True, []
    for where, group in [*[(k, v) for k, v in rec["kernels"].items()], ("model", rec["model"])]:
        for b, r in group.items():
            if isinstance(r, dict) and "ok" in r:
                ok &= r["ok"] is not False
                if r["ok"] is None:
                    unsupported.append(f"{where}/{b}")
    if any(u.endswith("/sdpa") for u in unsupported):
        ok = False
    rec["unsupported"] = unsupported
    extra = [f"raised, see records: {unsupported}"] if unsupported else []
    if "flex_child" in rec and not rec["flex_child"].get("ok"):
        extra.append(f"flex: {rec['flex_child'].get('error', 'did not finish')}"[:200])
    rec["verdict"] = ("pass" + (f" ({'; '.join(extra)})" if extra else "")) if ok else "FAIL"


def _flex_child(s: Suite, timeout: float) -> dict[str, Any]:
    """backend_checks(['flex']) in a child process (`--flex-child`), killed after `timeout` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--flex-child", "--out", tmp,
               *(["--cpu"] if s.cpu else [])]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = p.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            return {"ok": False, "error": f"not done in its {timeout:.0f} s: killed (compiles outlasted the share)",
                    "seconds": round(time.perf_counter() - t0, 1), "tail": (out or "")[-1500:]}
        res = Path(tmp) / "flex.json"
        if p.returncode != 0 or not res.exists():
            return {"ok": False, "error": f"exit {p.returncode}", "tail": (out or "")[-1500:],
                    "seconds": round(time.perf_counter() - t0, 1)}
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 1), **json.loads(res.read_text())}


def _order(backends: list[str]) -> list[str]:
    """The reference first, flex (compiles on first use) last, so a share cut short still compares the rest."""
    rank = {"sdpa": 0, "torch_varlen": 1, "flash": 2, "flex": 3}
    return sorted(backends, key=lambda b: rank.get(b, 9))


def part_golden(s: Suite, rec: dict) -> None:
    from tiny_corpus import GOLDEN_ASSET, compare_losses, make_tiny_corpus, run_golden

    want = json.loads(GOLDEN_ASSET.read_text())
    tol = want["tolerance"]["cpu" if s.cpu else "cuda"]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's Conv3d
    with tempfile.TemporaryDirectory() as tmp:
        got = run_golden(make_tiny_corpus(Path(tmp) / "corpus"), Path(tmp) / "run", s.device.type, s.backend)
    ok, worst, msg = compare_losses(got["losses"], want["losses"], tol["first_step_rtol"], tol["rtol"])
    rec.update(got, recorded_with=want["torch"], tolerance=tol, worst_rel=worst, comparison=msg, ok=ok,
               recorded_first_last=[want["losses"][0], want["losses"][-1]])
    verdict = "pass" if ok and got["backend"] == s.backend else "FAIL"
    if not s.cpu and s.backend != "nccl":
        verdict += " (gloo: NCCL failed its smoke test, see env)"
    rec["verdict"] = verdict


GPU_TEST_DESELECT = "not flex"
"""`-k` expression of the gpu_tests part: the flex cases are the backends part's (compiled there, in a child)."""


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def part_gpu_tests(s: Suite, rec: dict) -> None:
    files = gpu_test_files()
    rec["files"] = files
    rec["deselected"] = f"-k '{GPU_TEST_DESELECT}'"
    if s.cpu:
        # No CUDA: the tests would only skip. Collect them (their files import, the selection is what a GPU runs)
        # and record the part as not run: it is left out of the correctness verdict.
        p = _pytest(s, ["--collect-only", "-q", "-m", "gpu", "-k", GPU_TEST_DESELECT, *files], None)
        ids = [ln.strip() for ln in p["out"].splitlines() if "::" in ln]
        rec.update(returncode=p["returncode"], collected=ids, tail=p["out"][-1500:])
        if p["returncode"] != 0 or not ids:
            raise RuntimeError(f"collecting the GPU tests failed (exit {p['returncode']}): {p['out'][-800:]}")
        rec["verdict"] = f"not run (no CUDA; {len(ids)} GPU tests collected)"
        return
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "gpu_tests.xml"
        p = _pytest(s, ["-q", "-m", "gpu", "-k", GPU_TEST_DESELECT, "-rs", f"--junitxml={xml}", *files], xml)
    rec.update(returncode=p["returncode"], tail=p["out"][-3000:], cases=p["cases"])
    rec["verdict"] = gpu_tests_verdict(p["cases"], p["returncode"])


def _pytest(s: Suite, args: list[str], xml: Path | None) -> dict[str, Any]:
    """pytest in a child (this suite's PYTHONPATH, the oracle's folder first) until the part's deadline; with
    `xml`, the per-test outcomes read from its JUnit report."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pp, str(ROOT)])}
    timeout = max(5.0, s.deadline - time.perf_counter() - 3)
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as ex:
        out = ex.stdout.decode(errors="replace") if isinstance(ex.stdout, bytes) else (ex.stdout or "")
        s.report["parts"][s.current or ""]["tail"] = out[-3000:]
        raise PartTimeout() from None
    cases = junit_cases(xml) if xml is not None and xml.exists() else []
    return {"returncode": p.returncode, "out": p.stdout + p.stderr, "cases": cases}


def junit_cases(xml: Path) -> list[dict[str, str]]:
    """[{'id', 'outcome' (passed|failed|error|skipped), 'message'}] of a pytest JUnit XML report."""
    out = []
    for tc in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (el.get("message") or el.text or "")[:300]
                break
        out.append({"id": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome, "message": message})
    return out


def _optional_skip(case: dict[str, str]) -> bool:
    """The one skip a GPU run allows: the flash-attn case when flash_attn is not installed (an optional extra)."""
    return case["outcome"] == "skipped" and "[flash]" in case["id"] and "flash" in case["message"].lower()


def gpu_tests_verdict(cases: list[dict[str, str]], returncode: int) -> str:
    """On a GPU every selected GPU test must pass (passed == collected), the optional flash-attn case aside: a
    failure, an error, any other skip, or no test at all is a FAIL."""
    passed = sum(c["outcome"] == "passed" for c in cases)
    optional = sum(_optional_skip(c) for c in cases)
    bad = [f"{c['id']}: {c['outcome']} {c['message'][:120]}".strip() for c in cases
           if c["outcome"] != "passed" and not _optional_skip(c)]
    if not cases:
        return f"FAIL (no GPU test ran; pytest exit {returncode})"
    if bad or returncode not in (0,) or passed + optional != len(cases):
        return f"FAIL ({passed} of {len(cases)} passed; " + "; ".join(bad[:4]) + ")"
    return f"pass ({passed} of {len(cases)}" + (", flash-attn not installed: its case skipped)" if optional else ")")


def part_loss_head(s: Suite, rec: dict) -> None:
    S, D, V = (256, 64, 1024) if s.cpu else (8192, 1536, 151936)
    rec.update(W.loss_head_check(s.device, S, D, V, reps=2 if s.cpu else 5))
    rec["tolerance"] = LOSS_HEAD_TOL
    ok = rec["loss_rel"] <= LOSS_HEAD_TOL["loss_rel"] and max(rec["grad_h_rel"], rec["grad_w_rel"]) <= (
        LOSS_HEAD_TOL["grad_rel"])
    rec["verdict"] = "pass" if ok else "FAIL"


def _fits(s: Suite, w: W.Workload, mb, ac: str) -> tuple[bool, float | None, float | None]:
    """(fits, dry-run estimate GB, free device GB): whether the dry run's estimate of config w with AC `ac` is
    within FIT_MARGIN of the device's free memory (always True on CPU, where there is no device limit)."""
    errs: list[str] = []
    est = W.run_with(lambda: W.dry_run_estimate(w, s.device, mb, ac), errs)
    if s.device.type != "cuda" or est is None:
        return True, est, None
    W.free_engine(None)
    free = torch.cuda.mem_get_info(s.device)[0] / 1e9
    return est <= FIT_MARGIN * free, est, round(free, 1)


def _throughput(s: Suite, rec: dict, w: W.Workload, *, compile: bool, deadline: float) -> None:
    """Build config w, time it, and fill rec: throughput, three MFUs, peak memory vs the dry run. A config whose
    estimate does not fit the device is skipped (without AC: run with full AC instead). Without activation
    checkpointing, an out-of-memory step is recorded and the config runs again with full AC."""
    pool = [W.synth_microbatch(W.model_config(w), w, seed=i) for i in range(W.MICROBATCHES_PER_STEP)]
    fits, est, free = _fits(s, w, pool[0], w.ac)
    if not fits and w.ac == "none":
        rec["skipped_without_ac"] = f"dry-run estimate {est:.1f} GB > {FIT_MARGIN} x {free} GB free: full AC"
        w = dataclasses.replace(w, ac="full")
        fits, est, free = _fits(s, w, pool[0], w.ac)
    if not fits:
        rec["skipped"] = f"dry-run estimate {est:.1f} GB with AC {w.ac} > {FIT_MARGIN} x {free} GB free"
        return
    oom = None
    try:
        _throughput_once(s, rec, w, pool, est, compile=compile, deadline=deadline)
    except torch.cuda.OutOfMemoryError as ex:
        if w.ac != "none":
            raise
        oom = str(ex).split("\n")[0][:300]
    if oom is None:
        return
    # Retried here, after the handler: inside it the exception's traceback would keep the failed attempt's
    # frames (its model, activations, gradients) alive through the retry.
    W.free_engine(None)  # gc.collect() + torch.cuda.empty_cache()
    skipped = rec.get("skipped_without_ac")
    rec.clear()
    rec["oom_without_ac"] = oom
    if skipped:
        rec["skipped_without_ac"] = skipped
    w = dataclasses.replace(w, ac="full")
    est = W.run_with(lambda: W.dry_run_estimate(w, s.device, pool[0], w.ac), [])
    _throughput_once(s, rec, w, pool, est, compile=compile, deadline=deadline)


def _throughput_once(s: Suite, rec: dict, w: W.Workload, pool: list, est: float | None, *, compile: bool,
                     deadline: float) -> None:
    dev = s.device
    W.free_engine(None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    backend = "aot_eager" if s.cpu else "inductor"
    e = W.build_engine(w, dev, compile=compile, compile_backend=backend, ac=w.ac, backend=s.backend)
    watch = None
    try:
        from model.attention import resolve_backend

        rec["activation_checkpoint"] = w.ac
        rec.update(params=e.n_params, build_s=round(e.build_s, 2), fused_adamw=e.fused_adamw,
                   compile=(backend if compile else False), trainable=e.trainable,
                   attn_backend=resolve_backend(e.mcfg.attn_backend, dev, torch.bfloat16),
                   microbatch={"tokens": pool[0].num_tokens, "patches": pool[0].num_patches,
                               "samples": len(pool[0].cu_seqlens) - 1, "supervised": pool[0].num_supervised})
        if compile:
            watch = SS.DynamoWatch().start([b for _, b in e.pm.module.transformer_blocks()])
        W.timed_steps(e, pool, warmup=3 if compile else 2, max_steps=3 if s.cpu else 10, deadline=deadline,
                      record=rec, warmup_guard=s.alarm_deferred if compile else contextlib.nullcontext)
        peak = s.report["parts"]["env"].get("peak_bf16_tflops")
        if peak and "tflops_doc_causal_per_s" in rec:  # the conventions: benchmarks/suite_workloads.py
            rec.update({f"mfu_{k}": round(rec[f"tflops_{k}_per_s"] / peak, 4)
                        for k in ("doc_causal", "packed_full", "llm_doc_causal")})
        rec["peak_gb"] = W.peak_memory(dev)
        rec["dry_run_gb"] = est
        if est and rec["peak_gb"]:
            rec["peak_over_estimate"] = round(rec["peak_gb"] / est, 3)
    finally:
        if watch is not None:
            rec["dynamo"] = watch.stop()
            if rec["dynamo"]["limit_hits"]:
                rec["error"] = ("dynamo hit its recompile limit: blocks ran eager, the compiled figures are not "
                                f"compiled ones ({rec['dynamo']['limit_hits'][0][:200]})")
        W.free_engine(e)
        del e
        if dev.type == "cuda":
            rec["allocated_after_free_gb"] = round(torch.cuda.memory_allocated(dev) / 1e9, 3)


def compile_seconds(compiled: dict[str, Any], eager: dict[str, Any]) -> float | None:
    """Compile time of a compiled run: its warm-up time minus as many eager steps (the eager median step), or
    the whole warm-up when no eager figure exists."""
    warm = compiled.get("warmup_s")
    if not warm:
        return None
    step = (eager.get("step_ms_median") or 0.0) / 1e3
    return round(max(sum(warm) - len(warm) * step, 0.0), 2)


def _config_part(key: str, compile_modes: tuple[bool, ...]) -> Callable[[Suite, dict], None]:
    def part(s: Suite, rec: dict) -> None:
        w = W.workloads(s.cpu)[key]
        rec["config"] = W.describe(w)
        start, end = time.perf_counter(), s.deadline
        modes = compile_modes
        if s.cpu and key != "a":
            # --cpu compiles config (a) only: the compiled path is the same code for every config, and CPU
            # compilation costs seconds per graph (a GPU run compiles every config).
            modes = tuple(m for m in compile_modes if not m)
            rec["compiled"] = {"skipped": "--cpu compiles config (a) only (a_compiled)"}
        for i, mode in enumerate(modes):
            # Each mode gets an equal slice of what is left of the share, and stops timing when it is spent.
            sub_deadline = time.perf_counter() + (end - time.perf_counter()) / (len(modes) - i)
            sub = rec.setdefault("compiled" if mode else "eager", {})
            if mode and key != "a":
                why = _compile_skip(s, sub_deadline - time.perf_counter())
                if why:
                    sub["skipped"] = why
                    continue
            try:
                _throughput(s, sub, w, compile=mode, deadline=sub_deadline - 2)
            except PartTimeout:
                raise
            except Exception as ex:  # noqa: BLE001 - record and go on to the other mode
                sub["error"] = f"{type(ex).__name__}: {ex}"[:2000]
                sub["traceback"] = traceback.format_exc()[-3000:]
            finally:  # also when the share ran out right after the warm-up
                if key == "a" and mode:
                    s.compile_s = compile_seconds(sub, s.report["parts"].get("a_eager", {}).get("eager", {}))
                    sub["compile_s"] = s.compile_s
        rec["seconds_used"] = round(time.perf_counter() - start, 1)
        if any("error" in rec.get(m, {}) for m in ("eager", "compiled")):
            rec["verdict"] = "error in a mode (see its record)"

    return part


def _compile_skip(s: Suite, share: float) -> str | None:
    """Why a compiled mode with `share` seconds is not run (None: run it): its share must cover the compile time
    measured on config (a)."""
    if s.compile_s is None:
        return "config (a)'s compile time is unknown (a_compiled did not finish its warm-up)"
    if share < s.compile_s:
        return f"its share ({share:.0f} s) is below config (a)'s compile time ({s.compile_s:.0f} s)"
    return None


def part_a_profile(s: Suite, rec: dict) -> None:
    w = W.workloads(s.cpu)["a"]
    e = W.build_engine(w, s.device, backend=s.backend)
    try:
        pool = [W.synth_microbatch(e.mcfg, w, seed=i) for i in range(W.MICROBATCHES_PER_STEP)]
        W.train_step(e, pool)  # warm up (allocator, cuBLAS handles, first-call overheads)
        W.sync(s.device)
        rec["microbatches_per_step"] = len(pool)
        rec["split_ms"] = W.step_split(e, pool)
        errs: list[str] = []
        rec["kernels"] = W.run_with(lambda: W.top_kernels(e, pool), errs)
        rec["syncs"] = W.run_with(lambda: W.count_syncs(e, pool), errs)
        rec["precision"] = W.run_with(lambda: W.precision_check(e, pool[0]), errs)
        if errs:
            rec["errors"] = errs
    finally:
        W.free_engine(e)


def part_ac_limits(s: Suite, rec: dict) -> None:
    w = W.workloads(s.cpu)["a"]
    sizes = [256, 512, 1024, 2048] if s.cpu else [8192, 16384, 32768, 65536, 131072]
    policies = ("none", "selective", "full")
    for i, ac in enumerate(policies):
        sub = rec.setdefault(ac, {})
        dl = time.perf_counter() + (s.deadline - time.perf_counter()) / (len(policies) - i)
        try:
            W.largest_microbatch(w, s.device, ac, sizes, dl, sub, backend=s.backend)
        except PartTimeout:
            raise
        except Exception as ex:  # noqa: BLE001
            sub["error"] = f"{type(ex).__name__}: {ex}"[:1000]
    if s.cpu:
        rec["note"] = "CPU: no device memory limit, every size runs (the code path is what is checked)"
    if any("error" in rec.get(p, {}) for p in policies):
        rec["verdict"] = "error in a policy (see its record)"


PARTS: dict[str, Callable[[Suite, dict], None]] = {
    "env": part_env, "parity": part_parity,
    "a_eager": _config_part("a", (False,)), "a_compiled": _config_part("a", (True,)), "a_profile": part_a_profile,
    "backends": part_backends, "golden": part_golden, "gpu_tests": part_gpu_tests, "loss_head": part_loss_head,
    "b": _config_part("b", (False, True)), "c": _config_part("c", (False, True)),
    "d": _config_part("d", (False, True)), "e": _config_part("e", (False, True)),
    "ac_limits": part_ac_limits,
}
"""The parts in the order they run: the answer (parity, config (a)) first."""


# ------------------------------------------------------------------------------------------ main
def setup(s: Suite) -> dict[str, Any]:
    """Everything before the first alarm (see suite_setup): the oracle, imports, dynamo limits, a tiny compile."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    # The check builds and saves parity's tiny checkpoint with the carried transformers, on this machine's packages.
    check = (f"import sys, tempfile; sys.path.insert(0, {str(ROOT)!r})\n"
             "from model.parity import make_tiny_checkpoint; make_tiny_checkpoint(tempfile.mkdtemp())")
    out["oracle"] = SS.use_pinned_wheel("transformers", SS.pinned_version("transformers"), check=check)
    out["preimport_failed"] = SS.preimport()
    out["recompile_limits"] = SS.raise_recompile_limits()
    out["warm_compile"] = SS.warm_compile(s.device)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def flex_child(out: Path, cpu: bool) -> int:
    """`--flex-child`: backend_checks(['flex']) for the backends part's child process; writes out/flex.json."""
    if cpu:
        torch.set_num_threads(1)
    SS.raise_recompile_limits()  # flex compiles a variant per shape and mask
    res = backend_checks(torch.device("cpu") if cpu else torch.device("cuda", 0), ["flex"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "flex.json").write_text(json.dumps(res, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for report.json and report.md")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (CI); same code paths")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole suite (GPU 540, CPU 150)")
    ap.add_argument("--parts", nargs="+", default=None, choices=list(PARTS), help="run only these parts (env first)")
    ap.add_argument("--flex-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    if a.flex_child:
        return flex_child(a.out, a.cpu)
    limit = a.time_limit or (150.0 if a.cpu else 540.0)
    if a.cpu:
        # One thread (the loader's worker processes too): tiny shapes gain nothing from more, and CI machines
        # are shared, where extra threads spin against each other.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    s = Suite(a.out, a.cpu, limit)
    s.report["meta"].update(
        mode="cpu" if a.cpu else "gpu", date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command="python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        time_limit_s=limit, host=platform.node(), microbatches_per_step=W.MICROBATCHES_PER_STEP,
    )
    threading.Thread(target=_watchdog, args=(s, 20.0), daemon=True).start()
    # The 1-rank process group's smoke test runs in a child while the setup installs, imports and compiles.
    s.smoke = SS.ProcessGroupSmoke(s.backend, "cpu" if a.cpu else "cuda:0")
    s.report["meta"]["setup"] = setup(s)
    s.write()
    print(f"[gpu_suite] setup: {s.report['meta']['setup']}", flush=True)
    names = ["env", *[n for n in (a.parts or PARTS) if n != "env"]]
    weights = CPU_WEIGHTS if a.cpu else WEIGHTS
    signal.signal(signal.SIGALRM, _alarm)
    s.run({n: PARTS[n] for n in names}, weights)
    parts = s.report["parts"]
    s.report["meta"]["failed_parts"] = [n for n, r in parts.items()
                                        if str(r.get("status")).startswith(("FAIL", "error"))]
    s.report["meta"]["correctness"] = correctness(parts)
    s.write()
    print(f"[gpu_suite] wrote {a.out / 'report.json'} and report.md in {s.report['meta']['wall_s']} s; "
          f"correctness: {s.report['meta']['correctness']['verdict']}; "
          f"failed parts: {s.report['meta']['failed_parts'] or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
