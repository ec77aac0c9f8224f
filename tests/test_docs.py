"""The commands in README.md and docs/*.md run as written (issue 23: the docs' demo block failed at its first command,
its pp2 line trained nothing, and nothing noticed).

A fenced bash block under an HTML comment `<!-- docs-check: parse -->` or `<!-- docs-check: cpu -->` is checked:

- parse (every marked block): each command parses with its own CLI's argparse parser (the module's real main(),
  stopped right after parsing); `python -m train` recipes load with the line's overrides and environment, and
  where the world size is known (torchrun --nproc-per-node x --nnodes, deepspeed --num_gpus, sbatch --nodes x 8
  GPUs, --dry-run --world-size) the layout is dry-run at it; pip extras exist in pyproject.toml; launch scripts
  exist; test paths exist.
- cpu: the block also runs, in order, in a scratch directory where `recipes/` and `launch/` are the checkout's,
  every command with exit code 0, the blocks of one file in one directory (the README's later blocks use the
  demo's runs). pip and pytest lines are only checked, and the test shortens what would take minutes, by
  appending arguments (the last value of a key wins): `python -m demo` gets `--steps 2,2,2 --eval-samples 2
  --digits 64` (the full schedule is tests/demo/test_learning.py's), `python -m demo.data` `--digits 64`, every
  training command `train.steps=2 eval.max_samples=2`. A training command that prints `done: nothing to train`
  fails the check.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- docs-check: (parse|cpu) -->\s*\n```(?:bash|sh)\n(.*?)```", re.S)
GPUS_PER_NODE = 8  # launch/slurm.sbatch's #SBATCH --gpus-per-node


@dataclass
class Command:
    where: str
    env: dict[str, str]
    argv: list[str]
    extra: list[str] = field(default_factory=list)
    """What the cpu check appends to shorten it (empty: run as written)."""

    @property
    def text(self) -> str:
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, shlex.join(self.argv + self.extra)])


def marked_blocks() -> list[tuple[str, str, str]]:
    """(file:line, kind, body) of every marked block."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            out.append((f"{doc.relative_to(REPO)}:{text[:m.start()].count(chr(10)) + 1}", m.group(1), m.group(2)))
    return out


def commands(where: str, body: str) -> list[Command]:
    """The commands of a block: continuation lines joined, comments dropped, `&&` chains split, leading VAR=value
    assignments taken as the command's environment."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            part, words = words[:cut], words[cut + 1:]
            env = {}
            while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
                k, v = part.pop(0).split("=", 1)
                env[k] = v
            if part:
                out.append(Command(where, env, part))
    return out


# ------------------------------------------------------------------------------------------ parse checks
class Parsed(BaseException):  # noqa: N818 - not an error: how a parsed command line leaves main()
    """Raised right after a CLI's parser accepted the arguments (BaseException: no `except Exception` swallows it)."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_with_cli(module: str | None, script: Path | None, args: list[str], monkeypatch) -> argparse.Namespace:
    """Run the module's (or script's) real main with `args` until its parser returns; a parser error fails."""
    for name in ("parse_args", "parse_intermixed_args"):
        orig = getattr(argparse.ArgumentParser, name)

        def stop(self, *a, _orig=orig, **k):
            raise Parsed(_orig(self, *a, **k))

        monkeypatch.setattr(argparse.ArgumentParser, name, stop)
    prog = module or str(script)
    monkeypatch.setattr(sys, "argv", [prog, *args])
    err = StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(StringIO()):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(script), run_name="__main__")
    except Parsed as p:
        return p.namespace
    except SystemExit as e:
        raise AssertionError(f"{prog} {shlex.join(args)}: the parser refused it (exit {e.code}): {err.getvalue()}") \
            from None
    finally:
        monkeypatch.undo()
    raise AssertionError(f"{prog} {shlex.join(args)}: finished without parsing any arguments")


def check_train(cmd: Command, args: list[str], world: int | None, monkeypatch) -> None:
    """python -m train's arguments: parsed, the recipe loaded with the overrides, dry-run at a known world size."""
    from train.config import load_config
    from train.dry_run import dry_run

    ns = parse_with_cli("train", None, args, monkeypatch)
    assert ns.recipe and (REPO / ns.recipe).is_file(), (cmd.where, cmd.text)
    with monkeypatch.context() as m:
        for k, v in cmd.env.items():
            m.setenv(k, v)
        cfg = load_config(REPO / ns.recipe, ns.overrides)
        world = ns.world_size if ns.dry_run else world
        if world is not None:
            dry_run(cfg, world)


def _int(v: str | int) -> int:
    return max(int(x) for x in str(v).split(":"))  # torchrun's --nnodes MIN:MAX


