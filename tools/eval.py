"""Held-out loss and accuracy of a checkpoint or an HF directory, offline, in one process (no process group):

    python -m tools.eval CHECKPOINT_OR_HF_DIR --data PATH [--data PATH ...] [--max-new-tokens N]
                         [--max-samples N] [--out FILE.json] [--tokenizer DIR] [--device cpu|cuda] [--dtype fp32]
                         [--kind auto|chat|pretrain] [--no-loss]

The model is one of our checkpoints (a step_* dir, or a checkpoint / run dir whose latest complete step is taken;
the tokenizer and data settings come from its config.yaml) or an HF directory (the tokenizer from it unless
--tokenizer). The figures are the in-training evaluation's (train/eval.py): the held-out loss is teacher-forced
over the whole dataset (supervised tokens only, the sum of their cross-entropies over their count; --no-loss skips
it), and on chat samples the greedy answer to everything before the last assistant turn is scored against that
turn (`exact` and `contains` as documented there). Writes a JSON report with the figures and every prediction into
the evaluated run's directory (RUN_DIR/eval/step_<N>/offline.json, next to the in-training predictions of that
step; an HF directory's eval/offline.json) unless --out says elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from core.config import ConfigError
from core.dtypes import DTYPES
from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.sample import SampleProcessor
from model.hf_adapter import is_hf_dir, load_hf_model
from model.lora import apply_lora, merge_lora_
from model.loss import lm_loss
from model.meta import empty_model
from model.resolve import checkpoint_config
from model.vlm import VLModel
from train.checkpoint import load_state, read_meta, resolve_checkpoint
from train.config import load_config
from train.eval import answer, qa_samples
from train.formatting import pct
from train.state import ModelState


def load_for_eval(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                  tokenizer: str | None = None) -> tuple[VLModel, DataConfig]:
    """(model, data settings) of an HF directory or one of our checkpoints, for one process."""
    p = Path(path)
    if is_hf_dir(p):
        tok = tokenizer or str(p)
        if not Path(tok, "tokenizer.json").is_file() and not Path(tok).is_file():
            raise ConfigError(f"{tok} has no tokenizer.json: pass --tokenizer DIR (a Qwen2-VL tokenizer directory)")
        return load_hf_model(p, dtype=dtype, device=device).eval(), DataConfig(tokenizer=tok)
    ck = resolve_checkpoint(p)
    job = load_config(ck / "config.yaml")
    mcfg = checkpoint_config(read_meta(ck), ck)
    model = empty_model(mcfg, "cpu")
    if job.lora is not None:  # a LoRA run's checkpoint holds the adapters beside the base weights
        apply_lora(model, job.lora, job.frozen_groups)
    with warnings.catch_warnings():  # one process by design: DCP's "torch.distributed is disabled" is noise here
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        load_state(ck, {"model": ModelState([model])}, no_dist=True)
    model = merge_lora_(model).to(device=device, dtype=dtype).eval()  # adapters folded in (none: unchanged)
    return model, dataclasses.replace(job.data, tokenizer=tokenizer or job.data.tokenizer)


def default_out(path: str | Path) -> Path:
    """Where the report of `path` goes: the evaluated run's RUN_DIR/eval/step_<N>/offline.json (a checkpoint under
    RUN_DIR/checkpoints; another checkpoint.dir gets the eval/ folder beside its step directories), or an HF
    directory's eval/offline.json."""
    p = Path(path)
    if is_hf_dir(p):
        return p / "eval" / "offline.json"
    ck = resolve_checkpoint(p)
    run_dir = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
    return run_dir / "eval" / ck.name / "offline.json"


@torch.no_grad()
def heldout_loss(model: VLModel, data_cfg: DataConfig, spec: DatasetSpec) -> tuple[float | None, int]:
    """(loss, supervised tokens) of the whole dataset once, teacher-forced, as the in-training evaluation computes
    it: the sum of the supervised tokens' cross-entropies over their count (None when nothing is supervised)."""
    cfg = dataclasses.replace(data_cfg, datasets=[spec], epochs=1, shuffle_buffer=0, num_workers=0)
    device = model.embed_tokens.weight.device
    total, count = 0.0, 0
    loader = build_loader(cfg, 0, 1, vision=model.processing)  # the model family's processor facts
    try:
        for mb in loader:
            mb = mb.to(device)
            s, n = lm_loss(model(**mb.model_inputs()), model.lm_head.weight, mb.labels)
            total, count = total + float(s), count + int(n)
    finally:
        loader.close()
    return (total / count if count else None), count


