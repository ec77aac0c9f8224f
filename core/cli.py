"""One rule for every command line tool: a user's mistake is one line and exit code 2, never a traceback.

    sys.exit(run_cli("python -m data.inspect", main))

`main(argv)` raises ValueError / OSError (a wrong path, a bad value, a file that is not what it should be) with a
message that says what is wrong and what to do; run_cli prints `PROG: error: MESSAGE` on stderr and returns 2.
Set QWEN2VL_DEBUG=1 (or pass --debug where a tool has it) to see the traceback instead.
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


def run_cli(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run main(argv); ValueError / OSError become `PROG: error: ...` and exit code 2 (unless QWEN2VL_DEBUG)."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        if debug_enabled():
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
