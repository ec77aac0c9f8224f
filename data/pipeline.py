"""What one (logical) loader worker does: read -> shuffle -> mix -> process -> pack, with a small exact state.

    per dataset:  slice of the epoch's sample sequence --(chunked reads)--> shuffle buffer (raw bytes)
    mix:          a seeded weighted choice of the dataset to draw from
    process:      render + tokenize + images (data.sample), bad samples are counted skips
    pack:         best-fit buffer (data.packing) -> one PackedBatch

Every random choice is mix64(seed, stream, counter), so the state after a microbatch is a handful of counters plus
the REFERENCES (dataset, epoch, position) of the samples sitting in the shuffle and packing buffers - never their
bytes. Restoring re-reads those samples by random access through the sidecar indexes and reprocesses them (a
pure function of bytes and config), then continues exactly where the uninterrupted run would have been.
This is Megatron-Energon's design (buffers saved as sample keys) with counter-based randomness instead of saved
RNG states.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from data.chatml import SkipSample
from data.config import DataConfig
from data.packing import Entry, Packer, assemble
from data.sample import Processed, RawSample, SampleProcessor
from data.sources import DatasetPlan, EpochLayout, Reader, mix64

log = logging.getLogger("data.loader")

_SHUFFLE, _MIX = 0xB0F, 0x313


class DatasetStream:
    """One dataset as seen by one global worker: its slice of every epoch, through a seeded shuffle buffer."""

    def __init__(self, plan: DatasetPlan, cfg: DataConfig, g: int, G: int, reader: Reader, state: dict | None):
        self.plan, self.cfg, self.g, self.G, self.reader = plan, cfg, g, G, reader
        self._layouts: dict[int, EpochLayout] = {}
        self.buf: list[tuple[tuple[int, int], RawSample]] = []
        self.buf_bytes = 0
        if state is None:
            self.epoch, self.k, self.src_done = 0, 0, False
            self.cursor = self.layout(0).slice(g, G)[0]
        else:
            self.epoch, self.cursor = state["epoch"], state["cursor"]
            self.k, self.src_done = state["k"], state["src_done"]
            refs = [tuple(r) for r in state["buf"]]
            raws = self.reader.read_many([self.layout(e).locate(p) for e, p in refs])
            self.buf = list(zip(refs, raws))  # type: ignore[arg-type]
            self.buf_bytes = sum(r.nbytes for r in raws)

    def layout(self, epoch: int) -> EpochLayout:
        lay = self._layouts.get(epoch)
        if lay is None:
            if len(self._layouts) >= 2:
                self._layouts.pop(min(self._layouts))
            lay = self._layouts[epoch] = EpochLayout(self.plan, self.cfg.seed, epoch)
        return lay

    @property
    def exhausted(self) -> bool:
        return self.src_done and not self.buf

    def _pull(self) -> bool:
        """Read the next sample of the slice into the buffer; False when the slice (and all epochs) are done."""
        while True:
            lay = self.layout(self.epoch)
            lo, hi = lay.slice(self.g, self.G)
            if self.cursor < hi:
                break
            if self.cfg.epochs is not None and self.epoch + 1 >= self.cfg.epochs:
                self.src_done = True
                return False
            self.epoch += 1
            self.cursor = self.layout(self.epoch).slice(self.g, self.G)[0]
        pos = self.cursor
        shard, i = lay.locate(pos)
        upto = i + (min(hi, lay.shard_end(pos)) - pos)  # read ahead only within this worker's slice
        raw = self.reader.read(shard, i, upto)
        self.buf.append(((self.epoch, pos), raw))
        self.buf_bytes += raw.nbytes
        self.cursor += 1
        return True

    def next(self) -> tuple[tuple[int, int], RawSample] | None:
        cap = max(self.cfg.shuffle_buffer, 1)
        while not self.src_done and len(self.buf) < cap and (self.buf_bytes < self.cfg.shuffle_buffer_bytes
                                                             or not self.buf):
            if not self._pull():
                break
        if not self.buf:
            return None
        j = mix64(self.cfg.seed, _SHUFFLE, self.plan.index, self.g, self.k) % len(self.buf)
        self.k += 1
        self.buf[j], self.buf[-1] = self.buf[-1], self.buf[j]
        ref, raw = self.buf.pop()
        self.buf_bytes -= raw.nbytes
        return ref, raw

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "k": self.k, "src_done": self.src_done,
                "buf": [list(r) for r, _ in self.buf]}


class WorkerPipeline:
    """Yields (PackedBatch | None, state) pairs; None marks the end of all data (finite epochs only)."""

    def __init__(self, cfg: DataConfig, plans: list[DatasetPlan], g: int, G: int, state: dict | None = None,
                 processor: SampleProcessor | None = None) -> None:
        self.cfg, self.plans, self.g, self.G = cfg, plans, g, G
        self.proc = processor or SampleProcessor(cfg)
        self.readers = [Reader(p, cfg.storage, cfg.read_chunk_bytes) for p in plans]
        st = state or {}
        self.done = bool(st.get("done", False))
        self.counters: Counter = Counter(st.get("counters", {}))
        self.mix_k = int(st.get("mix_k", 0))
        self.since_good = int(st.get("since_good", 0))
        self.streams = [
            DatasetStream(p, cfg, g, G, r, (st.get("streams") or [None] * len(plans))[i])
            for i, (p, r) in enumerate(zip(plans, self.readers))
        ]
        self.packer = Packer(cfg.max_tokens, cfg.patch_budget, cfg.pack_buffer, cfg.pack_patch_cap)
        self._skips_logged: Counter = Counter()
        for ref in st.get("pack", []):
            self._restore_entry(tuple(ref))
        # A pass over every slice (plus the buffers) without one usable sample means the data is unusable:
        # raise instead of spinning forever in an infinite-epoch loop.
        self._futile_limit = sum(max(1, p.total // G) for p in plans) + len(plans) * (cfg.shuffle_buffer + 1) + 16

    # ------------------------------------------------------------------ helpers
    def _process(self, d: int, raw: RawSample) -> Processed:
        spec = self.plans[d].spec
        kind = "auto" if spec.kind == "indexed" else spec.kind
        return self.proc.process(raw, kind, spec.supervise, spec.append_eod)

    def _restore_entry(self, ref: tuple) -> None:
        d, e, p = ref
        s = self.streams[d]
        raw = s.reader.read_many([s.layout(e).locate(p)])[0]
        try:
            self.packer.add(Entry(ref, self._process(d, raw)))
        except SkipSample as err:  # only if external media changed since the state was saved
            self.counters["restore_reprocess_failed"] += 1
            log.warning("restore: %s no longer processes (%s); dropped", raw.key, err)

    def _skip(self, raw: RawSample, err: SkipSample) -> None:
        self.counters[f"skipped/{err.reason}"] += 1
        n = self._skips_logged[err.reason] = self._skips_logged[err.reason] + 1
        if n <= self.cfg.log_skips or n % 1000 == 0:
            log.warning("skipped sample %s: %s (%s total for this reason in worker %d)", raw.key, err, n, self.g)

    def _draw(self) -> tuple[int, tuple[int, int], RawSample] | None:
        """The next raw sample of the mix, or None when every dataset is exhausted."""
        while True:
            active = [d for d, s in enumerate(self.streams) if not s.exhausted]
            if not active:
                return None
            weights = [self.plans[d].spec.weight for d in active]
            u = mix64(self.cfg.seed, _MIX, self.g, self.mix_k) / 2.0**64 * sum(weights)
            self.mix_k += 1
            acc, pick = 0.0, active[-1]
            for d, w in zip(active, weights):
                acc += w
                if u < acc:
                    pick = d
                    break
            got = self.streams[pick].next()
            if got is not None:
                return pick, got[0], got[1]

    def state(self) -> dict:
        return {
            "streams": [s.state() for s in self.streams],
            "mix_k": self.mix_k,
            "pack": [list(e.ref) for e in self.packer.entries],
            "counters": dict(self.counters),
            "since_good": self.since_good,
            "done": self.done,
        }

    def epochs(self) -> list[int]:
        return [s.epoch for s in self.streams]

    # ------------------------------------------------------------------ the loop
    def __iter__(self) -> Iterator[tuple[object, dict]]:
        if self.done:
            return
        while True:
            while not self.packer.full():
                got = self._draw()
                if got is None:
                    break
                d, (e, p), raw = got
                self.counters["samples_read"] += 1
                try:
                    sample = self._process(d, raw)
                except SkipSample as err:
                    self._skip(raw, err)
                    self.since_good += 1
                    if self.cfg.epochs is None and self.since_good > self._futile_limit:
                        raise RuntimeError(
                            f"loader worker {self.g}: {self.since_good} samples in a row were skipped (a full pass "
                            f"over its data); skips so far: {dict(self.counters)}. Fix the data or the config."
                        ) from err
                    continue
                self.since_good = 0
                if sample.truncated:
                    self.counters["truncated"] += 1
                self.packer.add(Entry((d, e, p), sample))
            if not len(self.packer):
                break
            entries = self.packer.pop_bin()
            batch = assemble([en.sample for en in entries])
            yield batch, self.state()
        self.done = True
        yield None, self.state()
