"""Mutation check of the code where a silent bug costs users most: mutmut (in the dev extra) changes one function at
a time (an operator, a constant, a condition, a dropped call) and runs the tests that cover it; a mutant those tests
pass "survives". Run it before touching one of these modules, then give each new survivor a test, or a line in
docs/tests.md saying why it is equivalent. Not part of CI (a module takes minutes to most of an hour on 2 cores).

    nice -n 10 python tests/mutation.py loss        # one target (see TARGETS), or several, or `all`
    nice -n 10 python tests/mutation.py all --time-limit 1800   # bounded: each target reports what it finished
    python tests/mutation.py --list                  # the targets: module, functions, tests
    python tests/mutation.py --recheck loss          # the last run's survivors against today's tests

Each target runs in its own scratch folder, .mutation/TARGET/ (git ignores it): the repository's packages linked in,
a setup.cfg with the target's mutmut settings; mutmut copies them to .mutation/TARGET/mutants/. It mutates only the
target's module and, of it, only the functions named (mutant names are globs on mutmut's `module.x_function` and
`module.xǁClassǁmethod` names), and runs each mutant against the target's tests that cover the mutated function.
At the end: the survival rate, and each survivor's name with `mutmut show NAME` (run in the scratch folder) for its
diff. docs/tests.md has the last figures and the reasons for the equivalent survivors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "model", "data", "parallel", "train", "tools", "demo", "recipes", "tests", "benchmarks")


@dataclass(frozen=True)
class Target:
    module: str
    """The file mutated (a path in the repository)."""
    functions: tuple[str, ...]
    """Globs on mutmut's function names in that module (`x_name`, `xǁClassǁmethod`)."""
    tests: tuple[str, ...]
    """pytest node ids or files: the tests that cover the functions."""
    why: str
    spawned: bool = False
    """The code runs in processes the tests spawn (gloo ranks), where mutmut's coverage does not look: every mutant
    is then run against all of the target's tests, one pytest per mutant."""
    deselect: tuple[str, ...] = ()
    """Tests left out under mutmut, with the reason in TARGETS: those that torch.compile the mutated module's code
    (dynamo cannot trace mutmut's trampolines: "Unsupported method call ... ContextVar.get")."""


TARGETS: dict[str, Target] = {
    "loss": Target(
        "model/loss.py", ("x_lm_loss", "xǁ_FusedLinearCrossEntropyǁ*", "x_model_loss"),
        ("tests/model/test_loss.py",),
        "the training loss: sum over supervised tokens, the global count, the chunked fused cross-entropy",
        # It compiles the CUDA chunk body on CPU; the eager body it is compared with stays covered.
        deselect=("tests/model/test_loss.py::test_fused_body_equals_the_eager_body",)),
    "vocab_parallel": Target(
        "parallel/vocab_parallel.py", ("xǁ_TPReduceǁ*", "x_gather_for_head", "x_make_loss_fn*"),
        ("tests/parallel/test_vocab_parallel.py",),
        "the loss's reductions over tensor-parallel vocabulary shards", spawned=True),
    "freeze": Target(
        "train/optim.py", ("x_apply_freeze",),
        ("tests/train/test_optim.py",),
        "freezing: which parameters a stage trains"),
    "schedule": Target(
        "parallel/pipeline_schedule.py",
        ("xǁ_Builderǁ*", "x_one_f_one_b_program", "x_check_interleaved_microbatches", "x_interleaved_table",
         "x_interleaved_program", "x_build_program"),
        ("tests/parallel/test_schedule.py",),
        "the pipeline programs (1F1B and interleaved): order, messages, microbatch rule"),
    "resume": Target(
        "train/start.py", ("x_find_resume",),
        ("tests/train/test_start.py",),
        "the resume decision: never / auto (newest verified) / a path, and what is loaded"),
    "eval_scoring": Target(
        "train/eval.py", ("x_normalize_answer", "x_score", "xǁEvaluatorǁgeneration"),
        ("tests/train/test_eval.py::test_normalize_and_score",
         "tests/train/test_eval.py::test_in_training_eval_one_process"),
        "held-out scoring: normalization, exact / contains, the sums over samples"),
    "loader_skips": Target(
        "data/pipeline.py", ("xǁ*ǁ_skip", "xǁ*ǁ_skipped", "xǁ*ǁ_skip_counts", "xǁ*ǁ_quiet_text"),
        ("tests/data/test_loader_faults.py::test_bad_shards_are_skipped_counted_and_logged_once",
         "tests/data/test_loader_faults.py::test_all_skipped_finite_epochs_is_an_error_naming_the_counts",
         "tests/data/test_loader_faults.py::test_quiet_worker_reports_then_stops_naming_the_dataset",
         "tests/data/test_loader.py::test_bad_input_is_counted_logged_and_loses_no_good_sample"),
        "the loader's skip accounting: counts per reason, the futile-pass limit, what the stall report says"),
}


