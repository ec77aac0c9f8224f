"""Plots of one run or a stage chain, from the runs' metrics.jsonl: PNGs and an index (Markdown + HTML) next to them.

    python -m tools.report RUN_DIR [RUN_DIR ...] [--out DIR] [--title TEXT]

The run directories are taken in the order given (a stage chain: stage1 stage2 stage3) and concatenated on one
x axis ("chain step": each run's steps after the previous runs' last step), with the stage boundaries marked and
labelled above the plots (staggered where a stage is short); legends sit beside the plots, off the data. Evaluations
are markers (one shape per dataset, the datasets of one evaluation spread a little along x so none hides another),
joined by a line only within a run that evaluated several times. Written (matplotlib's Agg backend: no display
needed):

    loss.png        training loss per step (raw and smoothed) and the held-out loss of every eval dataset
    eval.png        held-out generation accuracy (exact match, and "contains" dashed) per eval dataset and step,
                    and a bar chart of each dataset's exact match at the end of each stage
    lr.png          learning rate of every parameter group (vision, merger, llm)
    throughput.png  tokens/s and MFU (on CPU, where MFU is not defined: the achieved FLOP/s); grad norm
    data.png        the loader's wait per step and, when any were skipped, the skipped samples by reason (as the
                    loader counts them)
    index.md, index.html   a summary table per run (steps, time, losses, restarts, skips), the final held-out
                    figures of each stage, and the plots

Default --out: RUN_DIR/report for one run, the runs' common parent /report for several (runs/learn/report for
runs/learn/stage1..3). What the records hold is documented in train/metrics.py and train/eval.py: step records
(step, loss, lr, lr_groups, grad_norm, tokens_per_s, flops_per_s, mfu, data_wait_s, skipped_samples, elapsed_s,
...) and event records ({"event": start | checkpoint | stop | end | eval | straggler, ...}).

Restarts: a resumed run appends to its metrics.jsonl, so a step may be recorded twice (the steps after the last
checkpoint are trained again); the report keeps the LAST record of each step (and of each eval step and dataset)
and marks where each resumed process began (dotted lines; its first record has "resumed_from"). A run without
eval records gets no eval plot; an unreadable line (a record cut short by a crash) is counted and skipped.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.formatting import pct

STAGE_COLORS = ("#f3f0e6", "#e6eef5", "#eaf3e6", "#f5e9ef")
"""Background shading of alternating runs along the chain."""
LR_GROUPS = ("vision", "merger", "llm")
PLOTS = ("loss.png", "eval.png", "lr.png", "throughput.png", "data.png")
"""Every PNG a report of runs with eval records holds (eval.png only when some run has generation figures)."""


class ReportError(ValueError):
    """Nothing to plot: the message names the run directory and what is missing."""


@dataclass
class Run:
    """What one run directory's metrics.jsonl (and config.yaml) say."""

    path: Path
    label: str
    stage: int | None
    frozen: list[str]
    planned_steps: int | None
    steps: dict[int, dict[str, Any]]
    """The last step record of each step."""
    evals: dict[tuple[int, str], dict[str, Any]]
    """The last eval record of each (step, dataset)."""
    restarts: list[int] = field(default_factory=list)
    """Steps from which a resumed process continued (its records' resumed_from)."""
    train_seconds: float = 0.0
    """Summed over the run's processes: each one's last elapsed_s."""
    end_reason: str | None = None
    bad_lines: int = 0

    @property
    def last_step(self) -> int:
        return max([*self.steps, *(s for s, _ in self.evals), 0])

    @property
    def datasets(self) -> list[str]:
        return sorted({d for _, d in self.evals})

    def final_evals(self) -> dict[str, dict[str, Any]]:
        """Each dataset's eval record at the run's last evaluated step."""
        out: dict[str, dict[str, Any]] = {}
        for (_, name), rec in sorted(self.evals.items()):
            out[name] = rec
        return out