def check_command(cmd: Command, monkeypatch) -> None:
    argv, where = cmd.argv, f"{cmd.where}: {cmd.text}"
    head = argv[0]
    if head == "pip":
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for a in argv:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", a)
            for extra in (m.group(1).split(",") if m else []):
                assert extra in extras, f"{where}: no extra {extra!r} in pyproject.toml"
        return
    if head in ("mkdir", "cd"):
        return
    if head == "python" and argv[1:3] == ["-m", "pytest"]:
        for a in argv[3:]:
            assert a.startswith("-") or (REPO / a.split("::")[0]).exists(), f"{where}: {a} does not exist"
        return
    if head == "python" and argv[1] == "-m":
        module, args = argv[2], argv[3:]
        if module == "train":
            check_train(cmd, args, None, monkeypatch)
        else:
            parse_with_cli(module, None, args, monkeypatch)
        return
    if head == "python":
        script = REPO / argv[1]
        assert script.is_file(), f"{where}: no {argv[1]}"
        parse_with_cli(None, script, argv[2:], monkeypatch)
        return
    if head == "torchrun":
        from torch.distributed.run import get_args_parser

        a = get_args_parser().parse_args(argv[1:])
        assert a.module and a.training_script == "train", where
        check_train(cmd, a.training_script_args, _int(a.nproc_per_node) * _int(a.nnodes), monkeypatch)
        return
    if head == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        a = parse_args(argv[1:])
        assert a.module and a.user_script == "train", where
        check_train(cmd, a.user_args, a.num_gpus if a.num_gpus > 0 else None, monkeypatch)
        return
    if head in ("sbatch", "srun"):
        i = next(i for i, w in enumerate(argv) if not w.startswith("-") and i > 0)
        rest = argv[i:]
        if head == "srun":
            assert rest[:3] == ["python", "-m", "train"], where
            check_train(cmd, rest[3:], None, monkeypatch)
            return
        assert (REPO / rest[0]).is_file(), f"{where}: no {rest[0]}"
        nodes = next((int(w.split("=")[1]) for w in argv if w.startswith("--nodes=")), None)
        gpus = next((int(w.split("=")[1]) for w in argv if w.startswith("--gpus-per-node=")), GPUS_PER_NODE)
        tasks = next((int(w.split("=")[1]) for w in argv if w.startswith("--ntasks=")), None)
        world = tasks if gpus == 0 else (nodes * gpus if nodes else None)
        check_train(cmd, rest[1:], world, monkeypatch)
        return
    if head.startswith("launch/"):
        assert (REPO / head).is_file() and os.access(REPO / head, os.X_OK), f"{where}: {head} is not executable"
        env = cmd.env
        world = (_int(env["NPROC_PER_NODE"]) * _int(env.get("NNODES", "1"))) if "NPROC_PER_NODE" in env else None
        check_train(cmd, argv[1:], world, monkeypatch)
        return
    raise AssertionError(f"{where}: no check for {head!r}: teach tests/test_docs.py or leave the block unmarked")


BLOCKS = marked_blocks()


def test_the_docs_mark_their_command_blocks():
    kinds = {(w.split(":")[0], k) for w, k, _ in BLOCKS}
    assert {("README.md", "cpu"), ("README.md", "parse"), ("docs/train.md", "cpu")} <= kinds, kinds
    assert sum(len(commands(w, b)) for w, _, b in BLOCKS) >= 30


@pytest.mark.parametrize("where,kind,body", BLOCKS, ids=[w for w, _, _ in BLOCKS])
def test_every_command_parses(where, kind, body, monkeypatch):
    cmds = commands(where, body)
    assert cmds, where
    for cmd in cmds:
        check_command(cmd, monkeypatch)


def test_demo_and_dev_install_one_transformers():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {name: [d for d in extras[name] if d.startswith("transformers")] for name in ("demo", "dev")}
    assert pins["demo"] == pins["dev"] and len(pins["dev"]) == 1 and "==" in pins["dev"][0], pins


# ------------------------------------------------------------------------------------------ running cpu blocks
SHORTEN = {
    ("python", "-m", "demo"): ["--steps", "2,2,2", "--eval-samples", "2", "--digits", "64"],
    ("python", "-m", "demo.data"): ["--digits", "64"],
}
TRAIN_SHORT = ["train.steps=2", "eval.max_samples=2"]


def shortened(cmd: Command) -> Command:
    a = cmd.argv
    extra = SHORTEN.get(tuple(a[:3]), [])
    if a[:3] == ["python", "-m", "train"] or (a[0] == "torchrun" and "train" in a):
        extra = TRAIN_SHORT
    return Command(cmd.where, cmd.env, a, list(extra))


def skipped_in_run(cmd: Command) -> bool:
    return cmd.argv[0] == "pip" or cmd.argv[1:3] == ["-m", "pytest"]


def run_blocks(doc: str, tmp_path: Path) -> None:
    work = tmp_path / "checkout"
    work.mkdir()
    for d in ("recipes", "launch"):
        (work / d).symlink_to(REPO / d)
    env = {k: v for k, v in os.environ.items() if k not in ("DEMO_DIR", "LEARN_DIR", "QWEN2VL_RUNS")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    for where, kind, body in BLOCKS:
        if kind != "cpu" or not where.startswith(doc + ":"):
            continue
        for cmd in map(shortened, commands(where, body)):
            if skipped_in_run(cmd):
                continue
            res = subprocess.run(["bash", "-c", cmd.text], cwd=work, env=env, capture_output=True, text=True,
                                 timeout=600)
            out = res.stdout + res.stderr
            assert res.returncode == 0, f"{where}: `{cmd.text}` exited {res.returncode}\n{out[-6000:]}"
            assert "done: nothing to train" not in out, f"{where}: `{cmd.text}` trained nothing\n{out[-3000:]}"
            if cmd.argv[:3] == ["python", "-m", "demo"]:
                assert res.stdout.rstrip().splitlines()[-1].startswith("  (the answer is "), res.stdout[-2000:]


@pytest.mark.timeout(1200)
def test_readme_cpu_blocks_run(tmp_path):
    run_blocks("README.md", tmp_path)


@pytest.mark.timeout(1200)
def test_train_doc_cpu_blocks_run(tmp_path):
    run_blocks("docs/train.md", tmp_path)
