"""Resume is exact or says why (issue 22): the settings that decide which tokens and pixels a sample becomes are
recorded in every checkpoint and compared on resume. Before: a changed video fps, pixel bound, tokenizer or chat
template option resumed silently, and the run was no longer the one it claimed to continue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import RECIPES, REPO, env_for

from core.config import ConfigError
from data.config import DataConfig, DatasetSpec
from data.fingerprint import fingerprint_changes, sample_fingerprint
from train.config import load_config
from train.resume_data import check_resume_data, data_meta
from train.trainer import Trainer, run


def _data(tok: str, **kw) -> DataConfig:
    base = dict(datasets=[DatasetSpec("/d/chat", kind="chat")], tokenizer=tok)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def tok(demo_dir) -> str:
    return str(demo_dir / "data" / "tokenizer")


@pytest.mark.parametrize("change,key", [
    ({"video": {"fps": 1.0}}, "data.video.fps: 2.0 -> 1.0"),
    ({"video": {"max_pixels": 256 * 28 * 28}}, "data.video.max_pixels: 602112 -> 200704"),
    ({"video": {"min_pixels": 64 * 28 * 28}}, "data.video.min_pixels"),
    ({"video": {"max_tokens": 1024}}, "data.video.max_tokens: 6144 -> 1024"),  # 6144: the cap 8192 tokens hold
    ({"video": {"max_frames": 64}}, "data.video.max_frames"),
    ({"video": {"backend": "ffmpeg"}}, "data.video.backend"),
    ({"min_pixels": 8 * 28 * 28}, "data.min_pixels: 3136 -> 6272"),
    ({"max_pixels": 256 * 28 * 28}, "data.max_pixels"),
    ({"default_system": None}, "data.default_system: 'You are a helpful assistant.' -> None"),
    ({"supervise": "all"}, "data.supervise: 'auto' -> 'all'"),
    ({"pretrain_eos": False}, "data.pretrain_eos"),
    ({"overlong": "truncate"}, "data.max_tokens (overlong: truncate): None -> 8192"),
    ({"datasets": [DatasetSpec("/d/chat", kind="pretrain")]}, "data.datasets[chat]"),
])
def test_each_setting_that_changes_a_sample_is_in_the_fingerprint(tok, change, key):
    saved = sample_fingerprint(_data(tok, max_tokens=8192))
    now = sample_fingerprint(_data(tok, max_tokens=8192, **change))
    got = fingerprint_changes(json.loads(json.dumps(saved)), now)  # as read back from meta.json
    assert len(got) == 1 and got[0].startswith(key), got


def test_settings_that_do_not_change_a_sample_are_not(tok):
    saved = sample_fingerprint(_data(tok))
    # (a budget changes videos when it sets the automatic video.max_tokens: that is the cap's change, shown)
    assert fingerprint_changes(saved, sample_fingerprint(_data(tok, max_patches=999))) == [
        "data.video.max_tokens: 6144 -> 249"]
    same = _data(tok, num_workers=7, shuffle_buffer=3, seed=9, pack_buffer=3, log_skips=1,
                 video={"decode_timeout_s": 5.0, "decode_threads": 2, "cache_dir": "/c", "cache_max_bytes": 1})
    assert fingerprint_changes(saved, sample_fingerprint(same)) == []


def test_the_model_familys_processor_facts_are_in_the_fingerprint(tok):
    """A resumed run of another family reads the same samples into other pixels and tokens (resize factor, mean /
    std, video time, default system prompt): named. Unset bounds and `default_system: auto` are recorded as the
    values they stand for, so spelling the family's defaults out changes nothing."""
    from data.media.vision import family_vision

    q2, q25, q3 = (family_vision(f) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))
    saved = json.loads(json.dumps(sample_fingerprint(_data(tok), q2)))  # as read back from meta.json
    assert fingerprint_changes(saved, sample_fingerprint(_data(tok))) == []  # no family given: Qwen2-VL's

    def changed(now) -> set[str]:
        return {c.split(": ")[0] for c in fingerprint_changes(saved, now)}

    assert changed(sample_fingerprint(_data(tok), q3)) == {
        "model.family", "model.family (processor facts)", "data.min_pixels", "data.max_pixels",
        "data.video.min_pixels", "data.video.max_pixels", "data.default_system"}
    assert changed(sample_fingerprint(_data(tok), q25)) == {"model.family", "model.family (processor facts)"}
    spelled = _data(tok, min_pixels=4 * 784, max_pixels=16384 * 784, default_system="You are a helpful assistant.",
                    video={"min_pixels": 128 * 784, "max_pixels": 768 * 784})
    assert changed(sample_fingerprint(spelled, q2)) == set()


