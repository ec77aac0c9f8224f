"""Per-step metrics: RUN_DIR/metrics.jsonl, one console line per step on rank 0, and W&B and TensorBoard when enabled.

Every record is one JSON object per line: {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
"tflops_per_device", "mfu", "data_wait_s", "peak_mem_gb", "skipped_steps", "skipped_samples": {reason: n},
...}. A resumed run appends (its first record has "resumed_from"), so the file tells the whole story of a
run across restarts. Held-out evaluations add {"event": "eval", ...} records (MetricsLogger.eval, train/eval.py).

MFU = model FLOPs of the step (model.flops: ViT + LLM, forward + backward, attention included, from the
actual packed lengths: each document's causal pairs, model.flops' 'doc_causal' convention, the head on the
supervised rows) / (step time x devices x peak FLOP/s of one device). It is below a torchtitan-convention
figure for the same run, which counts the whole packed row as one sequence ('packed_full'). The peak comes from
metrics.peak_tflops or a table of dense bf16 peaks by device name; on CPU there is no meaningful peak, so MFU
is null and the achieved FLOP/s per process is reported instead.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from train.config import JobConfig
from train.formatting import format_eval_line, format_line
from train.tensorboard import TensorBoardWriter, require_tensorboard

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe part is 756 (matched below)
    "H100 PCIE": 756.0,
    "H800": 989.0,
    "H20": 148.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
    "MI300X": 1307.0,
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of one device, or None on CPU / unknown devices (then MFU is not reported)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific first ("H100 PCIE")
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    log.warning("unknown GPU %r: set metrics.peak_tflops to report MFU", name)
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or peak resident set size of the process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kb * 1024 / 1e9 if sys.platform != "darwin" else rss_kb / 1e9


def resolve_wandb_mode(mode: str, environ: dict[str, str] | None = None) -> str:
    """The W&B mode to use: the recipe's, WANDB_MODE in 'auto', offline when there is no API key."""
    env = os.environ if environ is None else environ
    if mode == "disabled":
        return "disabled"
    if mode == "auto":
        mode = env.get("WANDB_MODE", "online")
    elif env.get("WANDB_MODE") in ("offline", "disabled"):
        mode = env["WANDB_MODE"]  # an operator's env choice wins over the recipe's 'online'
    if mode == "online" and not _has_wandb_key(env):
        log.warning("wandb: no API key (WANDB_API_KEY or ~/.netrc): logging offline under RUN_DIR/wandb")
        mode = "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"WANDB_MODE={mode!r}: use online, offline or disabled")
    return mode


def _has_wandb_key(env: Any) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    netrc = Path(env.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger (every rank calls the same methods)."""

    def __init__(self, cfg: JobConfig, is_main: bool, resumed_from: int | None = None) -> None:
        self.cfg = cfg
        self.is_main = is_main
        self.run_dir = Path(cfg.run_dir)
        self._file = None
        self._wandb = None
        self._first = True
        self.resumed_from = resumed_from
        self._tb = None
        if cfg.metrics.tensorboard:
            require_tensorboard()  # on every rank: a missing package fails all of them at once
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if cfg.metrics.tensorboard:
            self._tb = TensorBoardWriter(self.run_dir, resumed_from)
            log.info("tensorboard: %s (tensorboard --logdir %s)", self._tb.log_dir, self._tb.log_dir)
        wcfg = cfg.metrics.wandb
        mode = resolve_wandb_mode(wcfg.mode)
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=wcfg.project,
                entity=wcfg.entity,
                name=wcfg.name or self.run_dir.name,
                tags=list(wcfg.tags) or None,
                dir=str(self.run_dir),
                mode=mode,
                config=cfg.to_dict(),
                # A restarted job continues the same W&B run instead of starting a new one.
                id=_wandb_run_id(self.run_dir),
                resume="allow",
            )
            # wandb.dir is the run's files/ folder; `wandb sync` takes the run directory above it.
            run_path = Path(self._wandb.dir).parent
            log.info("wandb %s run in %s%s", mode, run_path,
                     f" (upload later with: wandb sync {run_path})" if mode == "offline" else "")

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        if self._first and self.resumed_from is not None:
            record = {**record, "resumed_from": self.resumed_from}
        self._first = False
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        print(format_line(record, self.cfg.train.steps), flush=True)
        if self._wandb is not None or self._tb is not None:
            flat = scalars(record)
            if self._wandb is not None:
                self._wandb.log(flat, step=record["step"])
            if self._tb is not None:
                self._tb.scalars({k: v for k, v in flat.items() if k not in ("step", "time")}, record["step"])

    def event(self, name: str, **fields: Any) -> None:
        """A non-step record (start, checkpoint, stop) in metrics.jsonl."""
        if self.is_main:
            self._file.write(json.dumps({"time": round(time.time(), 3), "event": name, **fields}) + "\n")

    def eval(self, record: dict[str, Any]) -> None:
        """A held-out evaluation of one dataset (train/eval.py): an {"event": "eval", "step", "stage", "dataset",
        "loss", "exact", "contains", "n", ...} record, a console line, and W&B keys eval/<dataset>/<figure>."""
        if not self.is_main:
            return
        self.event("eval", **record)
        print(format_eval_line(record), flush=True)
        figures = {f"eval/{record['dataset']}/{k}": v for k, v in record.items()
                   if k in ("loss", "exact", "contains", "n") and v is not None}
        if self._wandb is not None:
            self._wandb.log(figures, step=record["step"])
        if self._tb is not None:
            self._tb.scalars(figures, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._file is not None:
            self._file.close()
            self._file = None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a step record by name, for W&B and TensorBoard: every int/float field (nulls left out),
    skipped_samples/<reason> and lr/<group>."""
    flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
    for reason, n in (record.get("skipped_samples") or {}).items():
        flat[f"skipped_samples/{reason}"] = n
    for group, lr in (record.get("lr_groups") or {}).items():
        flat[f"lr/{group}"] = lr
    return flat


def _wandb_run_id(run_dir: Path) -> str:
    """A stable W&B run id per run directory (kept in RUN_DIR/wandb_run_id)."""
    p = run_dir / "wandb_run_id"
    if p.is_file():
        return p.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    p.write_text(rid + "\n")
    return rid