def evaluate_offline(path: str | Path, data: list[str], *, max_new_tokens: int = 32, max_samples: int | None = None,
                     device: str = "cpu", dtype: str | None = None, tokenizer: str | None = None,
                     loss: bool = True, kind: str = "auto", print_fn=print) -> dict[str, Any]:
    """Held-out loss and generation accuracy of a model on held-out datasets; returns the report (figures +
    predictions)."""
    model, data_cfg = load_for_eval(path, device, DTYPES[dtype] if dtype else None, tokenizer)
    specs = [DatasetSpec(path=d, kind=kind) for d in data]
    names = [s.label for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--data paths have the same name {names}: give directories with distinct names")
    data_cfg = dataclasses.replace(data_cfg, datasets=specs)
    proc = SampleProcessor(data_cfg, vision=model.processing)  # the model family's processor facts
    report: dict[str, Any] = {"model": str(path), "max_new_tokens": max_new_tokens, "datasets": {},
                              "predictions": []}
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        samples, skips = qa_samples(data_cfg, spec, i, proc, max_samples=max_samples)
        preds = [answer(model, s, proc.tok, max_new_tokens) for s in samples]
        n = len(preds)
        fig: dict[str, Any] = {"loss": None, "supervised_tokens": 0}
        if loss:
            fig["loss"], fig["supervised_tokens"] = heldout_loss(model, data_cfg, spec)
        fig.update(n=n, exact=sum(p.exact for p in preds) / n if n else None,
                   contains=sum(p.contains for p in preds) / n if n else None, skipped=dict(skips),
                   seconds=round(time.perf_counter() - t0, 2))
        report["datasets"][spec.label] = fig
        report["predictions"] += [{"dataset": spec.label, **dataclasses.asdict(p)} for p in preds]
        held = (f"; held-out loss {fig['loss']:.4f} over {fig['supervised_tokens']} supervised tokens"
                if fig["loss"] is not None else "")
        print_fn(f"{spec.label}: exact {pct(fig['exact'])} contains {pct(fig['contains'])} on {n} samples"
                 + (f" (skipped {dict(skips)})" if skips else "") + held + f" in {fig['seconds']}s")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a checkpoint of ours (step_* dir, checkpoint dir or run dir) or an HF directory")
    ap.add_argument("--data", action="append", required=True, help="held-out chat shards (repeat for several)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated at most per answer")
    ap.add_argument("--max-samples", type=int, default=None, help="first N chat samples per dataset")
    ap.add_argument("--out", default=None, help="the JSON report (default: RUN_DIR/eval/step_<N>/offline.json of the "
                                                "evaluated run, or HF_DIR/eval/offline.json)")
    ap.add_argument("--kind", default="auto", choices=("auto", "chat", "pretrain"),
                    help="the datasets' kind, as eval.datasets[].kind (default auto: per sample); the loss counts "
                         "the samples of this kind")
    ap.add_argument("--no-loss", action="store_true", help="skip the held-out loss (a teacher-forced pass over "
                                                           "every sample of each dataset)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's or HF dir's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="cast the weights (default: as stored)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.max_new_tokens < 1 or (args.max_samples is not None and args.max_samples < 1):
        ap.error("--max-new-tokens and --max-samples must be >= 1")
    try:
        out = Path(args.out) if args.out else default_out(args.model)
        report = evaluate_offline(args.model, args.data, max_new_tokens=args.max_new_tokens,
                                  max_samples=args.max_samples, device=args.device, dtype=args.dtype,
                                  tokenizer=args.tokenizer, loss=not args.no_loss, kind=args.kind)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"eval failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"predictions: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
