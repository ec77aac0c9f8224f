"""Console formatting of run figures: percentages, durations, SI-scaled numbers, the step and eval lines.

NOTE: torch-free on purpose. The demo (python -m demo) sets its thread settings before torch is first imported,
and the report (python -m tools.report) plots on machines without torch's import cost; both format with these.
"""

from __future__ import annotations

from typing import Any


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal; "n/a" for a missing figure."""
    return "n/a" if not isinstance(v, (int, float)) else f"{100 * v:.1f}%"


def si(x: float, units: tuple[str, ...] = ("T", "G", "M", "k")) -> str:
    """x scaled to the largest of 1e12, 1e9, 1e6, 1e3 it reaches, with that unit's letter: 1.23e9 -> '1.23G'."""
    for unit, div in zip(units, (1e12, 1e9, 1e6, 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def format_eval_line(r: dict[str, Any]) -> str:
    """The console line of one eval record."""
    parts = [f"eval  {r['step']:>5}", f"stage {r['stage']}", r["dataset"]]
    if "loss" in r:
        parts.append("loss n/a" if r["loss"] is None else f"loss {r['loss']:.4f}")
    if r.get("generation_skipped"):
        parts.append("generation skipped (pp > 1)")
    elif "exact" in r:
        parts += [f"exact {pct(r['exact'])}", f"contains {pct(r['contains'])}", f"n {r['n']}"]
    return " | ".join(parts)


def format_line(r: dict[str, Any], total: int) -> str:
    """The console line of one step record."""
    parts = [f"step {r['step']:>5}/{total}", f"loss {r['loss']:.4f}"]
    parts.append(f"lr {r['lr']:.2e}")
    parts.append(f"gnorm {r['grad_norm']:.3f}")
    parts.append(f"tok {si(r['tokens'])}")
    parts.append(f"tok/s {si(r['tokens_per_s'])}")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    else:
        parts.append(f"flop/s {si(r['flops_per_s'])}")
    parts.append(f"data {1000 * r['data_wait_s']:.0f}ms")
    parts.append(f"mem {r['peak_mem_gb']:.2f}GB")
    if r.get("trainable_params") is not None:
        parts.append(f"trainable {si(r['trainable_params'])}")
    if "elapsed_s" in r:
        parts.append(f"elapsed {format_duration(r['elapsed_s'])} eta {format_duration(r['eta_s'])}")
    if r.get("skipped_steps"):
        parts.append(f"skipped_steps {r['skipped_steps']}")
    if r.get("skipped_samples"):
        parts.append("skipped " + ",".join(f"{k}={v}" for k, v in sorted(r["skipped_samples"].items())))
    return " | ".join(parts)
