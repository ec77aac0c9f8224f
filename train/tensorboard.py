"""TensorBoard logging beside metrics.jsonl and W&B (`metrics.tensorboard: true`): torch's SummaryWriter writes
RUN_DIR/tensorboard/, read with `tensorboard --logdir RUN_DIR/tensorboard` (or the parent of several runs).

The scalars are the ones W&B gets (train/metrics.py `scalars`): every number of a step record under its own name
(loss, lr, grad_norm, tokens_per_s, flops_per_s, mfu, data_wait_s, ...), skipped_samples/<reason>, lr/<group>, and
each evaluation's eval/<dataset>/{loss,exact,contains,n}, all at the optimizer step. A resumed run starts its writer
with purge_step = the resumed step + 1, so TensorBoard drops what an earlier process logged past the checkpoint
(those steps are trained again) instead of drawing both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import ConfigError

SUBDIR = "tensorboard"


def require_tensorboard() -> None:
    """A ConfigError when torch's SummaryWriter cannot be imported (every rank checks, so none waits for another)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"metrics.tensorboard: true needs the tensorboard package ({e}): pip install tensorboard "
                          "(it is in the dev extra), or set metrics.tensorboard: false") from e


class TensorBoardWriter:
    """Rank 0's writer of RUN_DIR/tensorboard."""

    def __init__(self, run_dir: Path, resumed_from: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / SUBDIR
        purge = resumed_from + 1 if resumed_from is not None else None
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, v in values.items():
            self._writer.add_scalar(name, v, global_step=step)
        self._writer.flush()  # a crash loses nothing logged before it (one flush per record: cheap next to a step)

    def text(self, name: str, value: Any, step: int) -> None:
        self._writer.add_text(name, str(value), global_step=step)

    def close(self) -> None:
        self._writer.close()
