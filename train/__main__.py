"""python -m train RECIPE.yaml [dotted.key=value ...] [--dry-run [--world-size N]] [--print-config]

Runs one stage of a recipe (under torchrun, deepspeed, srun or as a single process), or validates it:
  --dry-run        build on the meta device under the recipe's layout and print parameters, the pipeline
                   split, memory per rank and FLOPs per token; no process group, no GPU (train/dry_run.py)
  --world-size N   world size for --dry-run when parallel.dp is -1
  --print-config   print the resolved config (CLI > recipe > defaults) and exit
  --help-config    print every config key with its type, default and documentation
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from parallel.launcher import export_launch_env, resolve_launch_env, strip_local_rank


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))  # export_launch_env set it for every launcher
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, _ = strip_local_rank(argv)  # deepspeed's --local_rank (the resolver below reads it from sys.argv)
    export_launch_env(resolve_launch_env())  # SLURM / MPI / deepspeed variables -> RANK, WORLD_SIZE, ...
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", nargs="?", help="recipe YAML (recipes/...)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (CLI > recipe > defaults)")
    parser.add_argument("--dry-run", action="store_true", help="validate the layout on the meta device and exit")
    parser.add_argument("--world-size", type=int, default=None, help="world size for --dry-run when dp is -1")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="print every config key and its doc")
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
    _setup_logging()
    from train.config import load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    if args.dry_run:
        from train.dry_run import dry_run

        try:
            print(dry_run(cfg, args.world_size).text)
        except (ValueError, ConfigError) as e:
            print(f"invalid layout: {e}", file=sys.stderr)
            return 2
        return 0

    from parallel import destroy_distributed
    from train.trainer import TrainingStopped, run

    try:
        result = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {result.stop_reason} at step {result.final_step}, final loss {result.final_loss}, "
            f"checkpoint {result.checkpoint}, metrics {result.run_dir / 'metrics.jsonl'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
