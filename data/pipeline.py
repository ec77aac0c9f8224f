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

Any exception while one sample becomes tokens and pixels is a counted skip naming the dataset and the sample
(reason `error` for the unanticipated ones, the traceback at debug level): a sample can never end a worker, nor
make a restarted run die on it again; data.max_error_fraction stops a run whose samples fail systematically.

Faults never stop a worker silently or forever: an unreadable shard is skipped and counted (skipped/bad_shard),
logged once; a worker that produces nothing reports, every `stall_report_s`, which datasets and skip reasons keep
it busy; a futile pass (a whole pass over its data, or `worker_timeout_s`, without one usable sample) and too
many unreadable shards end it with a DataError naming the dataset and the skip counts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator

from data.chatml import BOX_TOLERANCE, SkipSample
from data.config import DataConfig
from data.packing import Entry, Packer, assemble
from data.sample import Processed, RawSample, SampleProcessor
from data.sources import BadShard, DatasetPlan, EpochLayout, Reader, mix64
from model.processing import VisionProcessing

log = logging.getLogger("data.loader")

_SHUFFLE, _MIX = 0xB0F, 0x313


class DataError(ValueError):
    """The data cannot feed training: the message names the dataset, the skip counts by reason and the fix.
    (Constructible from one message string: torch re-raises worker exceptions by their type and message.)"""


class NoUsableData(DataError):
    """Iteration ended without a single microbatch: every sample read was skipped."""


class DataStalled(DataError):
    """A worker went a whole pass over its data, or worker_timeout_s, without one usable sample (or got stuck)."""


class TooManyBadShards(DataError):
    """More than data.max_bad_shard_fraction of a dataset's shards are unreadable."""


class TooManySampleErrors(DataError):
    """More than data.max_error_fraction of the samples read raised an unexpected error while being processed."""


class LoaderInterrupted(Exception):
    """The loader's `interrupt` callable answered True while it waited for data (a stop signal, for instance)."""


ERRORS: dict[str, type[DataError]] = {c.__name__: c for c in (DataError, NoUsableData, DataStalled, TooManyBadShards,
                                                               TooManySampleErrors)}
# data.max_error_fraction is judged once a worker has read this many samples (a first unlucky sample is not a rate).
ERROR_MIN_SAMPLES = 100


def format_counts(counts: dict[str, int]) -> str:
    """'bad_shard 40, overlong 3' (largest first) from {'skipped/bad_shard': 40, ...} or {'bad_shard': 40}."""
    items = sorted(((k.removeprefix("skipped/"), int(v)) for k, v in counts.items() if v), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v}" for k, v in items) or "none"


