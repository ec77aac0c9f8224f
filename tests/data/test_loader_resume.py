"""Exact resume: after load_state_dict the loader yields the same microbatches (torch.equal) as an uninterrupted
run, with DataLoader workers, across epoch boundaries, a dataset mix, finite epochs, and without re-reading the
data before the restore point."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from datahelpers import assert_same_batches, interrupted_run, mixed_samples, take, write_dataset

import data.sources as sources
from data.config import DataConfig, DatasetSpec
from data.indexed import write_indexed
from data.loader import build_loader


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    chat = write_dataset(root / "chat", mixed_samples(70, seed=1), per_shard=9)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 150000, size=int(rng.integers(5, 120))) for _ in range(90)]
    write_indexed(str(root / "text"), seqs)
    return chat, str(root / "text")


def _cfg(tok_dir, chat, text, **kw) -> DataConfig:
    base = dict(
        datasets=[DatasetSpec(chat, weight=2.0), DatasetSpec(text, kind="indexed", weight=1.0)],
        tokenizer=tok_dir, max_tokens=384, max_pixels=64 * 28 * 28, shuffle_buffer=12, pack_buffer=6,
        num_workers=2, seed=7, read_chunk_bytes=8192,
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.timeout(240)
def test_resume_with_workers_is_exact(tok_dir, datasets):
    chat, text = datasets
    cfg = _cfg(tok_dir, chat, text)
    full_loader = build_loader(cfg, 0, 1)
    full = take(full_loader, 46)
    full_loader.close()
    # The run crosses epoch boundaries of both datasets (so restore also covers a new epoch's order).
    assert any(k.startswith("text/") for b in full for k in b.sample_keys)
    assert any(k.startswith("chat/") for b in full for k in b.sample_keys)
    n_seen = sum(len(b.sample_keys) for b in full)
    assert n_seen > 70 + 90

    for cut in (3, 19):
        first = build_loader(cfg, 0, 1)
        head = take(first, cut)
        state = pickle.loads(pickle.dumps(first.state_dict()))
        first.close()
        assert len(pickle.dumps(state)) < 16_000  # references and counters, no sample bytes
        resumed = build_loader(cfg, 0, 1)
        resumed.load_state_dict(state)
        tail = take(resumed, len(full) - cut)
        resumed.close()
        assert_same_batches(head + tail, full)
        assert resumed.metrics()["batches"] == len(full)


@pytest.mark.timeout(240)
def test_resume_finite_epochs_to_the_end(tok_dir, datasets):
    chat, text = datasets
    cfg = _cfg(tok_dir, chat, text, epochs=1, num_workers=2, pack_buffer=4)
    full = list(build_loader(cfg, 0, 1))
    keys = [k for b in full for k in b.sample_keys]
    assert len(keys) == len(set(keys)) == 70 + 90  # one epoch: every sample exactly once
    for cut in (len(full) // 2, len(full) - 1):
        got, resumed = interrupted_run(cfg, cut)
        assert_same_batches(got, full)
    # A state saved at the very end resumes to nothing.
    done = build_loader(cfg, 0, 1)
    assert len(list(done)) == len(full)
    again = build_loader(cfg, 0, 1)
    again.load_state_dict(done.state_dict())
    assert list(again) == []


class _CountingStorage:
    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def read_range(self, url, start, length):
        self.counter["bytes"] += length
        return self.inner.read_range(url, start, length)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_restore_reads_only_the_buffers(tok_dir, datasets, monkeypatch):
    """Random access through the sidecar index: a restore deep into the data reads a few buffers' worth."""
    chat, _ = datasets
    counter = {"bytes": 0}
    real = sources.get_storage
    monkeypatch.setattr(sources, "get_storage", lambda url, cfg=None: _CountingStorage(real(url, cfg), counter))
    cfg = DataConfig(datasets=[DatasetSpec(chat)], tokenizer=tok_dir, max_tokens=256, max_pixels=64 * 28 * 28,
                     shuffle_buffer=4, pack_buffer=3, num_workers=0, read_chunk_bytes=4096)
    ref = build_loader(cfg, 0, 1)
    head = take(ref, 40)  # > 2 epochs of the 70-sample dataset
    state = ref.state_dict()
    nxt = take(ref, 1)
    before = counter["bytes"]
    counter["bytes"] = 0
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 1), nxt)
    assert len(head) == 40
    assert counter["bytes"] < before / 8, (counter["bytes"], before)


def test_load_state_dict_rejects_changed_settings(tok_dir, datasets):
    chat, text = datasets
    cfg = _cfg(tok_dir, chat, text, num_workers=0)
    loader = build_loader(cfg, 0, 1)
    take(loader, 1)
    state = loader.state_dict()
    for change in ({"seed": 8}, {"max_tokens": 400}, {"num_workers": 3}):
        other = build_loader(_cfg(tok_dir, chat, text, **{"num_workers": 0, **change}), 0, 1)
        with pytest.raises(ValueError, match="cannot resume the loader exactly"):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="dp_size"):
        build_loader(cfg, 0, 2).load_state_dict(state)