def test_the_tokenizer_is_compared_by_content_not_by_path(tok, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tok, moved)
    saved = sample_fingerprint(_data(tok))
    assert fingerprint_changes(saved, sample_fingerprint(_data(str(moved)))) == []
    d = json.loads((moved / "tokenizer.json").read_text())
    d["added_tokens"][0]["content"] = "<|endoftext_other|>"  # another tokenizer under the same name
    (moved / "tokenizer.json").write_text(json.dumps(d))
    got = fingerprint_changes(saved, sample_fingerprint(_data(str(moved))))
    assert len(got) == 1 and got[0].startswith("data.tokenizer: another tokenizer.json (sha256 "), got


def test_the_rule_refuse_when_continuing_the_position_else_warn(tok, caplog):
    meta = data_meta(_data(tok))
    changed = _data(tok, video={"fps": 1.0})
    assert check_resume_data(meta, _data(tok), True, "ck") == []
    with pytest.raises(ConfigError, match=r"cannot resume ck exactly: .*data\.video\.fps: 2\.0 -> 1\.0.*"
                                          r"checkpoint\.data_state=restart to start the data from the beginning"):
        check_resume_data(meta, changed, True, "ck")
    with caplog.at_level("WARNING", logger="train.resume_data"):
        assert check_resume_data(meta, changed, False, "ck") == ["data.video.fps: 2.0 -> 1.0"]
        assert check_resume_data({}, changed, True, "old") == []
    assert "data starts a new pass" in caplog.text and "records no data settings" in caplog.text


# ------------------------------------------------------------------------------------------ the trainer
def _cfg(demo_dir: Path, run_dir: Path, *extra: str):
    os.environ["DEMO_DIR"] = str(demo_dir)
    return load_config(RECIPES / "stage3.yaml", [f"run_dir={run_dir}", "model.init_from=null", "optim.warmup_steps=1",
                                                  "data.max_tokens=160", "data.num_workers=0", *extra])


@pytest.fixture(scope="module")
def saved_run(demo_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("rd") / "run"
    run(_cfg(demo_dir, run_dir, "train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=0"))
    return run_dir


@pytest.mark.timeout(300)
def test_resume_with_changed_sample_settings_refuses_or_warns(demo_dir, saved_run, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    for change, shown in (("data.video.fps=1.0", "data.video.fps: 2.0 -> 1.0"),
                          ("data.max_pixels=6272", "data.max_pixels: 12544 -> 6272"),
                          ("data.default_system=null", "data.default_system: 'You are a helpful assistant.' -> None")):
        with pytest.raises(ConfigError, match="cannot resume .*step_00000002 exactly") as e:
            Trainer(_cfg(demo_dir, run_dir, "train.steps=4", change))
        assert shown in str(e.value)
    moved = tmp_path / "tok"  # the same tokenizer elsewhere is the same tokenizer
    shutil.copytree(demo_dir / "data" / "tokenizer", moved)
    Trainer(_cfg(demo_dir, run_dir, "train.steps=4", f"data.tokenizer={moved}")).close()
    with caplog.at_level("WARNING"):
        t = Trainer(_cfg(demo_dir, run_dir, "train.steps=4", "data.video.fps=1.0", "checkpoint.data_state=restart"))
        t.close()
    assert t.step == 2 and t.data_pass == 1 and "data.video.fps: 2.0 -> 1.0" in caplog.text
    meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["data_fingerprint"]["data.video.fps"] == 2.0


@pytest.mark.timeout(300)
def test_the_refusal_is_one_line_exit_2(demo_dir, saved_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved_run, run_dir)
    res = subprocess.run([sys.executable, "-m", "train", str(RECIPES / "stage3.yaml"), f"run_dir={run_dir}",
                          "model.init_from=null", "data.max_tokens=160", "data.num_workers=0", "train.steps=4",
                          "data.video.fps=0.5"], env=env_for(demo_dir), cwd=REPO, capture_output=True,
                         text=True, timeout=240)
    lines = [x for x in res.stderr.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x
             and " WARNING " not in x and " INFO " not in x]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "data.video.fps: 2.0 -> 0.5" in lines[0] and "checkpoint.data_state=restart" in lines[0]
