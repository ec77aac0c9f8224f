"""python -m core.launch torchrun|deepspeed [LAUNCHER ARGS ...]: a launcher whose output ends with the training's
one-line error.

    python -m core.launch torchrun --standalone --nproc-per-node 2 -m train RECIPE.yaml ...
    python -m core.launch deepspeed --num_gpus 8 --module train RECIPE.yaml ...

launch/torchrun.sh and launch/deepspeed.sh exec this. A training process that fails with a one-line error (a
mistake in the recipe, the layout or the paths: exit code 2; a stopped run: 3) prints it on rank 0, and then
torchrun buries it under its 30-line report of the failed workers (ChildFailedError), deepspeed under its own
launcher lines. Here the launcher's own main() runs in this process (the process the script exec'd, so signals
reach the launcher exactly as before) with $QWEN2VL_ERROR_FILE pointing at a fresh file that failing ranks append
their line to (core/cli.py); when the job fails, the lowest rank's line is printed last and the exit code is that
worker's (2 or 3) instead of the launcher's 1. Failures without such a line (a crash with a traceback) keep the
launcher's own report. A signal that stops torchrun (Ctrl-C, SIGTERM: it passes it on to the workers, which save a
checkpoint) ends it with 128 + the signal number instead of a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence

from core.cli import ERROR_FILE_ENV, read_error_line

LAUNCHERS = ("torchrun", "deepspeed")


def _torchrun(argv: list[str], error_line: Callable[[], str | None]) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except SignalException as e:
        # Ctrl-C, SIGTERM: torchrun passed the signal on to the workers, which saved a checkpoint and said so; its
        # traceback adds nothing. 128 + the signal, as the trainer's own exit code.
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        line = error_line()
        if line is None:
            raise  # no one-line error: torchrun's own report (with the workers' tracebacks) is the best we have
        _, failure = e.get_first_failure()
        print(line, file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def _deepspeed(argv: list[str], error_line: Callable[[], str | None]) -> int:
    from deepspeed.launcher.runner import main

    try:
        main(argv)
    except SystemExit as e:  # the runner ends with sys.exit(its launch process's exit code)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        line = error_line() if code else None
        if line is not None:
            print(line, file=sys.stderr, flush=True)
        return code
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in LAUNCHERS:
        print(f"usage: python -m core.launch {{{','.join(LAUNCHERS)}}} [launcher arguments ...]", file=sys.stderr)
        return 2
    fd, path = tempfile.mkstemp(prefix="qwen2vl-errors-", suffix=".txt")
    os.close(fd)
    os.environ[ERROR_FILE_ENV] = path  # the training processes inherit it
    try:
        run = _torchrun if argv[0] == "torchrun" else _deepspeed
        return run(argv[1:], lambda: read_error_line(path))
    finally:
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