def setup_cfg(name: str, t: Target) -> str:
    package = t.module.split("/")[0]
    lines = ["[mutmut]", f"source_paths = {package}", f"only_mutate = {t.module}",
             "also_copy =", *(f"    {p}" for p in PACKAGES if p not in (package, "tests")),
             "pytest_add_cli_args_test_selection =", *(f"    {x}" for x in t.tests),
             # pytest's cache plugin is off in pyproject; the tests' own timeouts stay.
             "pytest_add_cli_args =", "    -q", "    -p", "    no:randomly",
             *(f"    --deselect\n    {d}" for d in t.deselect),
             # torch is not fork-safe once used: every worker forks from a server that only imported the tests.
             "process_isolation = forkserver"]
    return "\n".join(lines) + "\n"


def prepare(name: str, t: Target) -> Path:
    work = REPO / ".mutation" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for p in PACKAGES:
        (work / p).symlink_to(REPO / p, target_is_directory=True)
    shutil.copy2(REPO / "pyproject.toml", work / "pyproject.toml")
    (work / "setup.cfg").write_text(setup_cfg(name, t))
    return work


def mutant_globs(t: Target) -> list[str]:
    mod = t.module.removesuffix(".py").replace("/", ".")
    return [f"{mod}.{f}__mutmut_*" for f in t.functions]


def results(work: Path) -> dict[str, str]:
    """mutant name -> status (killed, survived, timeout, ...) from `mutmut results --all true`."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, env=_env()).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.pop("PYTHONPATH", None)  # mutmut puts its mutants/ first; the repository itself must not be importable
    return env


def _bounded(cmd: list[str], cwd: Path, env: dict[str, str], limit: float | None) -> int:
    """Run cmd in its own process group; past `limit` seconds stop the group (what finished stays recorded)."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True)
    try:
        return p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        print(f"stopped after the time limit of {limit:.0f} s", flush=True)
        return 124


def _mutants(work: Path, t: Target) -> list[str]:
    """The target's mutant names, from mutmut's record of the mutated module."""
    meta = json.loads((work / "mutants" / (t.module + ".meta")).read_text())
    wanted = [re.compile(re.escape(g).replace(r"\*", ".*") + "$") for g in mutant_globs(t)]
    return sorted(k for k in meta["exit_code_by_key"] if any(w.match(k) for w in wanted))


def _selection(t: Target) -> list[str]:
    """pytest's arguments for the target's tests, its deselected ones left out."""
    return [*t.tests, *(a for d in t.deselect for a in ("--deselect", d))]


def run_spawned(work: Path, t: Target, limit: float | None, names: list[str] | None = None) -> dict[str, str]:
    """Each mutant (all the target's, or `names`) against all the target's tests: MUTANT_UNDER_TEST reaches the
    spawned ranks through the environment (mutmut's trampolines read it at every call)."""
    out: dict[str, str] = {}
    t_end = None if limit is None else time.monotonic() + limit
    no_mutant = dict(_env(), MUTANT_UNDER_TEST="", PYTHONPATH=str(work / "mutants"))
    clean = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", *_selection(t)],
                           cwd=work / "mutants", env=no_mutant, capture_output=True, text=True)
    if clean.returncode != 0:  # a failure without a mutant would count every mutant killed
        raise SystemExit(f"the tests fail without a mutant in {work / 'mutants'}:\n{clean.stdout[-3000:]}")
    for name in names if names is not None else _mutants(work, t):
        left = None if t_end is None else t_end - time.monotonic()
        if left is not None and left <= 0:
            print(f"stopped after the time limit of {limit:.0f} s", flush=True)
            break
        env = dict(_env(), MUTANT_UNDER_TEST=name, PYTHONPATH=str(work / "mutants"))
        try:
            rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", *_selection(t)],
                                cwd=work / "mutants", env=env, capture_output=True, timeout=left).returncode
        except subprocess.TimeoutExpired:
            break
        out[name] = "survived" if rc == 0 else "killed"
        print(f"  {name}: {out[name]}", flush=True)
    return out