class DatasetStream:
    """One dataset as seen by one global worker: its slice of every epoch, through a seeded shuffle buffer."""

    def __init__(self, plan: DatasetPlan, cfg: DataConfig, g: int, G: int, reader: Reader, state: dict | None,
                 counters: Counter, notify: Callable[[str], None], examples: dict[str, str]):
        self.plan, self.cfg, self.g, self.G, self.reader = plan, cfg, g, G, reader
        self.counters, self.notify, self.examples = counters, notify, examples
        self._layouts: dict[int, EpochLayout] = {}
        self.buf: list[tuple[tuple[int, int], RawSample]] = []
        self.buf_bytes = 0
        # Shards found unreadable: shard -> first sample index that cannot be read (0: none can). Part of the state,
        # so a resumed worker skips exactly what the uninterrupted one would, without reading those shards again.
        self.bad: dict[int, int] = {}
        if state is None:
            self.epoch, self.k, self.src_done = 0, 0, False
            self.cursor = self.layout(0).slice(g, G)[0]
        else:
            self.epoch, self.cursor = state["epoch"], state["cursor"]
            self.k, self.src_done = state["k"], state["src_done"]
            self.bad = {int(sh): int(i) for sh, i in state.get("bad", [])}
            refs = [tuple(r) for r in state["buf"]]
            raws = self.reader.read_many([self.layout(e).locate(p) for e, p in refs])
            for ref, raw in zip(refs, raws):
                if raw is None:  # only if the shard changed since the state was saved
                    self.counters["restore_read_failed"] += 1
                    self.notify(f"restore: sample {ref} of dataset {plan.label!r} can no longer be read; dropped")
                    continue
                self.buf.append((ref, raw))  # type: ignore[arg-type]
                self.buf_bytes += raw.nbytes

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

    def _pull(self) -> int | None:
        """Read the next sample of the slice into the buffer (0), or skip the rest of this shard's run in the slice
        when it cannot be read (the number of samples skipped, > 0); None when the slice and all epochs are done."""
        while True:
            lay = self.layout(self.epoch)
            lo, hi = lay.slice(self.g, self.G)
            if self.cursor < hi:
                break
            if self.cfg.epochs is not None and self.epoch + 1 >= self.cfg.epochs:
                self.src_done = True
                return None
            self.epoch += 1
            self.cursor = self.layout(self.epoch).slice(self.g, self.G)[0]
        pos = self.cursor
        shard, i = lay.locate(pos)
        run_end = min(hi, lay.shard_end(pos))  # this worker's positions in this shard end here
        first_bad = self.bad.get(shard)
        if first_bad is None or i < first_bad:
            upto = i + (run_end - pos)  # read ahead only within this worker's slice (and before known bad samples)
            try:
                raw = self.reader.read(shard, i, upto if first_bad is None else min(upto, first_bad))
            except BadShard as e:
                self._mark_bad(shard, 0 if e.whole else i, e)
            else:
                self.buf.append(((self.epoch, pos), raw))
                self.buf_bytes += raw.nbytes
                self.cursor += 1
                return 0
        n = run_end - pos
        self.counters["skipped/bad_shard"] += n
        self.cursor = run_end
        return n

    def _mark_bad(self, shard: int, first: int, err: BadShard) -> None:
        known = shard in self.bad
        self.bad[shard] = min(first, self.bad.get(shard, first))
        self.examples.setdefault("bad_shard", str(err)[:400])
        if not known:
            self.notify(f"dataset {self.plan.label!r}: {err}; its samples from #{self.bad[shard]} on are skipped "
                        "(counted as skipped/bad_shard)")

    def bad_fraction(self) -> tuple[int, int]:
        """(unreadable shards found by this worker plus those left out at planning, all shards of the dataset)."""
        return len(self.bad) + len(self.plan.bad), len(self.plan.shards) + len(self.plan.bad)

    def next(self) -> tuple[tuple[int, int], RawSample] | int | None:
        """The next (reference, raw sample) of the shuffle; an int n > 0 when n unreadable samples were skipped
        instead (control goes back to the pipeline, which counts them); None when exhausted."""
        cap = max(self.cfg.shuffle_buffer, 1)
        while not self.src_done and len(self.buf) < cap and (self.buf_bytes < self.cfg.shuffle_buffer_bytes
                                                             or not self.buf):
            got = self._pull()
            if got is None:
                break
            if got:
                return got
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
                "buf": [list(r) for r, _ in self.buf], "bad": [[sh, i] for sh, i in sorted(self.bad.items())]}


