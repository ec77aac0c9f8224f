"""One rule for every command line tool: a user's mistake is one line and exit code 2, never a traceback.

    sys.exit(run_cli("python -m data.inspect", main))

`main(argv)` raises ValueError / OSError (a wrong path, a bad value, a file that is not what it should be) with a
message that says what is wrong and what to do; run_cli prints `PROG: error: MESSAGE` on stderr and returns 2.
Set QWEN2VL_DEBUG=1 (or pass --debug where a tool has it) to see the traceback instead.

Under a launcher (torchrun, deepspeed) the line would be buried under the launcher's own report of the failed
workers, so a process that ends with such a line also appends it to $QWEN2VL_ERROR_FILE when that is set
(`report_error_line`), and the launch wrapper (core/launch.py, used by launch/*.sh) prints it as the last line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


def debug_enabled() -> bool:
    return os.environ.get("QWEN2VL_DEBUG", "") not in ("", "0")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (multi-line messages joined with '; ')."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return "; ".join(lines) or type(e).__name__


ERROR_FILE_ENV = "QWEN2VL_ERROR_FILE"
"""A file the launch wrapper (core/launch.py) creates and removes: every failing rank appends `RANK<tab>LINE`."""


def report_error_line(line: str, rank: int = 0) -> None:
    """Append this rank's one-line error to $QWEN2VL_ERROR_FILE (nothing when it is unset or not writable)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "a") as f:  # one short write per rank: O_APPEND keeps lines whole
            f.write(f"{rank}\t{' '.join(line.split())}\n")
    except OSError:
        pass  # the error itself is already on the console; a missing report file must not hide it


def read_error_line(path: str | os.PathLike) -> str | None:
    """The line of the lowest rank that reported one (its latest, after launcher restarts), or None."""
    best: tuple[int, str] | None = None
    try:
        text = open(path).read()  # noqa: SIM115 - a small file read once
    except OSError:
        return None
    for row in text.splitlines():
        rank, _, line = row.partition("\t")
        if rank.isdigit() and line and (best is None or int(rank) <= best[0]):
            best = (int(rank), line)
    return best[1] if best else None


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run main(argv); ValueError / OSError become `PROG: error: ...` and exit code 2 (unless QWEN2VL_DEBUG)."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        if debug_enabled():
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
