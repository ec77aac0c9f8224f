"""Held-out evaluation during a run: teacher-forced loss through the training engine, and greedy-generation
accuracy (the scoring and prompts here are also those of the offline CLI, `python -m tools.eval`).

Two figures per held-out dataset (recipe section `eval`, train/config.py EvalSection):
- loss: a forward-only pass of the TRAINING engine (ParallelModel.evaluate: every layout, pipeline included) over
  the whole dataset once (a loader with this run's data settings, the eval dataset, epochs=1, no shuffle buffer),
  train.global_microbatches / dp microbatches per call; the sum of the supervised tokens' cross-entropies over
  the global supervised-token count, as the training loss. dp ranks whose data ends first pass fewer (or no)
  microbatches and the engine runs unsupervised fillers for them, so every sample counts once and no rank waits
  on a collective another skipped; the pass ends when a call finds no microbatch on any rank.
- generation accuracy on chat samples: the LAST assistant turn is the reference, everything before it is the
  prompt (rendered exactly as in training, followed by `<|im_start|>assistant\\n`); greedy decoding with a KV
  cache (model/generate.py) until <|im_end|> / <|endoftext|> or max_new_tokens. Both strings are normalized
  (normalize_answer: outer whitespace stripped, inner whitespace runs made one space, lowercased, trailing
  . , ; : ! ? removed); `exact` = equal, `contains` = the reference appears in the prediction as a whole phrase
  (not inside a longer word or number: "7" is not contained in "17").
  In a run, generation needs the whole model in one process: with pp = 1 each dp rank's tp-rank-0 process
  gathers the full weights (DTensor.full_tensor, every rank takes part) into a plain model and answers every
  dp-th sample; counts are summed over ranks. With pp > 1 the layers live on different processes, so generation
  is skipped: a warning says so and every eval record carries `generation_skipped` with the reason.
  The gathered copy costs one full model of memory per generating rank; for models that do not fit, set
  eval.generation: false and run `python -m tools.eval` on the checkpoint (or on an export) instead.

Records: one metrics.jsonl record per dataset and evaluation ({"event": "eval", "step", "stage", "dataset",
"loss", "exact", "contains", "n", ...}), a console line, and W&B keys eval/<dataset>/<figure> (train/metrics.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from core.batch import IGNORE_INDEX, PackedBatch
from data.chatml import SkipSample
from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.packing import assemble
from data.sample import RawSample, SampleProcessor
from data.sources import Reader, plan_dataset
from data.tokenizer import Tokenizer
from model.config import ModelConfig
from model.family import get_family
from model.generate import greedy_generate
from model.lora import merged_state_dict_from
from model.meta import empty_model
from model.vlm import VLModel
from train.checkpoint import Layout
from train.config import JobConfig
from train.metrics import MetricsLogger

log = logging.getLogger(__name__)

PP_SKIP_REASON = ("pp={pp} > 1: greedy generation needs the whole model in one process, and this layout splits "
                  "the decoder layers over pipeline stages; held-out loss is still reported (evaluate a checkpoint "
                  "with `python -m tools.eval` for accuracy)")


# ------------------------------------------------------------------------------------------ scoring
_TRAILING_PUNCT = ".,;:!?"


def normalize_answer(text: str) -> str:
    """Outer whitespace stripped, inner whitespace runs -> one space, lowercase, trailing . , ; : ! ? removed."""
    s = " ".join(text.split()).lower()
    return s.rstrip(_TRAILING_PUNCT + " ")


def score(prediction: str, reference: str) -> tuple[bool, bool]:
    """(exact, contains) after normalize_answer; `contains`: the reference is a whole phrase of the prediction."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    contains = bool(r) and re.search(rf"(?<!\w){re.escape(r)}(?!\w)", p) is not None
    return p == r, contains


