"""The offline evaluation CLI (tools/eval.py): on an HF directory every prediction equals transformers' greedy
`generate` on the same prompt; bad input is one line. (Its agreement with the in-training evaluation on our
checkpoints is tested in tests/train/test_eval.py.)"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from data.config import DataConfig, DatasetSpec
from data.sample import SampleProcessor
from model.family import FAMILY_NAMES, get_family, get_preset
from model.parity import make_tiny_checkpoint, mm_token_type_ids
from model.vision import normalize_pixel_rows
from tests.data.datahelpers import tokenizer_dir
from tests.train.qa_data import write_qa_dataset
from tools.eval import main
from train.eval import qa_samples


def tiny():
    return get_preset("qwen2_vl", "tiny")


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory) -> str:
    return write_qa_dataset(tmp_path_factory.mktemp("qa"))


@pytest.mark.timeout(300)
def test_cli_on_hf_dir_equals_transformers_generate(qa_dir, tmp_path, capsys):
    """`python -m tools.eval HF_DIR --data ...` writes every prediction; each equals transformers' greedy
    `generate` on the same prompt (ids, pixel values, grids), decoded the same way."""
    from transformers import Qwen2VLForConditionalGeneration

    hf_dir = make_tiny_checkpoint(tmp_path / "hf", tiny(), seed=4)
    out = tmp_path / "report.json"
    rc = main([str(hf_dir), "--data", qa_dir, "--tokenizer", tokenizer_dir(), "--max-new-tokens", "5",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "heldout: exact 0.0% contains 0.0% on 4 samples" in printed and str(out) in printed
    report = json.loads(out.read_text())
    fig = report["datasets"]["heldout"]
    assert fig["n"] == 4 and fig["skipped"] == {"not_chat": 1, "no_reference": 1}
    preds = report["predictions"]
    assert [p["reference"] for p in preds] == ["A cat.", "To the right.", "Six.", "A cat."]
    assert set(preds[0]) == {"dataset", "key", "prompt", "reference", "prediction", "exact", "contains", "finished"}
    assert fig["exact"] == sum(p["exact"] for p in preds) / 4

    hf = Qwen2VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    cfg = dataclasses.replace(DataConfig(tokenizer=tokenizer_dir()), datasets=[DatasetSpec(qa_dir)])
    proc = SampleProcessor(cfg)
    samples, _ = qa_samples(cfg, cfg.datasets[0], 0, proc)
    sp, vcfg = proc.tok.special, get_family("qwen2_vl").processing(tiny())
    for s, p in zip(samples, preds):
        b = s.batch
        kw = {"input_ids": b.input_ids[None], "attention_mask": torch.ones_like(b.input_ids)[None],
              "mm_token_type_ids": mm_token_type_ids(b.input_ids, tiny())[None]}
        if b.image_grid_thw.numel():
            kw.update(pixel_values=normalize_pixel_rows(b.pixel_values, vcfg), image_grid_thw=b.image_grid_thw)
        if b.video_grid_thw.numel():
            kw.update(pixel_values_videos=normalize_pixel_rows(b.pixel_values_videos, vcfg),
                      video_grid_thw=b.video_grid_thw)
        hf.model.rope_deltas = None
        seq = hf.generate(**kw, do_sample=False, max_new_tokens=5, eos_token_id=[sp.im_end, sp.endoftext],
                          pad_token_id=sp.endoftext)[0, b.input_ids.numel():].tolist()
        if seq and seq[-1] in (sp.im_end, sp.endoftext):
            seq = seq[:-1]
        assert p["key"] == s.key and p["prediction"] == proc.tok.decode(seq), p["key"]



@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cli_report_goes_into_the_hf_dir_and_prints_the_loss(qa_dir, tmp_path, capsys, family):
    """Every family: the held-out loss reads the data with the model's processor facts (not Qwen2-VL's)."""
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", get_preset(family, "tiny"), seed=4)
    assert main([str(hf_dir), "--data", qa_dir, "--tokenizer", tokenizer_dir(), "--max-new-tokens", "1",
                 "--max-samples", "1"]) == 0
    out = hf_dir / "eval" / "offline.json"
    printed = capsys.readouterr().out
    fig = json.loads(out.read_text())["datasets"]["heldout"]
    assert fig["n"] == 1 and fig["loss"] > 0 and fig["supervised_tokens"] > 0
    assert f"held-out loss {fig['loss']:.4f} over {fig['supervised_tokens']} supervised tokens" in printed
    assert f"predictions: {out}" in printed


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    rc = main([str(tmp_path / "nothing"), "--data", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval failed:") and "\n" not in err
