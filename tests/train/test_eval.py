"""Held-out evaluation during training (train/eval.py): answer normalization, prompts equal to transformers' chat
template with the generation prompt, the split of samples over dp ranks, and the in-training evaluation (metrics
records, prediction files, held-out loss) on one process and under dp2 / tp2 / pp2 (gloo), against the offline CLI
(tools/eval.py, tested against transformers' `generate` in tests/tools/test_eval_cli.py)."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from qa_data import IMG_Q, MULTI, VID_Q, data_cfg, write_qa_dataset
from train_helpers import RECIPES, SHORT, demo_config, env_for, torchrun

from data.config import DataConfig, DatasetSpec
from data.sample import SampleProcessor
from data.tokenizer import Tokenizer
from tests.data.datahelpers import hf_processor, small_image, tokenizer_dir
from tools.eval import heldout_loss, load_for_eval
from tools.eval import main as eval_cli
from train.config import load_config
from train.eval import normalize_answer, qa_samples, score
from train.metrics import MetricsLogger
from train.trainer import run


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory) -> str:
    return write_qa_dataset(tmp_path_factory.mktemp("qa"))


def test_normalize_and_score():
    assert normalize_answer("  It is  the digit\n7. ") == "it is the digit 7"
    assert normalize_answer("Yes!?") == "yes" and normalize_answer("") == ""
    assert normalize_answer("(3)") == "(3)"  # only sentence punctuation at the end goes
    assert score("It is the digit 7.", "it is the digit 7") == (True, True)
    assert score("It is 7, I think", "7") == (False, True)
    assert score("It is 17.", "7") == (False, False)  # a whole phrase, not a part of a number
    assert score("sevenfold", "seven") == (False, False)
    assert score("anything", "") == (False, False)


def test_prompts_equal_transformers_chat_template(qa_dir):
    """Each prompt is the chat template with add_generation_prompt=True over the messages before the last
    assistant turn, tokenized and expanded by transformers' processor; the reference is that turn's text."""
    cfg = data_cfg(qa_dir)
    samples, skips = qa_samples(cfg, cfg.datasets[0], 0, SampleProcessor(cfg))
    assert [s.key.rsplit("/", 1)[-1] for s in samples] == ["img", "vid", "multi", "img2"]
    assert skips == {"not_chat": 1, "no_reference": 1}
    assert [s.reference for s in samples] == ["A cat.", "To the right.", "Six.", "A cat."]
    proc = hf_processor(*cfg.image_pixels())
    members = {"img": small_image(2, 56, 84), "img2": small_image(0, 84, 56)}
    for s in samples:
        name = s.key.rsplit("/", 1)[-1]
        msgs = {"img": IMG_Q, "img2": IMG_Q, "multi": MULTI, "vid": VID_Q}[name][:-1]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        b = s.batch
        if name == "vid":  # transformers' video processor needs torchvision: compare the expanded text instead
            t, h, w = b.video_grid_thw[0].tolist()
            text = text.replace("<|video_pad|>", "<|video_pad|>" * (t * h * w // 4))
            ref = proc.tokenizer(text)["input_ids"]
        else:
            images = [Image.open(io.BytesIO(members[name]))] if name in members else None
            out = proc(text=[text], images=images, return_tensors="pt")
            ref = out["input_ids"][0].tolist()
            if images:
                assert b.image_grid_thw.tolist() == out["image_grid_thw"].tolist()
        assert b.input_ids.tolist() == ref, name
        assert (b.labels == -100).all() and b.position_ids.shape == (3, len(ref))
    assert "<|image_pad|>x" in samples[0].prompt and "Which animal" in samples[0].prompt


def test_samples_split_over_ranks(qa_dir):
    cfg = data_cfg(qa_dir)
    proc = SampleProcessor(cfg)
    whole = [s.key for s in qa_samples(cfg, cfg.datasets[0], 0, proc)[0]]
    shares = [qa_samples(cfg, cfg.datasets[0], 0, proc, rank=r, world=2) for r in range(2)]
    assert [s.key for s in shares[0][0]] == whole[0::2] and [s.key for s in shares[1][0]] == whole[1::2]
    assert shares[0][1] == {"not_chat": 1, "no_reference": 1} and shares[1][1] == {}  # counted once
    first3 = [s.key for r in range(2) for s in qa_samples(cfg, cfg.datasets[0], 0, proc, rank=r, world=2,
                                                          max_samples=3)[0]]
    assert sorted(first3) == sorted(whole[:3])
    pre = dataclasses.replace(cfg.datasets[0], kind="pretrain")
    assert qa_samples(cfg, pre, 0, proc) == ([], {})  # a pretraining dataset has no questions


def test_metrics_logger_eval_record(tmp_path, capsys):
    """An eval record: metrics.jsonl (event 'eval'), one console line, W&B keys eval/<dataset>/<figure>."""
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    logger = MetricsLogger(cfg, is_main=True)
    logged = []
    logger._wandb = type("FakeRun", (), {"log": lambda self, d, step: logged.append((step, d))})()
    rec = {"step": 5, "stage": 3, "dataset": "digits", "loss": 1.25, "exact": 0.5, "contains": 0.75, "n": 8,
           "skipped": {}}
    logger.eval(rec)
    logger._wandb = None
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["event"] == "eval" and {k: line[k] for k in rec} == rec
    out = capsys.readouterr().out
    assert "eval      5 | stage 3 | digits | loss 1.2500 | exact 50.0% | contains 75.0% | n 8" in out
    assert logged == [(5, {"eval/digits/loss": 1.25, "eval/digits/exact": 0.5, "eval/digits/contains": 0.75,
                           "eval/digits/n": 8})]


# ------------------------------------------------------------------------------------------ during training
def eval_overrides(qa_dir: str, *extra: str) -> list[str]:
    # The tiny recipes' own pixel limits (small images, 16 tokens per video frame pair) apply to the eval data too.
    return [f"eval.datasets=[{{path: {qa_dir}, kind: chat}}]", "eval.max_new_tokens=4", *extra]


def eval_records(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == "eval"]


def reference_loss(ckpt_dir: Path, root: str, cfg: DataConfig) -> float:
    """The held-out loss recomputed in this process, without the engine: the checkpoint in a plain model, the eval
    data once, summed supervised-token cross-entropies / their count (tools.eval's held-out loss)."""
    model, _ = load_for_eval(ckpt_dir)
    loss, count = heldout_loss(model, cfg, DatasetSpec(root, kind="chat"))
    assert count > 0
    return loss


def predictions(run_dir: Path, step: int) -> dict[str, str]:
    out = {}
    for f in sorted((Path(run_dir) / "eval" / f"step_{step:08d}").glob("heldout.dp*.jsonl")):
        for line in f.read_text().splitlines():
            p = json.loads(line)
            assert p["key"] not in out  # every sample answered by exactly one dp rank
            out[p["key"]] = p["prediction"]
    return out


def offline_predictions(ckpt: Path, qa_dir: str, tmp_path: Path) -> dict[str, str]:
    out = tmp_path / "offline.json"
    assert eval_cli([str(ckpt), "--data", qa_dir, "--max-new-tokens", "4", "--out", str(out)]) == 0
    return {p["key"]: p["prediction"] for p in json.loads(out.read_text())["predictions"]}


# Scripted answers (the tiny random model answers nothing right, so its figures are always 0%): by the prompt's
# media, one exact ("Six." to the text-only chat), one containing its reference ("To the right." inside a longer
# answer to the video question) and two wrong ("A dog." to the two "A cat." image questions): exact 25%, contains 50%.
SCRIPTED = {"text": "six", "video": "It moves to the right, I think.", "image": "A dog."}
SCRIPTED_BY_KEY = {"multi": "six", "vid": "It moves to the right, I think.", "img": "A dog.", "img2": "A dog."}


def by_name(preds: dict[str, str]) -> dict[str, str]:
    """Predictions by sample name (the key's last part)."""
    return {k.rsplit("/", 1)[-1]: v for k, v in preds.items()}


def scripted_generate(monkeypatch, scripted_calls: int | None = None) -> list[str]:
    """Replace greedy generation (train/eval.py's, which tools/eval.py also calls) by the scripted answers for the
    first `scripted_calls` prompts (all when None), each ended by <|im_end|>; later prompts are generated for
    real. Returns the list of answers given (the real ones as None)."""
    import train.eval as ev
    from model.generate import Generation, greedy_generate

    tok = Tokenizer.load(tokenizer_dir())
    given: list[str | None] = []

    def generate(model, input_ids, **kw):
        if scripted_calls is not None and len(given) >= scripted_calls:
            given.append(None)
            return greedy_generate(model, input_ids, **kw)
        media = "video" if kw["video_grid_thw"].numel() else "image" if kw["image_grid_thw"].numel() else "text"
        given.append(SCRIPTED[media])
        return Generation(tok.encode(SCRIPTED[media]) + [tok.special.im_end], finished=True)

    monkeypatch.setattr(ev, "greedy_generate", generate)
    return given


@pytest.mark.timeout(400)
def test_in_training_eval_one_process(demo_dir, qa_dir, tmp_path, monkeypatch, capsys):
    """Step 1's evaluation answers from the script: its record says exact 25% and contains 50%. Step 2's is
    generated for real and equals the same checkpoint evaluated offline; offline with the script, 25% / 50%."""
    run_dir = tmp_path / "run"
    cfg = demo_config(demo_dir, RECIPES / "stage3.yaml", [
        f"run_dir={run_dir}", "model.init_from=null", "train.steps=2", "checkpoint.every=0", "optim.warmup_steps=1",
        "data.max_tokens=160", *eval_overrides(qa_dir, "eval.every=1")])
    given = scripted_generate(monkeypatch, scripted_calls=4)
    res = run(cfg)
    assert given[:4] != [None] * 4 and given[4:] == [None] * 4  # step 1 scripted, step 2 generated
    recs = eval_records(run_dir)
    assert [r["step"] for r in recs] == [1, 2]  # every step, and not twice at the end
    for r in recs:
        assert r["stage"] == 3 and r["dataset"] == "heldout" and r["n"] == 4
        assert r["skipped"] == {"not_chat": 1, "no_reference": 1}
        assert 0.0 <= r["exact"] <= 1.0 and 0.0 <= r["contains"] <= 1.0
        assert r["loss"] > 0 and r["supervised_tokens"] > 0
    assert by_name(predictions(run_dir, 1)) == SCRIPTED_BY_KEY
    assert (recs[0]["exact"], recs[0]["contains"]) == (0.25, 0.5)
    assert recs[0]["loss"] != recs[1]["loss"]  # the weights changed between the two evaluations
    # The final evaluation equals the same checkpoint evaluated offline (one process, no engine).
    monkeypatch.undo()
    assert predictions(run_dir, 2) == offline_predictions(res.checkpoint, qa_dir, tmp_path)
    assert recs[1]["loss"] == pytest.approx(reference_loss(res.checkpoint, qa_dir, cfg.data), rel=1e-5)
    # The offline CLI's held-out loss is the engine's, and its report goes into the evaluated run (issue 23: it was
    # written to the working directory), next to the in-training predictions of that step.
    assert eval_cli([str(run_dir), "--data", qa_dir, "--kind", "chat", "--max-new-tokens", "1", "--max-samples",
                     "1"]) == 0
    offline = json.loads((run_dir / "eval" / "step_00000002" / "offline.json").read_text())["datasets"]["heldout"]
    assert offline["n"] == 1 and offline["supervised_tokens"] == recs[1]["supervised_tokens"]
    assert offline["loss"] == pytest.approx(recs[1]["loss"], rel=1e-5)
    # Offline, scripted: the same figures in its report and its printed line.
    scripted_generate(monkeypatch)
    capsys.readouterr()
    assert by_name(offline_predictions(res.checkpoint, qa_dir, tmp_path)) == SCRIPTED_BY_KEY
    report = json.loads((tmp_path / "offline.json").read_text())
    fig = report["datasets"]["heldout"]
    assert (fig["exact"], fig["contains"], fig["n"]) == (0.25, 0.5, 4)
    assert "heldout: exact 25.0% contains 50.0% on 4 samples" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_in_training_eval_of_a_lora_run_equals_offline(demo_dir, qa_dir, tmp_path):
    """A LoRA stage 3 evaluates during training (the gathered weights hold adapters: they are folded in for
    generation) and its final predictions and held-out loss equal tools.eval of the same LoRA checkpoint."""
    run_dir = tmp_path / "run"
    cfg = demo_config(demo_dir, RECIPES / "stage3.yaml", [
        f"run_dir={run_dir}", "model.init_from=null", "train.steps=2", "checkpoint.every=0", "optim.warmup_steps=1",
        "data.max_tokens=160", "lora.rank=4", "lora.alpha=8", "optim.lr=5e-2", *eval_overrides(qa_dir)])
    res = run(cfg)
    recs = eval_records(run_dir)
    assert [r["step"] for r in recs] == [2] and recs[0]["n"] == 4
    assert predictions(run_dir, 2) == offline_predictions(res.checkpoint, qa_dir, tmp_path)
    assert recs[0]["loss"] == pytest.approx(reference_loss(res.checkpoint, qa_dir, cfg.data), rel=1e-5)


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2"])
def test_in_training_eval_two_ranks(demo_dir, qa_dir, tmp_path, layout):
    """The stage-end evaluation under dp2 / tp2 / pp2: the held-out loss equals the single-process value of the
    run's final checkpoint; with pp = 1 every sample is answered once over the dp ranks, as offline; with pp2
    generation is skipped, said in the record, and nothing hangs."""
    run_dir = tmp_path / "run"
    torchrun(2, "stage3.yaml", [f"run_dir={run_dir}", "model.init_from=null", *SHORT, "train.steps=2",
                                layout, *eval_overrides(qa_dir)], env_for(demo_dir), timeout=500)
    recs = eval_records(run_dir)
    assert [r["step"] for r in recs] == [2]
    rec = recs[0]
    ckpt = run_dir / "checkpoints" / "step_00000002"
    cfg = load_config(ckpt / "config.yaml")
    assert rec["loss"] == pytest.approx(reference_loss(ckpt, qa_dir, cfg.data), rel=1e-5)
    if layout == "parallel.pp=2":
        assert rec["exact"] is None and rec["n"] == 0 and "pp=2 > 1" in rec["generation_skipped"]
        assert not (run_dir / "eval").exists()
        assert "generation skipped: pp=2 > 1" in (run_dir / "train.log").read_text()
        return
    assert rec["n"] == 4 and rec["skipped"] == {"not_chat": 1, "no_reference": 1}
    assert predictions(run_dir, 2) == offline_predictions(ckpt, qa_dir, tmp_path)
