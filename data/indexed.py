"""megatron-core's mmap indexed dataset (`PREFIX.bin` + `PREFIX.idx`), read with numpy: a text-only source.

Why not import megatron-core: `megatron.core.datasets.indexed_dataset` imports fine on CPU, but pulls in
megatron.core's optimizer/FSDP modules (about 8 s and several hundred MB per DataLoader worker). The on-disk
format is small and stable, so it is read here directly; tests/data/test_indexed.py checks it both ways against
megatron-core's own IndexedDatasetBuilder / IndexedDataset.

Format (version 1, little endian), as written by megatron.core.datasets.indexed_dataset._IndexWriter:

    .idx: b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 sequence_count | u64 document_count
          | int32[sequence_count] sequence_lengths | int64[sequence_count] sequence_pointers (byte offsets in .bin)
          | int64[document_count] document_indices (sequence boundaries, starting with 0)
          | [int8[sequence_count] sequence_modes, multimodal datasets only]
    .bin: the token ids of all sequences back to back, in the dtype of the code.

Like megatron-core's GPTDataset, each sequence is one sample.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np

from data.storage import StorageConfig, get_storage

HEADER = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_HEAD = 9 + 8 + 1 + 8 + 8


class IndexedText:
    """Random access to the sequences of a megatron indexed dataset.

    Local files are memory-mapped; object-store prefixes read the .idx once and each sequence with a ranged
    read of the .bin (through data.storage).
    """

    def __init__(self, prefix: str, storage: StorageConfig | None = None) -> None:
        self.prefix = prefix
        self.idx_url, self.bin_url = prefix + ".idx", prefix + ".bin"
        self._st = get_storage(self.idx_url, storage)
        self._local = "://" not in prefix or prefix.startswith("file://")
        if self._local:
            path = self.idx_url[len("file://") :] if self.idx_url.startswith("file://") else self.idx_url
            buf = np.memmap(path, mode="r", dtype=np.uint8)
        else:
            buf = np.frombuffer(self._st.read(self.idx_url), dtype=np.uint8)
        head = bytes(buf[:_HEAD])
        if len(head) < _HEAD or head[:9] != HEADER:
            raise ValueError(f"{self.idx_url} is not a megatron indexed dataset index (bad header {head[:9]!r})")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise ValueError(f"{self.idx_url}: index version {version}, only version 1 is supported")
        if code not in DTYPES:
            raise ValueError(f"{self.idx_url}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        off = _HEAD
        self.sequence_lengths = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)
        self._bin = None
        if self._local:
            path = self.bin_url[len("file://") :] if self.bin_url.startswith("file://") else self.bin_url
            self._bin = np.memmap(path, mode="r", dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.sequence_lengths.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        n = int(self.sequence_lengths[i])
        ptr = int(self.sequence_pointers[i])
        if self._bin is not None:
            start = ptr // self.dtype.itemsize
            return np.array(self._bin[start : start + n])
        data = self._st.read_range(self.bin_url, ptr, n * self.dtype.itemsize)
        return np.frombuffer(data, dtype=self.dtype).copy()


def write_indexed(prefix: str, sequences: Iterable[Iterable[int]], dtype: np.dtype | type = np.int32) -> int:
    """Write sequences as `PREFIX.bin` / `PREFIX.idx` (one document per sequence); returns the count.

    The same bytes as megatron-core's IndexedDatasetBuilder(add_item + end_document per sequence).
    """
    dt = np.dtype(dtype)
    if dt not in CODES:
        raise ValueError(f"dtype {dt} is not one of the indexed-dataset dtypes {sorted(str(d) for d in CODES)}")
    lengths = []
    with open(prefix + ".bin", "wb") as f:
        for seq in sequences:
            arr = np.asarray(list(seq) if not isinstance(seq, np.ndarray) else seq, dtype=dt)
            f.write(arr.tobytes(order="C"))
            lengths.append(arr.size)
    lens = np.asarray(lengths, dtype=np.int32)
    ptrs = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        ptrs[1:] = np.cumsum(lens[:-1].astype(np.int64)) * dt.itemsize
    docs = np.arange(len(lengths) + 1, dtype=np.int64)
    with open(prefix + ".idx", "wb") as f:
        f.write(HEADER)
        f.write(struct.pack("<QBQQ", 1, CODES[dt], len(lengths), len(docs)))
        f.write(lens.tobytes())
        f.write(ptrs.tobytes())
        f.write(docs.tobytes())
    return len(lengths)
