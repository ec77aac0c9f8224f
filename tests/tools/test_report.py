"""The plotting report (tools/report.py) on real short runs: a stage chain where one run has no eval records and
the next was stopped and resumed (its metrics.jsonl appended, a step recorded twice) and evaluates held-out data;
plus the edge cases of the reader on a hand-written metrics.jsonl (a line cut short, no eval, no steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.train.train_helpers import RECIPES, demo_config
from tools.report import PLOTS, ReportError, load_run, main, offsets, write_report
from train.trainer import run

SHORT = ["checkpoint.keep_last=0", "optim.warmup_steps=1", "data.max_tokens=160"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> dict[int, dict]:
    """The last step record of each step, straight from metrics.jsonl."""
    return {r["step"]: r for r in _records(run_dir) if "event" not in r}


@pytest.fixture
def figures(monkeypatch) -> dict[str, Any]:
    """Every figure the report saves, by file name (the last one saved under a name), captured at savefig."""
    from matplotlib.figure import Figure

    saved: dict[str, Any] = {}
    savefig = Figure.savefig

    def capture(fig, fname, *args, **kwargs):
        saved[Path(fname).name] = fig
        return savefig(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    return saved


def _lines(fig) -> list[tuple[list[float], list[float]]]:
    """(x, y) of every line drawn in the figure (any axes, any style)."""
    return [(np.asarray(ln.get_xdata(), float).tolist(), np.asarray(ln.get_ydata(), float).tolist())
            for ax in fig.axes for ln in ax.get_lines()]


def _drawn(fig, xs: list[float], ys: list[float]) -> bool:
    """Some line of the figure has exactly these points (in this order)."""
    return any(len(x) == len(xs) and x == pytest.approx(xs) and y == pytest.approx(ys, rel=1e-12)
               for x, y in _lines(fig))


def _series(run_dir: Path, off: int, key, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(chain step, value) of one figure of the step records; key: a record key or a function of the record."""
    get = key if callable(key) else lambda r: r.get(key)
    pts = [(off + s, scale * get(r)) for s, r in sorted(_steps(run_dir).items()) if get(r) is not None]
    return [float(x) for x, _ in pts], [y for _, y in pts]


