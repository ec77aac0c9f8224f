"""A training run survives samples that break (issue 22): text spelling `<|image_pad|>` (before: a ValueError in
position-id building killed the run, and every restart died on the same sample), a box at 1e308 (before: an
OverflowError), and an unexpected exception in any stage of the per-sample path; the run finishes its steps and
its metrics count each skip by reason."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
from train_helpers import RECIPES

import data.sample as sample_mod
from data.sample import SampleProcessor
from train.config import load_config
from train.trainer import run

# Stages of the per-sample path (names in data.sample); the failing samples rotate over them.
STAGES = ("parse_sample", "media_bytes", "load_image", "render", "tokenize", "position_ids", "shift_labels")


def _poison_dataset(root: Path, demo_dir: Path) -> str:
    """A few samples of the demo's stage-3 images, with text that spells a vision pad and a box at 1e308."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from datahelpers import js, small_image, write_dataset

    img = small_image(0, 56, 56)
    chat = lambda u, a: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}  # noqa: E731
    samples = [
        ("pad", {"json": js(chat("what is <|image_pad|> for?", "nothing"))}),
        ("box", {"json": js(chat([{"type": "image", "image": "img0.png"}, {"type": "text", "text": "where?"}],
                                 [{"type": "box", "box": [0, 0, 1e308, 1e308]}])), "img0.png": img}),
    ]
    return write_dataset(root / "poison", samples)


@pytest.mark.timeout(600)
def test_a_run_with_breaking_samples_finishes_its_steps(demo_dir, tmp_path, monkeypatch):
    current = {"key": ""}
    process = SampleProcessor.process

    def tracking(self, raw, *a, **k):
        current["key"] = raw.key
        return process(self, raw, *a, **k)

    def failing(name, real):
        def f(*a, **k):
            # About one sample in five fails, each in one stage (the same sample always in the same stage).
            h = zlib.crc32(current["key"].encode())
            if current["key"].startswith("stage3/") and h % 5 == 0 and STAGES[h // 5 % len(STAGES)] == name:
                raise RuntimeError(f"injected failure in {name}")
            return real(*a, **k)
        return f

    monkeypatch.setattr(SampleProcessor, "process", tracking)
    for name in STAGES:
        monkeypatch.setattr(sample_mod, name, failing(name, getattr(sample_mod, name)))
    poison = _poison_dataset(tmp_path, demo_dir)
    os.environ["DEMO_DIR"] = str(demo_dir)
    run_dir = tmp_path / "run"
    cfg = load_config(RECIPES / "stage3.yaml", [
        f"run_dir={run_dir}", "model.init_from=null", "optim.warmup_steps=1", "data.max_tokens=256",
        "data.num_workers=0", "train.steps=6", "checkpoint.every=0", "data.max_error_fraction=0.5",
        f"data.datasets=[{{path: {demo_dir}/data/stage3, kind: chat, weight: 4}}, {{path: {poison}, kind: chat}}]",
    ])
    result = run(cfg)
    assert result.stop_reason == "completed" and result.final_step == 6
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["skipped_samples"] for r in recs if "skipped_samples" in r][-1]
    assert skipped.get("control_token_in_text", 0) >= 1 and skipped.get("error", 0) >= 3, skipped
    assert [r for r in recs if "loss" in r and "event" not in r][-1].get("clamped_boxes", 0) >= 1
