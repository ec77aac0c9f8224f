"""python -m tools.chat (tools/chat.py): its greedy answer to an image or a video question is the offline
evaluation's prediction for the same chat sample (tools.eval, whose predictions equal transformers' `generate`:
tests/tools/test_eval_cli.py), streamed token by token; sampled answers repeat under a seed; without a question it
is a conversation over stdin lines; a wrong path is one line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from model.family import FAMILY_NAMES, get_preset
from model.parity import make_tiny_checkpoint
from tests.data.datahelpers import encode_video, small_image, tokenizer_dir
from tests.train.qa_data import IMG_Q, VID_Q, write_qa_dataset
from tools.chat import TextStream
from tools.chat import main as chat
from tools.eval import main as evaluate

TOKENS = 6


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf"), get_preset("qwen2_vl", "tiny"), seed=4)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """The media of the held-out set's image and video questions (tests/train/qa_data.py), as files."""
    d = tmp_path_factory.mktemp("media")
    (d / "a.png").write_bytes(small_image(2, 56, 84))
    (d / "v.mp4").write_bytes(encode_video(112, 84, 8, fps=8))
    return {"img": d / "a.png", "vid": d / "v.mp4"}


def question(msgs: list[dict]) -> str:
    return next(it["text"] for it in msgs[0]["content"] if it["type"] == "text")


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family_hf_dir(request, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf"), get_preset(request.param, "tiny"), seed=4)


@pytest.mark.timeout(300)
def test_greedy_answer_is_the_evaluations_prediction(family_hf_dir, media, tmp_path, capsys):
    """Every family: chat renders and processes the question with the model's processor facts."""
    hf_dir = family_hf_dir
    qa = write_qa_dataset(tmp_path)
    report = tmp_path / "report.json"
    assert evaluate([str(hf_dir), "--data", qa, "--tokenizer", tokenizer_dir(), "--max-new-tokens", str(TOKENS),
                     "--out", str(report), "--no-loss"]) == 0
    preds = {p["key"].rsplit("/", 1)[-1]: p["prediction"] for p in json.loads(report.read_text())["predictions"]}
    capsys.readouterr()
    for key, kind, msgs in (("img", "--image", IMG_Q), ("vid", "--video", VID_Q)):
        assert chat([str(hf_dir), kind, str(media[key]), question(msgs), "--tokenizer", tokenizer_dir(),
                     "--max-new-tokens", str(TOKENS)]) == 0
        out = capsys.readouterr().out
        assert out == preds[key] + "\n", (key, out, preds[key])
        assert preds[key].strip()  # a random model still says something


def test_sampled_answers_repeat_under_a_seed_and_a_conversation_reads_stdin(hf_dir, media, capsys, monkeypatch):
    args = [str(hf_dir), "--image", str(media["img"]), "--tokenizer", tokenizer_dir(), "--max-new-tokens",
            str(TOKENS)]
    sampled = []
    for seed in (5, 5, 6):
        assert chat([*args, question(IMG_Q), "--temperature", "1.0", "--top-p", "0.95", "--seed", str(seed)]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2]
    assert chat([*args, question(IMG_Q)]) == 0
    one_shot = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{question(IMG_Q)}\nAnd again?\n\n"))
    assert chat(args) == 0
    turns = capsys.readouterr().out.splitlines()
    assert len(turns) == 2 and turns[0] + "\n" == one_shot  # the first turn is the one-shot question


def test_stream_prints_whole_characters():
    from data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir())
    text = "Zwölf Ziffern: 数字 ✓ 𝔘ꙮ done"  # 𝔘 and ꙮ are two tokens each, the first a partial character
    ids = tok.encode(text)
    pieces: list[str] = []
    stream = TextStream(tok, pieces.append, stop_ids={tok.special.im_end})
    for i in [*ids, tok.special.im_end]:
        stream(i)
    assert "".join(pieces) == text == stream.text
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)


def test_wrong_media_path_is_one_line(hf_dir, capsys):
    from core.cli import run_cli

    assert run_cli("python -m tools.chat", chat, [str(hf_dir), "--image", "/nope.png", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "python -m tools.chat: error: --image /nope.png: no such file"
