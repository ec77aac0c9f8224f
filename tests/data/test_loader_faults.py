"""Data faults never cost the run (issue 12), each reproduced first: unreadable shards (truncated tar, missing or
stale sidecar index) are counted skips with exact resume and a configurable limit; all-skipped data is an error
naming the skip counts; a worker that produces nothing reports why before any timeout and ends with an error that
names the dataset; a stop signal is honoured while the loader waits; a pretraining sample in a chat dataset says
so."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from datahelpers import assert_same_batches, damaged_dataset, interrupted_run, js, text_chat, write_dataset

import data.sample as sample_mod
from data.chatml import SkipSample, parse_sample
from data.config import DataConfig, DatasetSpec
from data.loader import DataStalled, LoaderInterrupted, NoUsableData, TooManyBadShards, build_loader

REPO = Path(__file__).resolve().parents[2]
FIX = "python -m data.shards index DIR"


def _shard(root: str, k: int) -> str:
    return os.path.join(root, f"shard-{k:06d}.tar")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> tuple[str, set[str], list[str]]:
    return damaged_dataset(tmp_path_factory.mktemp("faults") / "ds")


def _cfg(tok_dir: str, path: str, **kw) -> DataConfig:
    base = dict(datasets=[DatasetSpec(path)], tokenizer=tok_dir, max_tokens=256, shuffle_buffer=4, pack_buffer=4,
                num_workers=0, epochs=3, seed=3, max_bad_shard_fraction=0.5)
    base.update(kw)
    return DataConfig(**base)


def test_bad_shards_are_skipped_counted_and_logged_once(tok_dir, damaged, caplog):
    """Before: the first read of a bad shard raised in the loader (every restart crashed at the same step)."""
    root, good, bad_names = damaged
    loader = build_loader(_cfg(tok_dir, root), 0, 1)
    with caplog.at_level("WARNING", logger="data.loader"):
        batches = list(loader)
    seen = Counter(k.rsplit("/", 1)[-1] for b in batches for k in b.sample_keys)
    assert set(seen) == good and set(seen.values()) == {3}  # every readable sample, in each of the 3 epochs
    m = loader.metrics()
    assert m["skipped/bad_shard"] == 3 * (3 + 6 + 6) and m["skipped"] == m["skipped/bad_shard"]
    assert m["bad_shards"] == 3
    for name in bad_names:  # once per shard over 3 epochs (what is known bad is not read again), with the fix
        lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(lines) == 1 and FIX in lines[0], (name, lines)
    assert "out of date" in next(r.getMessage() for r in caplog.records if bad_names[2] in r.getMessage())


@pytest.mark.timeout(240)
def test_resume_across_bad_shards_is_exact(tok_dir, damaged):
    root, good, _ = damaged
    cfg = _cfg(tok_dir, root, num_workers=2, epochs=2)
    full = list(build_loader(cfg, 0, 1))
    assert {k.rsplit("/", 1)[-1] for b in full for k in b.sample_keys} == good
    for cut in (1, len(full) // 2):
        got, resumed = interrupted_run(cfg, cut)
        assert_same_batches(got, full)
        assert resumed.metrics()["skipped/bad_shard"] == 2 * 15


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_bad_shards_stop_with_the_fix(tok_dir, damaged, workers):
    root, _, _ = damaged
    with pytest.raises(TooManyBadShards, match=r"of its 6 shards are unreadable.*max_bad_shard_fraction=0\.1") as e:
        list(build_loader(_cfg(tok_dir, root, num_workers=workers, epochs=None, max_bad_shard_fraction=0.1), 0, 1))
    assert FIX in str(e.value) and "'ds'" in str(e.value)


def test_shards_without_index_and_manifest(tok_dir, tmp_path, caplog):
    """Without a manifest the indexes are read at startup: a shard without one is left out and counted (before:
    a ValueError for the first one); none readable, or more than the limit, is a startup error."""
    root = write_dataset(tmp_path / "nm", [(f"s{i:03d}", {"json": js(text_chat(i, 4))}) for i in range(16)],
                         per_shard=4)
    os.remove(os.path.join(root, "dataset.json"))
    os.remove(_shard(root, 2) + ".index.json")
    with caplog.at_level("WARNING", logger="data.loader"):
        loader = build_loader(_cfg(tok_dir, root, epochs=1), 0, 1)
        keys = {k.rsplit("/", 1)[-1] for b in loader for k in b.sample_keys}
    assert keys == {f"s{i:03d}" for i in range(16) if i // 4 != 2}
    assert loader.metrics()["bad_shards"] == 1
    assert any("shard-000002.tar" in r.getMessage() and FIX in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"1 of its 4 shards have no readable sidecar index.*fraction=0\.1"):
        build_loader(_cfg(tok_dir, root, max_bad_shard_fraction=0.1), 0, 1)
    for k in (0, 1, 3):
        os.remove(_shard(root, k) + ".index.json")
    with pytest.raises(ValueError, match=r"none of its 4 shards has a readable sidecar index.*data\.shards index"):
        build_loader(_cfg(tok_dir, root), 0, 1)


# ------------------------------------------------------------------------------------------ nothing usable
def test_chat_dataset_of_pretraining_samples_says_so():
    with pytest.raises(SkipSample, match=r"looks like a pretraining sample.*use kind: pretrain or auto") as e:
        parse_sample({"content": "plain text"}, "chat")
    assert e.value.reason == "bad_format"
    with pytest.raises(SkipSample, match="'messages' must be a list"):
        parse_sample({"messages": "hi"}, "chat")


@pytest.fixture(scope="module")
def pretrain_ds(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("pt") / "captions",
                         [(f"p{i:03d}", {"json": js({"content": f"caption {i} " * 5})}) for i in range(12)],
                         per_shard=4)


@pytest.mark.parametrize("workers", [0, 1])
def test_all_skipped_finite_epochs_is_an_error_naming_the_counts(tok_dir, pretrain_ds, workers):
    """Before: iteration ended with no microbatch and no error (the trainer exited 0, "final loss None")."""
    loader = build_loader(DataConfig(datasets=[DatasetSpec(pretrain_ds, kind="chat")], tokenizer=tok_dir,
                                     epochs=1, num_workers=workers), 0, 1)
    with pytest.raises(NoUsableData, match=r"all 12 samples were skipped \(bad_format 12\)") as e:
        list(loader)
    assert "'captions'" in str(e.value) and "use kind: pretrain or auto" in str(e.value)


@pytest.mark.timeout(120)
def test_skips_are_logged_first_few_per_reason_and_counted_all(tok_dir, pretrain_ds, caplog):
    """data.log_skips lines per reason (each naming the sample, its reason and the running total), every skip
    counted; with endless epochs, a whole pass without a usable sample stops at the futile-pass limit (one slice of
    12 samples + the shuffle buffer + 1 + 16 = 29 skips in a row), naming how many."""
    cfg = DataConfig(datasets=[DatasetSpec(pretrain_ds, kind="chat")], tokenizer=tok_dir, epochs=1, num_workers=0,
                     log_skips=3, shuffle_buffer=0)
    with caplog.at_level("WARNING", logger="data.loader"), pytest.raises(NoUsableData, match=r"bad_format 12"):
        list(build_loader(cfg, 0, 1))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped sample ")]
    assert len(lines) == 3, lines
    for n, line in enumerate(lines, 1):
        assert re.fullmatch(rf"skipped sample captions/shard-\d+\.tar/p\d{{3}}: .*pretraining sample.* \({n} total "
                            r"for this reason in worker 0\)", line), line
    endless = dataclasses.replace(cfg, epochs=None, worker_timeout_s=20.0)  # the count stops it, long before
    with pytest.raises(DataStalled, match=r"loader worker 0: 30 samples in a row were skipped \(a full pass over "
                                          r"its data\); since its last usable sample: dataset 'captions': "
                                          r"bad_format 30;"):
        next(iter(build_loader(endless, 0, 1)))


# ------------------------------------------------------------------------------------------ stalls, signals
@pytest.fixture(scope="module")
def chat_ds(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("slow") / "slowset",
                         [(f"c{i:04d}", {"json": js(text_chat(i, 4))}) for i in range(400)], per_shard=50)


def _slow_skips(monkeypatch, touch: Path | None = None, delay: float = 0.05) -> None:
    """Every sample takes `delay` s and is skipped (forked workers inherit the patch)."""

    def slow(self, raw, *a, **k):
        if touch is not None:
            touch.touch()
        time.sleep(delay)
        raise SkipSample("slow_skip", "skipped after a while (test)")

    monkeypatch.setattr(sample_mod.SampleProcessor, "process", slow)


@pytest.mark.timeout(120)
def test_quiet_worker_reports_then_stops_naming_the_dataset(tok_dir, chat_ds, monkeypatch, caplog):
    """Before: nothing was said until torch's "DataLoader timed out after 4.0 seconds", which names nothing."""
    _slow_skips(monkeypatch)
    cfg = DataConfig(datasets=[DatasetSpec(chat_ds)], tokenizer=tok_dir, num_workers=1, start_method="fork",
                     worker_timeout_s=4.0, stall_report_s=1.0)
    with caplog.at_level("WARNING", logger="data.loader"), \
            pytest.raises(DataStalled, match=r"no usable sample for [45] s .*'slowset': slow_skip \d+") as e:
        next(iter(build_loader(cfg, 0, 1)))
    assert "worker_timeout_s" in str(e.value)
    # Counted on the worker's own clock, not the test's: a report every stall_report_s until worker_timeout_s
    # ran out (the message above says after how long), then the stop. (pytest's timeout turns a hang into a failure.)
    reports = [r.getMessage() for r in caplog.records if "has produced no microbatch for" in r.getMessage()]
    assert 2 <= len(reports) <= cfg.worker_timeout_s / cfg.stall_report_s, caplog.text
    assert "dataset 'slowset': slow_skip" in reports[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_signal_interrupts_a_waiting_loader(tok_dir, chat_ds, monkeypatch, tmp_path, workers):
    """A real SIGUSR1 while the loader waits for data that never comes (it is reading, every sample is skipped):
    next() stops on it, long before the worker timeout (before: the signal handler's flag was seen only then)."""
    reading = tmp_path / "reading"
    _slow_skips(monkeypatch, touch=reading)
    events: list[str] = []

    def signal_once_reading() -> None:
        deadline = time.monotonic() + 60
        while not reading.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        events.append("reading")
        os.kill(os.getpid(), signal.SIGUSR1)

    prev = signal.signal(signal.SIGUSR1, lambda s, f: events.append("signal"))
    try:
        cfg = DataConfig(datasets=[DatasetSpec(chat_ds)], tokenizer=tok_dir, num_workers=workers, start_method="fork",
                         worker_timeout_s=120.0)
        loader = build_loader(cfg, 0, 1, interrupt=lambda: "signal" in events)
        sender = threading.Thread(target=signal_once_reading, daemon=True)
        sender.start()
        t0 = time.monotonic()
        with pytest.raises(LoaderInterrupted):
            next(iter(loader))
        waited = time.monotonic() - t0
        events.append("interrupted")
        sender.join()
    finally:
        signal.signal(signal.SIGUSR1, prev)
    assert events == ["reading", "signal", "interrupted"]  # it waited on a reading loader, and the signal ended it
    # Before the fix next() returned only at the worker timeout (120 s); half of it tells the two apart under any
    # load (the time of the poll slice itself is no unit test's business).
    assert waited < cfg.worker_timeout_s / 2, waited
    assert loader.state_dict()["workers"] == [None] * max(1, workers)  # nothing consumed: the position is unchanged


_DRIVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import data.sample as sample_mod
    from data.chatml import SkipSample

    touch = Path(sys.argv[1])
    if touch.name != "-":
        def slow(self, raw, *a, **k):  # every sample is slow and skipped (forked workers inherit this)
            touch.touch()
            time.sleep(0.05)
            raise SkipSample("slow_skip", "skipped after a while (test)")
        sample_mod.SampleProcessor.process = slow
    from train.__main__ import main
    sys.exit(main(sys.argv[2:]))
""")


def _train(tmp_path: Path, tok_dir: str, ds: str, kind: str, touch: str, *extra: str) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(driver), touch, str(REPO / "recipes" / "tiny" / "stage3.yaml"),
           f"run_dir={tmp_path / 'run'}", "model.init_from=null", f"data.tokenizer={tok_dir}",
           f"data.datasets=[{{path: {ds}, kind: {kind}}}]", "data.max_tokens=160", "train.steps=3",
           "checkpoint.every=0", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(240)
def test_trainer_stops_with_exit_3_when_nothing_is_usable(tok_dir, pretrain_ds, tmp_path):
    """Before: "done: data_exhausted at step 0, final loss None", exit 0."""
    p = _train(tmp_path, tok_dir, pretrain_ds, "chat", "-", "data.epochs=1", "data.num_workers=1")
    out, err = p.communicate(timeout=200)
    assert p.returncode == 3, (out[-2000:], err[-3000:])
    line = next(ln for ln in err.splitlines() if ln.startswith("training stopped:"))
    assert "bad_format 12" in line and "use kind: pretrain or auto" in line and "Traceback" not in err


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1])
def test_trainer_honours_sigterm_while_the_loader_stalls(tok_dir, chat_ds, tmp_path, workers):
    """SIGTERM while every sample is slow and skipped: the run exits 143 (stopped by SIGTERM, nothing saved:
    mid-step) well before the worker timeout. Before: the flag was seen only when the loader gave up."""
    touch = tmp_path / "reading"
    p = _train(tmp_path, tok_dir, chat_ds, "chat", str(touch), f"data.num_workers={workers}",
               "data.worker_timeout_s=120")
    deadline = time.monotonic() + 180
    while not touch.exists():  # the loader is reading (so the trainer is waiting for it)
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, (out[-2000:], err[-3000:])
    # Before the fix the flag was seen when the loader gave up, after data.worker_timeout_s=120: half of it tells
    # the two apart under any load.
    assert time.monotonic() - t0 < 60 and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