# ------------------------------------------------------------------------------------------ question/answer samples
@dataclass
class QASample:
    """One held-out chat sample split into prompt and reference answer."""

    key: str
    prompt: str
    """The rendered prompt, each run of vision pads shown once with its count (for the predictions file)."""
    reference: str
    batch: PackedBatch
    """The prompt as a one-sample microbatch (ids, positions, raw pixel rows, grids)."""


@dataclass
class Prediction:
    key: str
    prompt: str
    reference: str
    prediction: str
    exact: bool
    contains: bool
    finished: bool
    """An end-of-turn token ended the answer (False: max_new_tokens cut it)."""


def split_reference(obj: Any) -> tuple[list, str]:
    """(messages before the last assistant turn, that turn's text). Raises SkipSample."""
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise SkipSample("not_chat", "no 'messages' list: generation needs chat samples")
    last = msgs[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise SkipSample("no_reference", "the last message is not an assistant turn")
    content = last.get("content")
    items = [content] if isinstance(content, str) else content if isinstance(content, list) else None
    texts = [it if isinstance(it, str) else it.get("text") if isinstance(it, dict) and it.get("type", "text") == "text"
             else None for it in (items or [])]
    if items is None or any(not isinstance(t, str) for t in texts):
        raise SkipSample("no_reference", "the last assistant turn is not text only")
    return msgs[:-1], "".join(texts)


def _readable(text: str) -> str:
    return re.sub(r"((<\|(?:image|video)_pad\|>))\1+", lambda m: f"{m[2]}x{len(m[0]) // len(m[2])}", text)


def _sample_json(raw: RawSample) -> Any:
    try:
        return json.loads((raw.members or {})["json"])
    except KeyError as e:
        raise SkipSample("missing_json", "no .json member") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SkipSample("malformed_json", str(e)) from e


def prompt_sample(proc: SampleProcessor, raw: RawSample, obj: Any) -> QASample:
    """A raw chat sample (and its parsed JSON) -> its prompt, rendered and processed exactly as the training
    loader does, and its reference answer.

    The prompt is the sample with its last assistant turn emptied, rendered, then cut before that turn's
    `<|im_end|>\\n`: `...<|im_start|>assistant\\n`, the chat template's generation prompt."""
    before, reference = split_reference(obj)
    probe = {**obj, "messages": [*before, {"role": "assistant", "content": ""}]}
    members = {**(raw.members or {}), "json": json.dumps(probe).encode()}
    p = proc.process(dataclasses.replace(raw, members=members), "chat", "assistant")
    sp = proc.tok.special
    if p.num_tokens < 3 or int(p.input_ids[-2]) != sp.im_end:
        raise SkipSample("bad_prompt", "the rendered prompt does not end with the empty assistant turn")
    n = p.num_tokens - 2
    cut = dataclasses.replace(p, input_ids=p.input_ids[:n], labels=torch.full((n,), IGNORE_INDEX),
                              position_ids=p.position_ids[:, :n])
    return QASample(raw.key, _readable(proc.tok.decode(cut.input_ids.tolist())), reference, assemble([cut]))


def qa_samples(data_cfg: DataConfig, spec: DatasetSpec, index: int, proc: SampleProcessor, *, rank: int = 0,
               world: int = 1, max_samples: int | None = None) -> tuple[list[QASample], Counter]:
    """This rank's share (every world-th) of the dataset's first max_samples chat samples, in shard order, and
    the skipped samples by reason (over this rank's share)."""
    plan = plan_dataset(index, spec, data_cfg.storage)
    skips: Counter = Counter()
    out: list[QASample] = []
    if plan.source != "shards" or spec.kind == "pretrain":
        return out, skips
    reader = Reader(plan, data_cfg.storage, data_cfg.read_chunk_bytes)
    k = 0  # question/answer samples so far: every rank reads every sample's JSON, so the split agrees
    for s, shard in enumerate(plan.shards):
        for i in range(shard.samples):
            if max_samples is not None and k >= max_samples:
                return out, skips
            raw = reader.read(s, i, upto=shard.samples)
            try:
                obj = _sample_json(raw)
                split_reference(obj)
            except SkipSample as e:
                if rank == 0:  # not a question/answer sample: counted once, not towards max_samples
                    skips[e.reason] += 1
                continue
            k += 1
            if (k - 1) % world != rank:
                continue
            try:
                out.append(prompt_sample(proc, raw, obj))
            except SkipSample as e:  # media, length, ...: the same reasons as the training loader's skips
                skips[e.reason] += 1
                if skips[e.reason] <= data_cfg.log_skips:
                    log.warning("eval: skipped %s: %s", raw.key, e)
    return out, skips


def answer(model: VLModel, sample: QASample, tok: Tokenizer, max_new_tokens: int) -> Prediction:
    """Greedy answer to one prompt, decoded without its end-of-turn token, and scored."""
    b, dev = sample.batch, model.embed_tokens.weight.device
    sp = tok.special
    gen = greedy_generate(
        model, b.input_ids, max_new_tokens=max_new_tokens, eos_token_ids=(sp.im_end, sp.endoftext),
        position_ids=b.position_ids, pixel_values=b.pixel_values.to(dev), image_grid_thw=b.image_grid_thw,
        pixel_values_videos=b.pixel_values_videos.to(dev), video_grid_thw=b.video_grid_thw,
    )
    ids = gen.tokens[:-1] if gen.finished else gen.tokens
    text = tok.decode(ids)
    exact, contains = score(text, sample.reference)
    return Prediction(sample.key, sample.prompt, sample.reference, text, exact, contains, gen.finished)


# ------------------------------------------------------------------------------------------ during training
class Evaluator:
    """The eval section of a run: every rank builds one and calls maybe_run() at the same steps."""

    def __init__(self, cfg: JobConfig, engine: Any, layout: Layout, mcfg: ModelConfig, metrics: MetricsLogger,
                 microbatches: int) -> None:
        self.cfg, self.ecfg, self.engine, self.layout, self.mcfg = cfg, cfg.eval, engine, layout, mcfg
        self.metrics, self.m = metrics, microbatches
        self.device = engine.dims.device
        self.last_step: int | None = None
        self.skip_reason = PP_SKIP_REASON.format(pp=layout.pp) if layout.pp > 1 else None
        # dp rank r's tp-rank-0 process generates for every dp-th sample.
        self.generates = self.ecfg.generation and self.skip_reason is None and layout.tp_rank == 0
        self._qa: dict[str, tuple[list[QASample], Counter]] = {}
        self._proc: SampleProcessor | None = None
        self.vision = get_family(mcfg.family).processing(mcfg)  # the data's processor facts are the model's

    def maybe_run(self, step: int, final: bool) -> None:
        e = self.ecfg
        due = (e.at_end and self.last_step != step) if final else bool(e.every) and step % e.every == 0
        if due:
            self.run(step)

    def _allreduce(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # ---------------------------------------------------------------- loss
    @torch.no_grad()
    def heldout_loss(self, spec: DatasetSpec) -> tuple[float | None, int]:
        """(global mean loss or None when nothing was supervised, global supervised tokens) over one dataset."""
        loader = None
        if self.layout.has_data:
            data_cfg = dataclasses.replace(self.cfg.data, datasets=[spec], epochs=1, shuffle_buffer=0,
                                           num_workers=self.ecfg.num_workers)
            loader = build_loader(data_cfg, self.layout.dp_rank, self.layout.dp, vision=self.vision)
        it = iter(loader) if loader is not None else None
        loss_sum, count = 0.0, 0
        try:
            while True:
                mbs = [mb for _, mb in zip(range(self.m), it)] if it is not None else None
                res = self.engine.evaluate(mbs)  # global figures, the same on every rank
                if res.num_microbatches == 0:  # no rank had data left
                    break
                loss_sum, count = loss_sum + res.loss_sum, count + res.num_supervised
        finally:
            if loader is not None:
                loader.close()
        return (loss_sum / count if count else None), count

    # ---------------------------------------------------------------- generation
    def _gathered_model(self) -> VLModel | None:
        """The current weights as a plain model on the generating ranks (every rank takes part in the gathers)."""
        full = {}
        for k, v in self.engine.state_dict().items():
            t = v.full_tensor() if isinstance(v, DTensor) else v
            if self.generates:
                full[k] = t
        if not self.generates:
            return None
        if self.cfg.lora is not None:  # generate from the adapted weights: the adapters folded in (W + s B A)
            full = merged_state_dict_from(full, self.cfg.lora.scaling)
        # In the engine's compute dtype (bf16 under mixed precision); dropped after the evaluation, so training
        # never holds the extra full copy.
        model = empty_model(self.mcfg, self.device).to(self.engine.compute_dtype).eval()
        model.load_state_dict(full, strict=True)
        return model

    def _qa_for(self, index: int, spec: DatasetSpec) -> tuple[list[QASample], Counter]:
        if spec.label not in self._qa:
            if self._proc is None:
                self._proc = SampleProcessor(self.cfg.data, vision=self.vision)
            self._qa[spec.label] = qa_samples(self.cfg.data, spec, index, self._proc, rank=self.layout.dp_rank,
                                              world=self.layout.dp, max_samples=self.ecfg.max_samples)
        return self._qa[spec.label]

    def _write_predictions(self, step: int, label: str, preds: list[Prediction]) -> None:
        d = Path(self.cfg.run_dir) / "eval" / f"step_{step:08d}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{label}.dp{self.layout.dp_rank}.jsonl", "w") as f:
            for p in preds:
                f.write(json.dumps(dataclasses.asdict(p)) + "\n")

    def generation(self, step: int, model: VLModel | None, index: int, spec: DatasetSpec) -> dict[str, Any]:
        preds: list[Prediction] = []
        skips: Counter = Counter()
        if model is not None:
            samples, skips = self._qa_for(index, spec)
            preds = [answer(model, s, self._proc.tok, self.ecfg.max_new_tokens) for s in samples]
            if self.ecfg.save_predictions:
                self._write_predictions(step, spec.label, preds)
        exact, contains, n = self._allreduce([sum(p.exact for p in preds), sum(p.contains for p in preds),
                                              len(preds)])
        gathered: list[dict | None] = [None] * self.layout.world
        dist.all_gather_object(gathered, dict(skips))
        total: Counter = Counter()
        for g in gathered:
            total.update(g or {})
        return {"exact": exact / n if n else None, "contains": contains / n if n else None, "n": int(n),
                "skipped": dict(total)}

    # ---------------------------------------------------------------- one evaluation
    def run(self, step: int) -> list[dict[str, Any]]:
        """Every dataset's figures at this step (all ranks call it); rank 0 logs them."""
        e = self.ecfg
        self.last_step = step
        if e.generation and self.skip_reason and self.layout.rank == 0:
            log.warning("eval at step %d: generation skipped: %s", step, self.skip_reason)
        records, seconds = [], []
        for spec in e.datasets:  # losses first: the gathered model below is not held during the loss passes
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"step": step, "stage": self.cfg.train.stage, "dataset": spec.label}
            if e.loss:
                rec["loss"], rec["supervised_tokens"] = self.heldout_loss(spec)
            records.append(rec)
            seconds.append(time.perf_counter() - t0)
        model = self._gathered_model() if e.generation and self.skip_reason is None else None
        for i, (spec, rec) in enumerate(zip(e.datasets, records)):
            t0 = time.perf_counter()
            if e.generation and self.skip_reason is None:
                rec.update(self.generation(step, model, i, spec))
            elif e.generation:
                rec.update(exact=None, contains=None, n=0, generation_skipped=self.skip_reason)
            rec["seconds"] = round(seconds[i] + time.perf_counter() - t0, 3)
            self.metrics.eval(rec)
        return records