def _png_ok(path: Path) -> None:
    """A real PNG with a drawing in it (not one flat colour)."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 200
        px = np.asarray(im.convert("L"))
    assert px.std() > 5 and len(np.unique(px)) > 20


@pytest.fixture(scope="module")
def chain(demo_dir, tmp_path_factory) -> tuple[Path, Path]:
    """stage 1 (3 steps, no eval) -> stage 3 (2 steps, saved; then resumed to 4 steps, eval every 2 steps)."""
    root = tmp_path_factory.mktemp("report")
    s1, s3 = root / "stage1", root / "stage3"
    run(demo_config(demo_dir, RECIPES / "stage1.yaml", [f"run_dir={s1}", "train.steps=3", "checkpoint.every=0",
                                                        *SHORT]))
    ev = [f"eval.datasets=[{{path: {demo_dir / 'data' / 'heldout_digits'}, kind: chat, name: digits}}]",
          "eval.max_samples=4", "eval.max_new_tokens=2", "eval.every=2"]
    common = [f"run_dir={s3}", f"model.init_from={s1}", "checkpoint.every=1", *SHORT, *ev]
    run(demo_config(demo_dir, RECIPES / "stage3.yaml", [*common, "train.steps=2"]))
    # The resumed process redoes nothing here (it starts at the saved step 2); make step 2 appear twice the way a
    # crash after an unsaved step does: a restart from step 1's checkpoint.
    (s3 / "checkpoints" / "step_00000002").rename(s3 / "checkpoints" / "old_step_2")
    run(demo_config(demo_dir, RECIPES / "stage3.yaml", [*common, "train.steps=4"]))
    return s1, s3


@pytest.mark.timeout(500)
def test_report_of_a_resumed_chain_with_and_without_eval(chain, tmp_path, capsys, figures):
    s1, s3 = chain
    recs = _records(s3)
    steps = [r["step"] for r in recs if "event" not in r]
    assert steps == [1, 2, 2, 3, 4]  # the real file: step 2 trained twice, once per process
    assert next(r for r in recs if "event" not in r and r["step"] == 2 and "resumed_from" in r)["resumed_from"] == 1

    r1, r3 = load_run(s1), load_run(s3)
    assert (r1.stage, r1.frozen, r1.evals, r1.restarts) == (1, ["llm"], {}, [])
    assert r3.stage == 3 and r3.frozen == ["vision"] and r3.restarts == [1]
    last2 = [r for r in recs if "event" not in r and r["step"] == 2][-1]
    assert r3.steps[2]["loss"] == last2["loss"]  # the last record of a step wins
    assert sorted(r3.evals) == [(2, "digits"), (4, "digits")]  # evaluated at 2 (both processes: the last kept), 4
    assert offsets([r1, r3]) == [0, 3]

    out = tmp_path / "rep"
    assert main([str(s1), str(s3), "--out", str(out)]) == 0
    assert f"report: {out / 'index.md'}" in capsys.readouterr().out
    for name in PLOTS:
        _png_ok(out / name)
    # The plotted data itself: each run's figures from its records, at its chain steps (stage 3 after stage 1's 3).
    assert set(figures) == set(PLOTS)
    for run_dir, off in ((s1, 0), (s3, 3)):
        for png, key, scale in (("loss.png", "loss", 1), ("throughput.png", "tokens_per_s", 1),
                                ("throughput.png", "grad_norm", 1), ("throughput.png", "flops_per_s", 1e-9),
                                ("data.png", "data_wait_s", 1000)):
            xs, ys = _series(run_dir, off, key, scale)
            assert len(xs) == {s1: 3, s3: 4}[run_dir] and _drawn(figures[png], xs, ys), (png, key, run_dir)
        groups = sorted({g for r in _steps(run_dir).values() for g in r["lr_groups"]})
        assert groups == {s1: ["merger", "vision"], s3: ["llm", "merger"]}[run_dir], groups
        for g in groups:
            assert _drawn(figures["lr.png"], *_series(run_dir, off, lambda r, g=g: r["lr_groups"][g])), (g, run_dir)
    last = {r["step"]: r for r in recs if r.get("event") == "eval"}  # the last record of each evaluated step
    evals = [last[s] for s in sorted(last)]
    assert [r["step"] for r in evals] == [2, 4]
    assert _drawn(figures["loss.png"], [5.0, 7.0], [r["loss"] for r in evals])
    for key in ("exact", "contains"):
        assert _drawn(figures["eval.png"], [5.0, 7.0], [100 * r[key] for r in evals]), key
    md = (out / "index.md").read_text()
    final = [r for r in recs if r.get("event") == "eval"][-1]
    exact = f"{100 * final['exact']:.1f}%"
    assert f"| stage 3 | 4 | digits | {final['loss']:.4f} | {exact} |" in md
    assert f"| stage 1 | {s1} | llm | 3/3 |" in md and f"| stage 3 | {s3} | vision | 4/4 |" in md
    assert "| 1 |" in md.split(f"| stage 3 | {s3}")[1].splitlines()[0]  # one restart
    html = (out / "index.html").read_text()
    assert all(f"src='{name}'" in html for name in PLOTS)

    # One run without eval records: no eval plot, a note instead; default --out is RUN_DIR/report.
    index = write_report([s1])
    assert index == s1 / "report" / "index.md" and not (s1 / "report" / "eval.png").exists()
    assert "No eval records" in index.read_text()
    _png_ok(s1 / "report" / "loss.png")
    assert _drawn(figures["loss.png"], *_series(s1, 0, "loss"))  # alone: no offset


@pytest.mark.timeout(60)
def test_reader_edge_cases(tmp_path, capsys, figures):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lines = [
        {"event": "start", "step": 0, "stage": 2, "frozen": []},
        {"step": 1, "loss": 3.0, "lr": 1e-3, "lr_groups": {"vision": 1e-3, "llm": 2e-3}, "grad_norm": 1.0,
         "tokens_per_s": 10.0, "flops_per_s": 1e9, "mfu": None, "data_wait_s": 0.01, "elapsed_s": 5.0,
         "skipped_samples": {"bad_image": 1}},
        {"step": 2, "loss": float("nan"), "lr": 1e-3, "elapsed_s": 9.0},  # a skipped (non-finite) step
    ]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 3, "loss": 2.'  # cut short by a crash
    (run_dir / "metrics.jsonl").write_text(text)
    r = load_run(run_dir)
    assert r.bad_lines == 1 and sorted(r.steps) == [1, 2] and r.stage == 2 and r.train_seconds == 9.0
    index = write_report([run_dir], tmp_path / "out")
    md = index.read_text()
    assert "1 unreadable metrics.jsonl line" in md and "bad_image 1" in md
    assert not (tmp_path / "out" / "eval.png").exists()
    assert _drawn(figures["loss.png"], [1.0], [3.0])  # the non-finite step 2 is left out, not drawn as a gap at 0
    assert _drawn(figures["lr.png"], [1.0], [2e-3]) and _drawn(figures["data.png"], [1.0], [10.0])

    (tmp_path / "nosteps").mkdir()
    (tmp_path / "nosteps" / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ReportError, match="no step records"):
        write_report([tmp_path / "nosteps"])
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl does not exist" in err and len(err.strip().splitlines()) == 1