def run_target(name: str, max_children: int, limit: float | None) -> int:
    t = TARGETS[name]
    work = prepare(name, t)
    print(f"[{name}] {t.module} {', '.join(t.functions)} against {' '.join(t.tests)} (in {work})", flush=True)
    t0 = time.monotonic()
    rc = _bounded([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
                   *mutant_globs(t)], work, _env(), limit)
    spawned = None
    if t.spawned:  # mutmut saw no coverage (it is in the spawned ranks): run every mutant explicitly
        spawned = run_spawned(work, t, None if limit is None else limit - (time.monotonic() - t0))
        (work / "spawned_results.json").write_text(json.dumps(spawned))
        rc = 0
    report(name, spawned, time.monotonic() - t0)
    return rc


def recheck(name: str) -> None:
    """The last run's survivors against the tests as they are now (copied into mutants/ again), one pytest each:
    after adding a test for a survivor, this shows it killed without a whole run."""
    t, work = TARGETS[name], REPO / ".mutation" / name
    survivors = sorted(k for k, v in _statuses(name).items() if v == "survived")
    shutil.copytree(REPO / "tests", work / "mutants" / "tests", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    now = run_spawned(work, t, None, survivors)
    left = sorted(k for k, v in now.items() if v == "survived")
    print(f"[{name}] recheck: {len(survivors) - len(left)} of {len(survivors)} survivors now killed; "
          f"still surviving: {left}")


def _statuses(name: str) -> dict[str, str]:
    t, work = TARGETS[name], REPO / ".mutation" / name
    if (work / "spawned_results.json").is_file():
        return json.loads((work / "spawned_results.json").read_text())
    wanted = [re.compile(re.escape(g).replace(r"\*", ".*") + "$") for g in mutant_globs(t)]
    return {k: v for k, v in results(work).items() if any(w.match(k) for w in wanted)}


def report(name: str, spawned: dict[str, str] | None = None, seconds: float | None = None) -> None:
    """The survival rate of the target's last run (in .mutation/NAME/) and its survivors."""
    t, work = TARGETS[name], REPO / ".mutation" / name
    mine = spawned if spawned is not None else _statuses(name)
    survived = sorted(k for k, v in mine.items() if v == "survived")
    counted = [k for k, v in mine.items() if v in ("killed", "survived", "timeout", "suspicious")]
    rate = len(survived) / len(counted) if counted else float("nan")
    total = len(_mutants(work, t))
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    print(f"[{name}] {len(counted)} of {total} mutants run, {len(survived)} survived ({100 * rate:.0f}%){took}; "
          f"statuses: {dict(sorted(Counter(mine.values()).items()))}")
    for k in survived:
        print(f"[{name}]   survived: {k}   (cd {work} && python -m mutmut show {k})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)}, or all")
    ap.add_argument("--list", action="store_true", help="print the targets and exit")
    ap.add_argument("--report", action="store_true", help="only report the targets' last runs")
    ap.add_argument("--recheck", action="store_true",
                    help="run the last run's survivors against the tests as they are now")
    ap.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds per target; past it the run stops and reports what it finished")
    args = ap.parse_args(argv)
    if args.list or not args.targets:
        for n, t in TARGETS.items():
            print(f"{n:15} {t.module}: {', '.join(t.functions)}\n{'':15} tests: {' '.join(t.tests)}\n"
                  f"{'':15} ({t.why})")
        return 0
    names = list(TARGETS) if args.targets == ["all"] else args.targets
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {', '.join(TARGETS)} or all")
    if args.report or args.recheck:
        for n in names:
            (recheck if args.recheck else report)(n)
        return 0
    return max(run_target(n, args.max_children, args.time_limit) for n in names)


if __name__ == "__main__":
    sys.exit(main())
