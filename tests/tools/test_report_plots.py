"""What the report's plots show (tools/report.py; issue 23: held-out points joined across whole stages looked like a
linear ramp, short stages' labels overprinted each other, legends covered the last points, an empty panel said "no
sample was skipped"). Hand-written metrics.jsonl of a chain like the demo's: a 1-step stage, a 2-step stage and a
200-step stage; the figures are checked as drawn (Agg), before they become PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

import tools.report as report


def write_run(d: Path, stage: int, steps: int, frozen: list[str], evals: list[int], skips: bool = False) -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"train": {"stage": stage, "steps": steps}}))
    lines = [{"event": "start", "step": 0, "stage": stage, "frozen": frozen}]
    for s in range(1, steps + 1):
        lines.append({"step": s, "loss": 12.0 - 0.01 * s, "lr": 1e-3, "lr_groups": {"llm": 1e-3}, "grad_norm": 1.0,
                      "tokens_per_s": 400.0, "flops_per_s": 1e9, "data_wait_s": 0.01, "elapsed_s": float(s),
                      "skipped_samples": {"too_long": s} if skips else {}})
        if s in evals:
            for ds in ("digits", "captions"):
                rec = {"event": "eval", "step": s, "stage": stage, "dataset": ds, "loss": 3.0 + s / 100}
                if ds == "digits":
                    rec.update(exact=min(1.0, 0.1 * stage + s / 400), contains=0.5, n=10)
                lines.append(rec)
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """Every figure the report saves, by file name, drawn on an Agg canvas."""
    got: dict[str, object] = {}
    save = report._save

    def keep(fig, path):
        FigureCanvasAgg(fig).draw()
        got[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    return got


def chain(tmp_path: Path, skips: bool = False) -> list[Path]:
    return [write_run(tmp_path / "stage1", 1, 1, ["llm"], [1], skips),
            write_run(tmp_path / "stage2", 2, 2, [], [2]),
            write_run(tmp_path / "stage3", 3, 200, ["vision"], [100, 150, 200])]


def spans(dirs: list[Path]) -> list[tuple[float, float]]:
    """Each run's span along the chain, widened by the few steps the datasets' markers are spread apart."""
    runs = [report.load_run(d) for d in dirs]
    pad = report.DODGE * sum(r.last_step for r in runs)
    return [(o - pad, o + r.last_step + pad) for o, r in zip(report.offsets(runs), runs)]


def test_evaluations_are_markers_joined_only_within_a_stage(tmp_path, figures):
    dirs = chain(tmp_path)
    report.write_report(dirs, tmp_path / "out")
    bounds = spans(dirs)
    for name, n_series in (("eval.png", 2), ("loss.png", 2)):  # exact + contains of digits; loss of both datasets
        ax = figures[name].axes[0]
        evals = [ln for ln in ax.get_lines() if ln.get_marker() not in ("None", None, "")]
        per_run = {}
        for ln in evals:
            xs = list(ln.get_xdata())
            run = next(i for i, (a, b) in enumerate(bounds) if a <= min(xs) and max(xs) <= b)  # never across stages
            per_run.setdefault(run, []).append(ln)
            if len(xs) == 1:
                assert ln.get_linestyle() == "None", (name, xs)  # a lone evaluation: a marker, no line
        assert sorted(per_run) == [0, 1, 2] and all(len(v) == n_series for v in per_run.values()), name
        assert [len(ln.get_xdata()) for ln in per_run[2]] == [3] * n_series  # stage 3: a line through its three


def _extent(artist, fig):
    return artist.get_window_extent(renderer=fig.canvas.get_renderer())


def test_stage_labels_and_legends_stay_off_each_other_and_the_data(tmp_path, figures):
    report.write_report(chain(tmp_path), tmp_path / "out")
    for name, fig in figures.items():
        for ax in fig.axes:
            box = _extent(ax, fig)  # the plot area
            labels = [t for t in ax.texts if t.get_text().startswith("stage ")]
            boxes = [_extent(t, fig) for t in labels]
            for i, a in enumerate(boxes):
                assert a.y0 >= box.y1 - 1, (name, labels[i].get_text())  # above the plot, not over its lines
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), (name, [t.get_text() for t in labels])
            if boxes:
                assert _extent(ax.title, fig).y0 >= max(b.y1 for b in boxes) - 1, name  # the title above them
                assert len(labels) == 3
            legend = ax.get_legend()
            if legend is not None:
                assert _extent(legend, fig).x0 >= box.x1, name  # beside the plot


def test_a_panel_without_data_is_left_out(tmp_path, figures):
    out = report.write_report(chain(tmp_path / "clean"), tmp_path / "clean_out")
    assert len(figures["data.png"].axes) == 1  # data wait only: nothing was skipped
    assert "No sample was skipped" in out.read_text()
    report.write_report(chain(tmp_path / "skips", skips=True), tmp_path / "skips_out")
    wait, skipped = figures["data.png"].axes
    assert skipped.get_legend().get_texts()[0].get_text() == "too_long"
