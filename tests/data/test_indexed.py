"""megatron-core's mmap indexed dataset: our numpy reader/writer against megatron-core's own builder and reader,
and the loader over an indexed corpus."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig, DatasetSpec
from data.indexed import IndexedText, write_indexed
from data.loader import build_loader


@pytest.fixture(scope="module")
def mcore():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" on CPU
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _seqs(n: int, seed: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 50))) for _ in range(n)]


@pytest.mark.parametrize("dtype,vocab", [(np.int32, 151_000), (np.uint16, 60_000)])
def test_reads_what_megatron_core_writes(mcore, tmp_path, dtype, vocab):
    seqs = _seqs(300, 0, vocab)
    prefix = str(tmp_path / "mc")
    b = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for s in seqs:
        b.add_item(torch.from_numpy(s.astype(np.int64)))
        b.end_document()
    b.finalize(prefix + ".idx")
    ours = IndexedText(prefix)
    assert len(ours) == 300 and ours.dtype == np.dtype(dtype)
    for i in (0, 1, 150, 299):
        assert np.array_equal(ours[i], seqs[i])
    # And the files our writer produces are byte-identical, and megatron-core reads them back.
    mine = str(tmp_path / "ours")
    write_indexed(mine, seqs, dtype)
    for ext in (".bin", ".idx"):
        assert Path(mine + ext).read_bytes() == Path(prefix + ext).read_bytes()
    ref = mcore.IndexedDataset(mine)
    assert len(ref) == 300 and all(np.array_equal(ref[i], seqs[i]) for i in (0, 77, 299))


def test_loader_over_an_indexed_corpus(tmp_path, tok_dir):
    seqs = _seqs(64, 1, 151_000)
    write_indexed(str(tmp_path / "corpus"), seqs)
    cfg = DataConfig(datasets=[DatasetSpec(str(tmp_path / "corpus"), append_eod=True)], tokenizer=tok_dir,
                     max_tokens=200, epochs=1, num_workers=0, shuffle_buffer=8)
    loader = build_loader(cfg, 0, 1)
    seen = 0
    for b in loader:
        cu = b.cu_seqlens.tolist()
        for key, s, e in zip(b.sample_keys, cu[:-1], cu[1:]):
            i = int(key.rsplit("/", 1)[-1])
            assert b.input_ids[s:e].tolist() == seqs[i].tolist() + [151643]  # + <|endoftext|>
            assert b.labels[s : e - 1].tolist() == b.input_ids[s + 1 : e].tolist()  # all text supervised
            assert b.position_ids[:, s:e].tolist() == [list(range(e - s))] * 3
            seen += 1
    assert seen == 64 and loader.metrics()["skipped"] == 0


def test_bad_indexed_file_is_a_clear_error(tmp_path, tok_dir):
    (tmp_path / "x.idx").write_bytes(b"NOTMMIDX" + b"\0" * 40)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a megatron indexed dataset"):
        IndexedText(str(tmp_path / "x"))
    cfg = DataConfig(datasets=[DatasetSpec(str(tmp_path / "nope"), kind="indexed")], tokenizer=tok_dir)
    with pytest.raises(ValueError, match="nope.idx"):
        build_loader(cfg, 0, 1)
