"""The parity suite (python -m model.parity) against transformers on tiny random checkpoints of every family."""

from __future__ import annotations

import re

import pytest

import model.text as text
from model import parity
from model.parity import main, make_tiny_checkpoint, run_parity
from tests.model.conftest import small_cfg

LAST_LINE = re.compile(r"^max_abs_logit_diff=(\S+)$")


def test_parity_cli_passes_on_tiny_checkpoint(hf_tiny_dir, family, capsys):
    rc = main(["--hf", hf_tiny_dir, "--tol", "1e-4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, "\n".join(lines)
    case_lines = [ln for ln in lines if ln.startswith(("ok", "FAIL"))]
    names = [c.name for c in parity.default_cases(small_cfg(family))]
    assert len(case_lines) == len(names) == 7
    for ln, name in zip(case_lines, names):
        assert name in ln and ln.startswith("ok")
        assert float(re.search(r"max_abs_logit_diff=(\S+)", ln)[1]) <= 1e-4
    m = LAST_LINE.match(lines[-1])
    assert m and float(m[1]) <= 1e-4
    # The logits are not trivially small (a zero model would pass any absolute tolerance).
    assert all(float(re.search(r"max\|logit\|=(\S+)", ln)[1]) > 0.1 for ln in case_lines)
    # The video with 6 frame pairs on a 2x3 merged grid is where transformers 5.x's own rope index departs from
    # the reference (Qwen2.5-VL's scaled time too); Qwen3-VL's per-frame blocks are where the two agree.
    video = next(ln for ln in case_lines if "one video" in ln)
    assert ("rope_index: same" in video) == (family == "qwen3_vl"), video
    assert "rope_index: same" in next(ln for ln in case_lines if "one image " in ln)


def test_parity_cli_fails_when_the_network_differs(hf_tiny_dir, capsys, monkeypatch):
    # Break our decoder's rotary embedding: the suite must notice, exit 1 and still end with the summary line.
    monkeypatch.setattr(text, "apply_rope", lambda x, cos, sin: x)
    rc = main(["--hf", hf_tiny_dir])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 1
    assert any(ln.startswith("FAIL") for ln in lines)
    m = LAST_LINE.match(lines[-1])
    assert m and float(m[1]) > 1e-4


def test_parity_tied_sharded_transformers5_layout(tmp_path):
    """2B-style tied head, stored in the 5.x in-memory key layout and sharded: our loader path end to end."""
    d = make_tiny_checkpoint(tmp_path / "tied", small_cfg(tie=True), seed=3, layout="transformers5",
                             max_shard_bytes=2_000_000)
    assert (d / "model.safetensors.index.json").exists()
    out = []
    worst, results = run_parity(d, print_fn=out.append)
    assert worst <= 1e-4, "\n".join(out)
    assert LAST_LINE.match(out[-1])


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen3_vl"])
def test_make_tiny_cli(tmp_path, capsys, family_name):
    assert main(["--make-tiny", str(tmp_path / "t"), "--family", family_name]) == 0
    assert (tmp_path / "t" / "config.json").exists() and (tmp_path / "t" / "model.safetensors").exists()
    assert f'"model_type": "{family_name}"' in (tmp_path / "t" / "config.json").read_text()


def test_parity_requires_hf_or_make_tiny():
    with pytest.raises(SystemExit):
        main([])