def load_run(run_dir: str | Path) -> Run:
    """Parse RUN_DIR/metrics.jsonl (and RUN_DIR/config.yaml for the stage and planned steps)."""
    path = Path(run_dir)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{metrics} does not exist: pass a run directory (the run_dir of a recipe)")
    stage, frozen, planned = None, [], None
    cfg_file = path / "config.yaml"
    if cfg_file.is_file():
        try:
            cfg = yaml.safe_load(cfg_file.read_text()) or {}
            train = cfg.get("train") or {}
            stage, planned = train.get("stage"), train.get("steps")
        except yaml.YAMLError:
            pass  # the report still works from the records alone
    steps: dict[int, dict] = {}
    evals: dict[tuple[int, str], dict] = {}
    restarts: list[int] = []
    segment_elapsed: list[float] = [0.0]
    bad = 0
    end_reason = None
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        ev = rec.get("event")
        if ev == "start":
            stage = rec.get("stage", stage)
            frozen = list(rec.get("frozen") or frozen)
            if rec.get("resumed_from") is not None or steps:
                segment_elapsed.append(0.0)  # a new process of the same run
        elif ev == "eval" and isinstance(rec.get("step"), int):
            evals[(rec["step"], str(rec.get("dataset", "eval")))] = rec
        elif ev == "end":
            end_reason = rec.get("reason")
        elif ev is None and isinstance(rec.get("step"), int) and isinstance(rec.get("loss"), (int, float)):
            if rec.get("resumed_from") is not None:
                restarts.append(int(rec["resumed_from"]))
            steps[rec["step"]] = rec
            if isinstance(rec.get("elapsed_s"), (int, float)):
                segment_elapsed[-1] = max(segment_elapsed[-1], float(rec["elapsed_s"]))
    label = f"stage {stage}" if stage is not None else path.name
    return Run(path, label, stage, frozen, planned, steps, evals, restarts, round(sum(segment_elapsed), 1),
               end_reason, bad)


