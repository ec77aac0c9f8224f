"""python -m train RECIPE.yaml [dotted.key=value ...] [--dry-run [--world-size N]] [--print-config] [--debug]

Runs one stage of a recipe (under torchrun, deepspeed, srun or as a single process), or validates it:
  --dry-run        build on the meta device under the recipe's layout and print parameters, the pipeline
                   split, memory per rank and FLOPs per token; no process group, no GPU (train/dry_run.py)
  --world-size N   world size for --dry-run when parallel.dp is -1
  --print-config   print the resolved config (CLI > recipe > defaults) and exit
  --help-config    print every config key with its type, default and documentation
  --debug          show the traceback of a setup error (or set QWEN2VL_DEBUG=1)

Exit codes: 0 done, 2 a mistake in the recipe, the layout, the paths or the data (one line says what to change),
3 training stopped (diverged, or the data yielded nothing), 128 + N stopped by signal N after saving a
checkpoint (143 SIGTERM, 130 SIGINT, 138 SIGUSR1): rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from core.cli import debug_enabled, one_line, report_error_line
from parallel.launcher import export_launch_env, resolve_launch_env, strip_local_rank
from train.formatting import format_duration

if TYPE_CHECKING:
    from train.config import JobConfig
    from train.trainer import TrainResult

OVERRIDES_HELP = """\
overrides: dotted keys with YAML values, e.g.
  optim.lr=3e-4 train.steps=100 parallel.tp=2 model.init_from=null
  data.datasets='[{path: /data/shards, kind: chat}, {path: s3://b/caps, kind: pretrain, weight: 0.5}]'
  model.overrides='{text.num_layers: 2}'
(quote values with spaces, brackets or braces for your shell; a list replaces the recipe's list).
"""


PEER_GRACE_S = 10.0
"""How long a failing rank other than 0 waits before it exits (see _report)."""


def _debug(args: argparse.Namespace | None = None) -> bool:
    return bool(getattr(args, "debug", False)) or debug_enabled()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # export_launch_env set it for every launcher


def _setup_logging(run_dir: Path | None = None) -> None:
    """Console: rank 0's info, every rank's warnings. RUN_DIR/train.log: the same lines, every rank appending."""
    rank = _rank()
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    level = logging.INFO if rank == 0 else logging.WARNING
    root.setLevel(level)
    if not any(getattr(h, "_qwen2vl", False) for h in root.handlers):
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        console._qwen2vl = True  # type: ignore[attr-defined]
        root.addHandler(console)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "train.log")
        fh.setFormatter(fmt)
        fh.setLevel(level)
        root.addHandler(fh)


def _fail(kind: str, e: BaseException, args: argparse.Namespace | None) -> int:
    """A setup mistake: one line on rank 0's console (the other ranks stay quiet: every rank of a job hits the same
    mistake), in every rank's train.log, and for the launch wrapper (core/launch.py) to repeat last; exit 2. The
    traceback with --debug."""
    if _debug(args):
        raise e
    logging.getLogger("train").debug("%s", e, exc_info=True)
    _report(f"{kind}: {one_line(e)}")
    return 2


def _report(line: str) -> None:
    """The run's one-line outcome: printed by rank 0, written to train.log by every rank (when it is open), and
    appended to $QWEN2VL_ERROR_FILE for a launch wrapper."""
    rank = _rank()
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
    record = logging.LogRecord("train", logging.ERROR, __file__, 0, "%s", (line,), None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):  # not the console: a 2-rank job would print it twice
            h.handle(record)
    report_error_line(line, rank)
    if rank != 0:
        # torchrun stops the other workers as soon as one exits: give rank 0, which fails the same way (give or
        # take its start-up), the time to print the line before this rank's exit gets it killed. When rank 0 exits
        # first, torchrun ends this wait at once.
        time.sleep(PEER_GRACE_S)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0],
                                     epilog=OVERRIDES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="recipe YAML (recipes/...)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (CLI > recipe > defaults)")
    parser.add_argument("--dry-run", action="store_true", help="validate the layout on the meta device and exit")
    parser.add_argument("--world-size", type=int, default=None, help="world size for --dry-run when dp is -1")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="print every config key and its doc")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of setup errors (or QWEN2VL_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, _ = strip_local_rank(argv)  # deepspeed's --local_rank (the resolver below reads it from sys.argv)
    try:
        export_launch_env(resolve_launch_env())  # SLURM / MPI / deepspeed variables -> RANK, WORLD_SIZE, ...
    except ValueError as e:
        return _fail("launch error", e, None)
    parser = _parser()
    args = parser.parse_intermixed_args(argv)  # flags may come after overrides

    from core.config import ConfigError

    if args.help_config:
        from train.config_doc import config_reference

        print(config_reference())
        return 0
    if args.recipe is None:
        parser.error("a recipe is required (e.g. recipes/tiny/stage1.yaml)")
    if "=" in args.recipe:
        parser.error(f"the first argument must be the recipe file, got the override {args.recipe!r}")
    from train.config import load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        return _fail("config error", e, args)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if args.dry_run:
        from train.dry_run import dry_run

        try:
            print(dry_run(cfg, args.world_size).text)
        except (ValueError, ConfigError) as e:
            return _fail("invalid layout", e, args)
        return 0
    return _train(cfg, args)


def _train(cfg: JobConfig, args: argparse.Namespace) -> int:
    """Run the stage; the exit code (see the module doc)."""
    from core.config import ConfigError
    from data.storage import StorageError
    from parallel import destroy_distributed
    from train.trainer import Trainer, TrainingStopped

    _setup_logging(Path(cfg.run_dir))
    if _rank() == 0:
        for note in cfg.notes:
            logging.getLogger("train").warning("%s", note)
    try:
        try:
            trainer = Trainer(cfg)
        except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            # Everything the setup reads comes from the recipe: a layout that does not fit the world size, a
            # missing data path or tokenizer, a checkpoint that does not match the model.
            return _fail("config error", e, args)
        except StorageError as e:  # an endpoint that refuses connections, a bucket that is not there
            return _fail("storage error", e, args)
        try:
            result = trainer.train()
        finally:
            trainer.close()
    except TrainingStopped as e:
        _report(f"training stopped: {one_line(e)}")
        return 3
    finally:
        destroy_distributed()
    if _rank() == 0:
        print(_done_line(result))
    return 128 + int(result.stop_signal) if result.stop_signal is not None else 0


def _done_line(result: TrainResult) -> str:
    """The last line of a run: how it ended and where everything went."""
    where = (f"checkpoint {result.checkpoint}, metrics {result.run_dir / 'metrics.jsonl'}, log "
             f"{result.run_dir / 'train.log'}")
    if not result.losses and result.stop_reason == "completed":
        # A finished run_dir resumed (checkpoint.resume: auto) with nothing left to do.
        return (f"done: nothing to train: {result.run_dir} already holds the final checkpoint of step "
                f"{result.final_step} (train.steps={result.final_step}); pick a new run_dir to train again, or "
                f"raise train.steps to continue it; {where}")
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    return (f"done: {result.stop_reason} at step {result.final_step}, final loss {loss}, in "
            f"{format_duration(result.elapsed_s)}; {where}")


if __name__ == "__main__":
    sys.exit(main())