class WorkerPipeline:
    """Yields (PackedBatch | None, state) pairs; None marks the end of all data (finite epochs only).

    `notify(message)` carries the warnings the training process should log (bad shards, stall reports; default:
    this process's log); `interrupt()` is polled between samples (in the training process: the loader's
    `interrupt`; in a worker process: the loader's shutdown flag) and raises LoaderInterrupted when it answers True.
    `vision`: the model family's processor facts (None: Qwen2-VL's), for the default SampleProcessor.
    """

    def __init__(self, cfg: DataConfig, plans: list[DatasetPlan], g: int, G: int, state: dict | None = None,
                 processor: SampleProcessor | None = None, notify: Callable[[str], None] | None = None,
                 interrupt: Callable[[], bool] | None = None, vision: VisionProcessing | None = None) -> None:
        self.cfg, self.plans, self.g, self.G = cfg, plans, g, G
        self.notify = notify or log.warning
        self.interrupt = interrupt
        self.proc = processor or SampleProcessor(cfg, vision=vision)
        self.readers = [Reader(p, cfg.storage, cfg.read_chunk_bytes) for p in plans]
        st = state or {}
        self.done = bool(st.get("done", False))
        self.counters: Counter = Counter(st.get("counters", {}))
        self.mix_k = int(st.get("mix_k", 0))
        self.since_good = int(st.get("since_good", 0))
        self.examples: dict[str, str] = {}  # the first skip message per reason (for the errors' messages)
        self.streams = [
            DatasetStream(p, cfg, g, G, r, (st.get("streams") or [None] * len(plans))[i], self.counters, self.notify,
                          self.examples)
            for i, (p, r) in enumerate(zip(plans, self.readers))
        ]
        self.packer = Packer(cfg.max_tokens, cfg.patch_budget, cfg.pack_buffer, cfg.pack_patch_cap,
                             cfg.video_sample_tokens, cfg.video_sample_patches)
        self._skips_logged: Counter = Counter()
        for ref in st.get("pack", []):
            self._restore_entry(tuple(ref))
        # A pass over every slice (plus the buffers) without one usable sample means the data is unusable:
        # raise instead of spinning forever in an infinite-epoch loop.
        self._futile_limit = sum(max(1, p.total // G) for p in plans) + len(plans) * (cfg.shuffle_buffer + 1) + 16
        # Since the last microbatch (for stall reports; not part of the state): skips by (dataset, reason).
        self._quiet: Counter = Counter()
        self._t_good = self._t_out = self._t_report = time.monotonic()

    # ------------------------------------------------------------------ helpers
    def _process(self, d: int, raw: RawSample) -> Processed:
        spec = self.plans[d].spec
        kind = "auto" if spec.kind == "indexed" else spec.kind
        return self.proc.process(raw, kind, spec.supervise, spec.append_eod)

    def _restore_entry(self, ref: tuple) -> None:
        d, e, p = ref
        s = self.streams[d]
        raw = s.reader.read_many([s.layout(e).locate(p)])[0]
        if raw is None:  # only if the shard changed since the state was saved
            self.counters["restore_read_failed"] += 1
            self.notify(f"restore: sample {ref} of dataset {self.plans[d].label!r} can no longer be read; dropped")
            return
        try:
            self.packer.add(Entry(ref, self._process(d, raw)))
        except Exception as err:  # noqa: BLE001 - only if external media or the code changed since the save
            self.counters["restore_reprocess_failed"] += 1
            log.warning("restore: %s no longer processes (%s: %s); dropped", raw.key, type(err).__name__, err)

    def _skip(self, d: int, raw: RawSample, err: SkipSample) -> None:
        self.counters[f"skipped/{err.reason}"] += 1
        self.examples.setdefault(err.reason, f"{raw.key}: {err}"[:300])
        n = self._skips_logged[err.reason] = self._skips_logged[err.reason] + 1
        if n <= self.cfg.log_skips or n % 1000 == 0:
            log.warning("skipped sample %s: %s (%s total for this reason in worker %d)", raw.key, err, n, self.g)
        self._skipped(d, err.reason, 1)

    def _error(self, d: int, raw: RawSample, err: Exception) -> None:
        """An exception no check anticipated, raised while processing one sample: a counted skip (reason
        `error`), its traceback at debug level; too many of them stop the run (data.max_error_fraction)."""
        log.debug("sample %s of dataset %r raised while being processed", raw.key, self.plans[d].label,
                  exc_info=(type(err), err, err.__traceback__))
        self.counters[f"errors/{self.plans[d].label}"] += 1
        self._skip(d, raw, SkipSample("error", f"{type(err).__name__}: {err}"[:500]))
        read, errors = self.counters["samples_read"], self.counters["skipped/error"]
        limit = self.cfg.max_error_fraction
        if read >= ERROR_MIN_SAMPLES and errors > limit * read:
            by_ds = {k.split("/", 1)[1]: v for k, v in self.counters.items() if k.startswith("errors/") and v}
            raise TooManySampleErrors(
                f"loader worker {self.g}: {errors} of the {read} samples it read raised an unexpected error while "
                f"being processed (datasets: {', '.join(f'{k!r} {v}' for k, v in by_ds.items())}), more than "
                f"data.max_error_fraction={limit:g}; e.g. {self.examples['error']}. This is a bug or data that "
                "nothing validates: run `python -m data.inspect` on the dataset with QWEN2VL_DEBUG=1 / debug logging "
                "for the traceback, fix it, or raise data.max_error_fraction to train on the rest"
            )

    def _clamped(self, raw: RawSample, n: int) -> None:
        self.counters["clamped_boxes"] += n
        k = self._skips_logged["clamped_boxes"] = self._skips_logged["clamped_boxes"] + 1
        if k <= self.cfg.log_skips or k % 1000 == 0:
            log.warning("sample %s: %d box(es) reach beyond the image by more than %g of a side; clamped to it "
                        "(%d samples so far in worker %d; metrics clamped_boxes)", raw.key, n, BOX_TOLERANCE, k,
                        self.g)

    def _skipped(self, d: int, reason: str, n: int) -> None:
        """n samples of dataset d were skipped: the futile-pass limits (samples and time) and the stall report."""
        self.since_good += n
        self._quiet[(self.plans[d].label, reason)] += n
        now = time.monotonic()
        if (self.cfg.epochs is None and self.since_good > self._futile_limit) or \
                now - self._t_good > self.cfg.worker_timeout_s:
            what = (f"{self.since_good} samples in a row were skipped (a full pass over its data)"
                    if self.since_good > self._futile_limit else
                    f"no usable sample for {now - self._t_good:.0f} s (data.worker_timeout_s="
                    f"{self.cfg.worker_timeout_s:g}); {self.since_good} samples in a row were skipped")
            raise DataStalled(f"loader worker {self.g}: {what}; since its last usable sample: {self._quiet_text()}; "
                              f"all skips so far: {format_counts(self._skip_counts())}. {self._hint()}")
        self._poll(now)

    def _poll(self, now: float) -> None:
        if now - self._t_report >= self.cfg.stall_report_s and now - self._t_out >= self.cfg.stall_report_s:
            self._t_report = now
            self.notify(f"loader worker {self.g} has produced no microbatch for {now - self._t_out:.0f} s: "
                        f"{self.counters['samples_read']} samples read so far; skipped since its last microbatch: "
                        f"{self._quiet_text()}")
        if self.interrupt is not None and self.interrupt():
            raise LoaderInterrupted(f"loader worker {self.g}: interrupted while waiting for data")

    def _quiet_text(self) -> str:
        by_ds: dict[str, Counter] = {}
        for (label, reason), n in self._quiet.items():
            by_ds.setdefault(label, Counter())[reason] += n
        return "; ".join(f"dataset {label!r}: {format_counts(c)}" for label, c in by_ds.items()) or "nothing"

    def _skip_counts(self) -> dict[str, int]:
        return {k: v for k, v in self.counters.items() if k.startswith("skipped/")}

    def _hint(self) -> str:
        return "Examples: " + " | ".join(self.examples.values()) if self.examples else "Fix the data or the config."

    def _check_bad_shards(self, d: int) -> None:
        bad, total = self.streams[d].bad_fraction()
        limit = self.cfg.max_bad_shard_fraction
        if bad > limit * total:
            plan = self.plans[d]
            urls = [plan.shards[sh].url for sh in sorted(self.streams[d].bad)] + [u for u, _ in plan.bad]
            raise TooManyBadShards(
                f"dataset {self.plans[d].label!r}: {bad} of its {total} shards are unreadable (found by loader worker "
                f"{self.g}, e.g. {', '.join(urls[:3])}), more than data.max_bad_shard_fraction={limit:g}: fix them "
                f"({self.examples.get('bad_shard', 'see the warnings above')}) or raise the limit to train on the rest"
            )

    def _draw(self) -> tuple[int, tuple[int, int], RawSample] | tuple[int, int] | None:
        """The next raw sample of the mix (dataset, reference, raw); (dataset, n) when n unreadable samples were
        skipped instead; None when every dataset is exhausted."""
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
            if isinstance(got, int):
                return pick, got
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
        self._t_good = self._t_out = self._t_report = time.monotonic()
        while True:
            while not self.packer.full():
                got = self._draw()
                if got is None:
                    break
                if len(got) == 2:  # a run of an unreadable shard was skipped
                    d, n = got  # type: ignore[misc]
                    self._check_bad_shards(d)
                    self._skipped(d, "bad_shard", n)
                    continue
                d, (e, p), raw = got  # type: ignore[misc]
                self.counters["samples_read"] += 1
                try:
                    sample = self._process(d, raw)
                except SkipSample as err:
                    self._skip(d, raw, err)
                    continue
                except (KeyboardInterrupt, LoaderInterrupted):
                    raise
                except Exception as err:  # noqa: BLE001 - one sample must never end the worker (module doc)
                    self._error(d, raw, err)
                    continue
                self.since_good = 0
                self._t_good = time.monotonic()
                self._poll(self._t_good)
                if sample.truncated:
                    self.counters["truncated"] += 1
                if sample.clamped_boxes:
                    self._clamped(raw, sample.clamped_boxes)
                self.packer.add(Entry((d, e, p), sample))
            if not len(self.packer):
                break
            entries = self.packer.pop_bin()
            batch = assemble([en.sample for en in entries])
            yield batch, self.state()
            # The time this generator sat suspended (the trainer stepping, the DataLoader's prefetch queue full)
            # is not time spent looking for data.
            self._t_good = self._t_out = self._t_report = time.monotonic()
            self._quiet.clear()
        self.done = True
        yield None, self.state()
