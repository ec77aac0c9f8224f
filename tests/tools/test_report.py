"""The plotting report (tools/report.py) on real short runs: a stage chain where one run has no eval records and
the next was stopped and resumed (its metrics.jsonl appended, a step recorded twice) and evaluates held-out data;
plus the edge cases of the reader on a hand-written metrics.jsonl (a line cut short, no eval, no steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.train.train_helpers import RECIPES
from tools.report import PLOTS, ReportError, load_run, main, offsets, write_report
from train.config import load_config
from train.trainer import run

SHORT = ["checkpoint.keep_last=0", "optim.warmup_steps=1", "data.max_tokens=160"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _png_ok(path: Path) -> None:
    """A real PNG with a drawing in it (not one flat colour)."""
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 200
        px = np.asarray(im.convert("L"))
    assert px.std() > 5 and len(np.unique(px)) > 20


@pytest.fixture(scope="module")
def chain(demo_dir, tmp_path_factory) -> tuple[Path, Path]:
    """stage 1 (3 steps, no eval) -> stage 3 (2 steps, saved; then resumed to 4 steps, eval every 2 steps)."""
    import os

    os.environ["DEMO_DIR"] = str(demo_dir)
    root = tmp_path_factory.mktemp("report")
    s1, s3 = root / "stage1", root / "stage3"
    run(load_config(RECIPES / "stage1.yaml", [f"run_dir={s1}", "train.steps=3", "checkpoint.every=0", *SHORT]))
    ev = [f"eval.datasets=[{{path: {demo_dir / 'data' / 'heldout_digits'}, kind: chat, name: digits}}]",
          "eval.max_samples=4", "eval.max_new_tokens=2", "eval.every=2"]
    common = [f"run_dir={s3}", f"model.init_from={s1}", "checkpoint.every=1", *SHORT, *ev]
    run(load_config(RECIPES / "stage3.yaml", [*common, "train.steps=2"]))
    # The resumed process redoes nothing here (it starts at the saved step 2); make step 2 appear twice the way a
    # crash after an unsaved step does: a restart from step 1's checkpoint.
    (s3 / "checkpoints" / "step_00000002").rename(s3 / "checkpoints" / "old_step_2")
    run(load_config(RECIPES / "stage3.yaml", [*common, "train.steps=4"]))
    return s1, s3


@pytest.mark.timeout(500)
def test_report_of_a_resumed_chain_with_and_without_eval(chain, tmp_path, capsys):
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


@pytest.mark.timeout(60)
def test_reader_edge_cases(tmp_path, capsys):
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

    (tmp_path / "nosteps").mkdir()
    (tmp_path / "nosteps" / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ReportError, match="no step records"):
        write_report([tmp_path / "nosteps"])
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl does not exist" in err and len(err.strip().splitlines()) == 1