# ------------------------------------------------------------------------------------------ the chain's x axis
def offsets(runs: list[Run]) -> list[int]:
    """Chain-step offset of each run: the sum of the previous runs' last steps."""
    out, total = [], 0
    for r in runs:
        out.append(total)
        total += r.last_step
    return out


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _num(rec: dict, key: str) -> float | None:
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _series(run: Run, off: int, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for s in sorted(run.steps):
        v = _num(run.steps[s], key)
        if v is not None:
            xs.append(off + s)
            ys.append(v)
    return xs, ys


EVAL_MARKERS = ("o", "s", "^", "v", "D", "P")
"""One marker shape per eval dataset, so datasets that score alike stay told apart."""
DODGE = 0.006
"""Datasets' markers of one evaluation are spread by this fraction of the chain's steps (else they hide each other)."""


def _dodge(runs: list[Run], k: int, n: int) -> float:
    """The x shift (in chain steps) of the k-th of n datasets' eval markers."""
    return (k - (n - 1) / 2) * DODGE * max(sum(r.last_step for r in runs), 1)


def _plot_evals(ax, runs: list[Run], offs: list[int], dataset: str, key: str, label: str, scale: float = 1.0,
                dashed: bool = False, shift: float = 0.0, **style) -> None:
    """One eval figure of one dataset along the chain: a marker per evaluation, joined by a line only within a run
    that has several (a line across a stage boundary would invent a trend between two stages' single points)."""
    first = True
    for r, o in zip(runs, offs):
        pts = sorted((o + s + shift, scale * float(rec[key])) for (s, d), rec in r.evals.items()
                     if d == dataset and _num(rec, key) is not None)
        if not pts:
            continue
        ls = ("--" if dashed else "-") if len(pts) > 1 else "none"
        ax.plot(*zip(*pts), ls=ls, label=label if first else None, **style)
        first = False


LABEL_ROW_PT = 19
"""Height of one row of stage labels (two lines of 7-pt text) above a plot."""
LABEL_CHAR_FRACTION = 0.0075
"""Width of one 7-pt character as a fraction of a plot's width (a 10-inch figure, the legend beside the plot)."""


def _label_rows(runs: list[Run], offs: list[int], texts: list[str]) -> list[int]:
    """A row for each stage label (0 = right above the plot): the first row where it does not run into the label
    before it, so short stages' labels are staggered instead of printed over each other."""
    total = max(sum(r.last_step for r in runs), 1)
    ends: list[float] = []  # per row: where its last label ends, in chain steps
    rows = []
    for o, text in zip(offs, texts):
        width = (max(len(line) for line in text.splitlines()) + 1) * LABEL_CHAR_FRACTION * total
        row = next((i for i, end in enumerate(ends) if end <= o), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = o + width
        rows.append(row)
    return rows


def _mark_stages(ax, runs: list[Run], offs: list[int], label: bool = True) -> int:
    """Shade each run's span, mark restarts and, with `label`, name each run (its stage and frozen groups) in a band
    above the plot, staggered where stages are short. Returns the rows of labels drawn (for the title's pad)."""
    for i, (r, o) in enumerate(zip(runs, offs)):
        ax.axvspan(o, o + max(r.last_step, 1), color=STAGE_COLORS[i % len(STAGE_COLORS)], zorder=0, lw=0)
        if i:
            ax.axvline(o, color="#777777", lw=0.8, zorder=1)
        for s in r.restarts:
            ax.axvline(o + s, color="#aa3333", lw=0.8, ls=":", zorder=1)
    if not label:
        return 0
    texts = [r.label + (f"\nfrozen: {', '.join(r.frozen)}" if r.frozen else "\nall train") for r in runs]
    rows = _label_rows(runs, offs, texts)
    for o, text, row in zip(offs, texts, rows):
        ax.annotate(text, xy=(o, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(1, 2 + row * LABEL_ROW_PT),
                    textcoords="offset points", va="bottom", ha="left", fontsize=7, color="#444444",
                    annotation_clip=False)
    return max(rows) + 1


def _title(ax, text: str, label_rows: int) -> None:
    """The plot's title above its band of stage labels."""
    ax.set_title(text, pad=4 + label_rows * LABEL_ROW_PT)


def _figure(rows: int, cols: int = 1, height: float = 3.2):
    # NOTE: matplotlib.figure.Figure directly (no pyplot): no global state and no display backend, the Agg
    # canvas is used by savefig; the report runs in training processes and on headless machines.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [a for row in axes for a in row]


def _finish(ax, ylabel: str, legend: bool = True) -> None:
    ax.set_xlabel("chain step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        _legend_beside(ax)


def _legend_beside(ax) -> None:
    """The legend to the right of the plot, never over its data (constrained layout makes the room)."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


# ------------------------------------------------------------------------------------------ the plots
def plot_loss(runs: list[Run], offs: list[int], out: Path) -> Path:
    fig, (ax,) = _figure(1, height=4.5)
    rows = _mark_stages(ax, runs, offs)
    for r, o in zip(runs, offs):
        xs, ys = _series(r, o, "loss")
        if xs:
            first = r is runs[0]
            ax.plot(xs, ys, color="#1f77b4", alpha=0.3, lw=0.8, label="training loss" if first else None)
            ax.plot(xs, _smooth(ys), color="#1f77b4", lw=1.6, label="training loss (smoothed)" if first else None)
    names = sorted({d for r in runs for d in r.datasets})
    for k, name in enumerate(names):
        _plot_evals(ax, runs, offs, name, "loss", f"held-out loss: {name}", shift=_dodge(runs, k, len(names)),
                    color=f"C{k + 1}", marker=EVAL_MARKERS[k % len(EVAL_MARKERS)], ms=5, lw=1.2, zorder=3)
    _title(ax, "loss per step (supervised tokens only; held-out loss at each evaluation)", rows)
    _finish(ax, "loss")
    return _save(fig, out / "loss.png")


def plot_eval(runs: list[Run], offs: list[int], out: Path) -> Path | None:
    names = sorted({d for r in runs for d in r.datasets
                    if any(_num(rec, "exact") is not None for (_, dd), rec in r.evals.items() if dd == d)})
    if not names:
        return None
    fig, (ax, bars) = _figure(2, height=3.6)
    rows = _mark_stages(ax, runs, offs)
    for k, name in enumerate(names):
        mk, dx = EVAL_MARKERS[k % len(EVAL_MARKERS)], _dodge(runs, k, len(names))
        _plot_evals(ax, runs, offs, name, "exact", f"{name}: exact match", scale=100, shift=dx, color=f"C{k}",
                    marker=mk, ms=6, lw=1.4, zorder=3)
        # Hollow and larger: a ring around the exact-match marker when both figures are equal.
        _plot_evals(ax, runs, offs, name, "contains", f"{name}: contains", scale=100, dashed=True, shift=dx,
                    color=f"C{k}", marker=mk, ms=10, mfc="none", lw=1.0, zorder=3)
    ax.set_ylim(-4, 104)
    _title(ax, "held-out generation accuracy (greedy) at each evaluation", rows)
    _finish(ax, "%")
    # The end-of-stage figures, one group of bars per run.
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals = []
        for r in runs:
            rec = r.final_evals().get(name)
            vals.append(100 * rec["exact"] if rec and _num(rec, "exact") is not None else None)
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(runs))]
        bars.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None], width=width,
                 color=f"C{k}", label=name)
        for x, v in zip(xs, vals):  # a run without this figure says so instead of showing a 0% bar
            bars.text(x, (v or 0) + 1, "n/a" if v is None else f"{v:.0f}%", ha="center", fontsize=8)
    bars.set_xticks(range(len(runs)), [r.label for r in runs])
    bars.set_ylim(0, 110)
    bars.set_ylabel("exact match, end of stage (%)")
    bars.grid(True, axis="y", alpha=0.3)
    _legend_beside(bars)
    return _save(fig, out / "eval.png")


def plot_lr(runs: list[Run], offs: list[int], out: Path) -> Path:
    fig, (ax,) = _figure(1)
    rows = _mark_stages(ax, runs, offs)
    seen: set[str] = set()
    for r, o in zip(runs, offs):
        groups = sorted({g for rec in r.steps.values() for g in (rec.get("lr_groups") or {})},
                        key=lambda g: LR_GROUPS.index(g) if g in LR_GROUPS else len(LR_GROUPS))
        if not groups:  # records without lr_groups: the first group's lr
            xs, ys = _series(r, o, "lr")
            ax.plot(xs, ys, color="C0", label="lr" if "lr" not in seen else None)
            seen.add("lr")
        for g in groups:
            pts = [(o + s, r.steps[s]["lr_groups"][g]) for s in sorted(r.steps)
                   if isinstance((r.steps[s].get("lr_groups") or {}).get(g), (int, float))]
            k = LR_GROUPS.index(g) if g in LR_GROUPS else 3
            # Groups often share one LR: wide solid, dashed and dotted lines keep every group visible.
            ax.plot(*zip(*pts), color=f"C{k}", lw=(3.0, 1.8, 1.4, 1.0)[k], ls=("-", "--", ":", "-.")[k],
                    label=g if g not in seen else None)
            seen.add(g)
    _title(ax, "learning rate per trainable group (frozen groups have none)", rows)
    _finish(ax, "lr")
    return _save(fig, out / "lr.png")


def plot_throughput(runs: list[Run], offs: list[int], out: Path) -> Path:
    fig, (tok, util, gn) = _figure(3, height=2.8)
    has_mfu = any(_num(rec, "mfu") is not None for r in runs for rec in r.steps.values())
    rows = [_mark_stages(ax, runs, offs, label=ax is tok) for ax in (tok, util, gn)][0]
    for r, o in zip(runs, offs):
        xs, ys = _series(r, o, "tokens_per_s")
        tok.plot(xs, ys, color="C0", alpha=0.35, lw=0.8)
        tok.plot(xs, _smooth(ys), color="C0", lw=1.5)
        if has_mfu:
            xs, ys = _series(r, o, "mfu")
            util.plot(xs, [100 * y for y in ys], color="C1", lw=1.2)
        else:
            xs, ys = _series(r, o, "flops_per_s")
            util.plot(xs, [y / 1e9 for y in ys], color="C1", alpha=0.35, lw=0.8)
            util.plot(xs, _smooth([y / 1e9 for y in ys]), color="C1", lw=1.5)
        xs, ys = _series(r, o, "grad_norm")
        gn.plot(xs, ys, color="C2", lw=1)
    _title(tok, "throughput", rows)
    _finish(tok, "tokens/s", legend=False)
    _finish(util, "MFU (%)" if has_mfu else "model GFLOP/s (no MFU on CPU)", legend=False)
    _finish(gn, "grad norm (before clipping)", legend=False)
    return _save(fig, out / "throughput.png")


def plot_data(runs: list[Run], offs: list[int], out: Path) -> Path:
    """The loader's wait per step, and (only when some sample was skipped) the skipped samples by reason."""
    reasons = skip_reasons(runs)
    fig, axes = _figure(2 if reasons else 1, height=3.0)
    wait = axes[0]
    rows = [_mark_stages(ax, runs, offs, label=ax is wait) for ax in axes][0]
    labelled: set[str] = set()
    for r, o in zip(runs, offs):
        xs, ys = _series(r, o, "data_wait_s")
        wait.plot(xs, [1000 * y for y in ys], color="C0", lw=1)
        for k, reason in enumerate(reasons):
            pts = [(o + s, (r.steps[s].get("skipped_samples") or {}).get(reason, 0)) for s in sorted(r.steps)]
            if pts:
                axes[1].step(*zip(*pts), where="post", color=f"C{k}", lw=1.4,
                             label=reason if reason not in labelled else None)
                labelled.add(reason)
    _title(wait, "data wait per step (slowest rank)", rows)
    _finish(wait, "ms", legend=False)
    if reasons:
        axes[1].set_title("skipped samples by reason (the loader's counts in each run's data pass)")
        _finish(axes[1], "samples")
    return _save(fig, out / "data.png")


def skip_reasons(runs: list[Run]) -> list[str]:
    """Every reason some run's loader skipped samples for (the step records' skipped_samples)."""
    return sorted({k for r in runs for rec in r.steps.values() for k, v in (rec.get("skipped_samples") or {}).items()
                   if v})


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------ the index
def _f(v: Any, digits: int = 4) -> str:
    return "n/a" if not isinstance(v, (int, float)) else f"{v:.{digits}f}"


def summary_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        losses = [r.steps[s]["loss"] for s in sorted(r.steps)]
        skipped: dict[str, int] = {}
        for rec in r.steps.values():
            for k, v in (rec.get("skipped_samples") or {}).items():
                skipped[k] = max(skipped.get(k, 0), int(v))
        planned = f"/{r.planned_steps}" if r.planned_steps else ""
        rows.append([r.label, str(r.path), ", ".join(r.frozen) or "-", f"{r.last_step}{planned}",
                     f"{r.train_seconds:.0f}s", _f(losses[0] if losses else None),
                     _f(losses[-1] if losses else None), str(len(r.restarts)),
                     ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "-", r.end_reason or "-"])
    return rows


SUMMARY_HEAD = ["run", "directory", "frozen", "steps", "train time", "first loss", "last loss", "restarts",
                "skipped samples", "end"]
EVAL_HEAD = ["run", "step", "dataset", "held-out loss", "exact", "contains", "n"]


def eval_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        for name, rec in r.final_evals().items():
            gen = "skipped (pp > 1)" if rec.get("generation_skipped") else None
            rows.append([r.label, str(rec["step"]), name, _f(rec.get("loss")), gen or pct(rec.get("exact")),
                         gen or pct(rec.get("contains")), str(rec.get("n", "-"))])
    return rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def write_index(runs: list[Run], plots: list[Path], out: Path, title: str) -> Path:
    notes = []
    bad = sum(r.bad_lines for r in runs)
    if bad:
        notes.append(f"{bad} unreadable metrics.jsonl line(s) skipped (a record cut short by a crash).")
    if not any(r.evals for r in runs):
        notes.append("No eval records: add an `eval:` section to the recipe for held-out figures.")
    if not skip_reasons(runs):
        notes.append("No sample was skipped (data.png shows the data wait only).")
    md = [f"# {title}", "", _md_table(SUMMARY_HEAD, summary_rows(runs)), ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
         "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>", _html_table(SUMMARY_HEAD, summary_rows(runs))]
    ev = eval_rows(runs)
    if ev:
        md += ["Held-out figures at each run's last evaluation:", "", _md_table(EVAL_HEAD, ev), ""]
        h += ["<p>Held-out figures at each run's last evaluation:</p>", _html_table(EVAL_HEAD, ev)]
    for n in notes:
        md += [n, ""]
        h.append(f"<p>{html.escape(n)}</p>")
    for p in plots:
        md += [f"![{p.stem}]({p.name})", ""]
        h.append(f"<p><img src='{html.escape(p.name)}' alt='{html.escape(p.stem)}'></p>")
    h.append("</body></html>")
    (out / "index.html").write_text("\n".join(h) + "\n")
    index = out / "index.md"
    index.write_text("\n".join(md))
    return index


def default_out(run_dirs: list[Path]) -> Path:
    if len(run_dirs) == 1:
        return run_dirs[0] / "report"
    return Path(os.path.commonpath([str(p.resolve().parent) for p in run_dirs])) / "report"


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, title: str | None = None) -> Path:
    """Write the PNGs and index.md / index.html for these runs (a chain, in order); returns index.md's path."""
    if not run_dirs:
        raise ReportError("no run directories given")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p) for p in paths]
    empty = [str(r.path) for r in runs if not r.steps]
    if len(empty) == len(runs):
        raise ReportError(f"no step records in {', '.join(empty)}: has the run trained a step yet?")
    out_dir = Path(out) if out is not None else default_out(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    offs = offsets(runs)
    plots = [plot_loss(runs, offs, out_dir), plot_eval(runs, offs, out_dir), plot_lr(runs, offs, out_dir),
             plot_throughput(runs, offs, out_dir), plot_data(runs, offs, out_dir)]
    title = title or "Training report: " + " -> ".join(r.label for r in runs)
    return write_index(runs, [p for p in plots if p is not None], out_dir, title)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", help="run directories, in chain order (e.g. runs/demo/stage1 stage2 ...)")
    ap.add_argument("--out", default=None, help="output directory (default RUN_DIR/report, or PARENT/report)")
    ap.add_argument("--title", default=None, help="the index's title")
    args = ap.parse_args(argv)
    try:
        index = write_report(args.run_dirs, args.out, args.title)
    except ReportError as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    print(f"report: {index} (and {index.with_suffix('.html').name}, PNGs next to it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
