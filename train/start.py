"""Where a run starts, decided once, before anything big is built:

    resume    this run's own checkpoint (checkpoint.resume: auto takes the newest one that verifies, or the one it
              names): weights, optimizer, counters, schedule, RNG and loader positions, in one DCP load;
    init      model.init_from: model weights only (fresh optimizer, schedule and data) from another run's checkpoint
              (any layout; checksums verified first) or an HF directory of a supported family (this rank's slices only);
    fresh     a random init seeded by train.seed.

plan_start() finds and verifies the start and resolves the architecture that goes with it (model/resolve.py: the
recipe's preset / hf_config / overrides must match the weights the run loads); start_model() builds the model for
it (on the meta device when weights will be loaded or the model is too big for a full init); load_start() fills
it once the engine has sharded it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from core.config import ConfigError
from model.config import ModelConfig
from model.family import get_family
from model.hf_adapter import is_hf_dir, load_hf_slices
from model.lora import LoRAConfig, is_adapter_key
from model.lora_peft import is_peft_dir
from model.meta import meta_model
from model.resolve import checkpoint_config, hf_config, resolve_model_config
from model.vlm import VLModel
from train.checkpoint import (
    CheckpointManager,
    Layout,
    checkpoint_keys,
    list_complete,
    load_state,
    read_meta,
    resolve_checkpoint,
    step_dirs,
)
from train.config import JobConfig, ModelSection
from train.lora import peft_base, peft_init_state, reset_adapters
from train.resume_data import check_resume_data
from train.state import ModelState, set_rng_state

log = logging.getLogger(__name__)

FULL_INIT_MAX_BYTES = 2 * 2**30
"""A fresh model of up to this size (fp32) is initialized whole, from the seed, before it is sharded: every rank
and every layout starts from the same weights, so losses compare across layouts. A bigger one initializes its
shards in place (the init then depends on the layout)."""


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""What a Hugging Face hub id looks like (owner/name); it could also be a relative path that does not exist."""


def hub_id_message(src: str) -> str:
    """model.init_from names no local directory but could be a hub id: say where models come from."""
    return (f"model.init_from={src!r}: no such directory here ({Path.cwd()}). Models are read from local "
            f"directories, never downloaded at run time: if {src!r} is a Hugging Face hub id, download it first "
            f"(`huggingface-cli download {src} --local-dir DIR`, or `hf download {src} --local-dir DIR`) and set "
            "model.init_from=DIR")


@dataclass(frozen=True)
class Weights:
    """Model weights on disk: one of our checkpoints (a complete step directory), an HF directory of a supported
    family, or a peft adapter directory (adapters over the HF base directory it names)."""

    path: Path
    kind: Literal["checkpoint", "hf", "peft"]

    @classmethod
    def at(cls, src: str | Path) -> Weights:
        """model.init_from's weights: an HF directory, a peft adapter directory, or a step / checkpoint / run
        directory of ours."""
        p = Path(src)
        if is_hf_dir(p):
            return cls(p, "hf")
        if is_peft_dir(p):
            return cls(p, "peft")
        if not p.exists() and HUB_ID.fullmatch(str(src)):
            raise ConfigError(hub_id_message(str(src)))
        try:
            return cls(resolve_checkpoint(p), "checkpoint")
        except FileNotFoundError as e:
            raise ConfigError(f"model.init_from={str(src)!r}: not an HF directory and {e}") from e

    @property
    def hf(self) -> bool:
        """HF weights (a peft adapter's base is an HF directory), not a checkpoint of ours."""
        return self.kind != "checkpoint"

    @property
    def name(self) -> str:
        return {"hf": "HF directory", "peft": "peft adapter", "checkpoint": "checkpoint"}[self.kind] + f" {self.path}"

    def model_config(self) -> ModelConfig:
        if self.kind == "checkpoint":
            return checkpoint_config(read_meta(self.path), self.path)
        try:
            return hf_config(peft_base(self.path) if self.kind == "peft" else self.path)
        except ValueError as e:  # a peft adapter whose base is not here
            raise ConfigError(str(e)) from e


@dataclass(frozen=True)
class Start:
    """Where a run starts (plan_start)."""

    resume: Path | None
    """This run's checkpoint to continue from; None: a new run."""
    init: Weights | None
    """A new run's model.init_from (None when resuming: the checkpoint has the weights)."""
    model_config: ModelConfig
    """The architecture, matching every set of weights the run loads."""

    @property
    def loads_weights(self) -> bool:
        return self.resume is not None or self.init is not None


# ------------------------------------------------------------------------------------------ deciding
def plan_start(cfg: JobConfig, ckpt: CheckpointManager, is_main: bool) -> Start:
    """Find the checkpoint to resume (or none), verify the weights to load, resolve the architecture. Every rank
    calls it (verification is shared over the ranks)."""
    resume = find_resume(cfg, ckpt, is_main)
    source = Weights.at(cfg.model.init_from) if cfg.model.init_from is not None else None
    mcfg = run_model_config(cfg.model, source, resume)
    init = None
    if resume is None and source is not None:
        if not source.hf:
            problems = ckpt.verify(source.path)
            if problems:
                raise ConfigError(f"model.init_from={cfg.model.init_from}: {source.path} is damaged: "
                                  f"{'; '.join(problems[:3])}")
        init = source
    return Start(resume, init, mcfg)


def run_model_config(section: ModelSection, source: Weights | None, resume: Path | None = None) -> ModelConfig:
    """The run's architecture: the recipe's, checked against model.init_from's (`source`) and the resumed
    checkpoint's."""
    init = (source.name, source.model_config()) if source is not None else None
    resumed = None
    if resume is not None:
        resumed = (f"resumed checkpoint {resume}", checkpoint_config(read_meta(resume), resume))
    return resolve_model_config(section, init, resumed)


def find_resume(cfg: JobConfig, ckpt: CheckpointManager, is_main: bool) -> Path | None:
    """The checkpoint checkpoint.resume asks for: never (and none may exist), auto (the newest that verifies; step
    directories none of which verifies are an error, not a silent restart) or a path (it must verify)."""
    r, ckpt_dir = cfg.checkpoint.resume, cfg.checkpoint_dir
    if r == "never":
        existing = list_complete(ckpt_dir)
        if existing:
            raise ConfigError(
                f"checkpoint.resume=never but {ckpt_dir} already holds {existing[-1].name}: "
                "use a new run_dir / checkpoint.dir, or checkpoint.resume=auto to continue it"
            )
        return None
    if r == "auto":
        found, rejected = ckpt.newest_verified()
        if is_main:
            for line in rejected:
                log.warning("checkpoint %s -- it fails verification and is passed over", line)
        if found is None:
            damaged = sorted(p.name for p in step_dirs(ckpt_dir))
            if damaged:
                raise ConfigError(
                    f"{ckpt_dir} holds step directories ({', '.join(damaged[-3:])}) but none is a "
                    "complete, verified checkpoint: restore the files (each step's meta.json lists them with "
                    "their checksums), or set checkpoint.resume=never to start over from model.init_from"
                )
        elif rejected and is_main:
            log.warning("resuming from %s, the newest checkpoint that verifies", found.name)
        return found
    path = resolve_checkpoint(r)
    problems = ckpt.verify(path)
    if problems:
        raise ConfigError(f"checkpoint.resume={r}: {path} is damaged: {'; '.join(problems[:3])}")
    return path


# ------------------------------------------------------------------------------------------ building
def start_model(start: Start) -> tuple[VLModel, bool]:
    """(the model to parallelize, whether it is on the meta device). Weights that will be loaded are built on the
    meta device, and only this rank's shards are ever allocated; a fresh model is initialized whole from the
    current (seeded) RNG when it is at most FULL_INIT_MAX_BYTES, else shard by shard after sharding."""
    model = meta_model(start.model_config)
    n_params = sum(p.numel() for p in model.parameters())
    if start.loads_weights or n_params * 4 > FULL_INIT_MAX_BYTES:
        return model, True
    return VLModel(start.model_config), False


# ------------------------------------------------------------------------------------------ loading
class Resumable(Protocol):
    """What resume() restores: the trainer (train/trainer.py), which is Stateful itself."""

    cfg: JobConfig
    mcfg: ModelConfig
    layout: Layout
    ckpt: CheckpointManager
    is_main: bool
    step: int
    data_pass: int

    def checkpoint_state(self) -> dict[str, Any]: ...


def load_start(run: Resumable, engine: Any, start: Start) -> None:
    """Fill the sharded model (and, resuming, everything else of `run`) from where the run starts."""
    if start.resume is not None:
        resume(run, start.resume)
    elif start.init is not None:
        load_init(engine, start.init, start.model_config, run.cfg.lora, run.is_main)


def load_init(engine: Any, init: Weights, mcfg: ModelConfig, lcfg: LoRAConfig | None, is_main: bool) -> None:
    """model.init_from's weights into this rank's shards of the engine's model. A LoRA run whose weights hold no
    adapters (an HF directory, a checkpoint of a run without LoRA) starts fresh ones (B = 0: exactly the loaded
    model); a peft adapter directory brings its adapters over its HF base."""
    if init.hf:
        # An HF directory holds no adapters; a peft adapter directory names its HF base (train/lora.py).
        sd = {k: v for k, v in engine.state_dict().items() if not is_adapter_key(k)}
        load_hf_slices(sd, peft_base(init.path) if init.kind == "peft" else init.path, mcfg)
        engine.load_state_dict(sd, strict=lcfg is None)
        adapters = init.kind == "peft"
        if adapters:
            engine.load_state_dict(peft_init_state(mcfg, lcfg, init.path), strict=False)
    else:
        adapters = load_checkpoint_weights(engine.modules, init.path)
    if lcfg is not None and not adapters:
        reset_adapters(engine.modules)
    if is_main:
        log.info("initialized weights from %s", init.name if init.hf else
                 f"checkpoint {init.path} (step {read_meta(init.path)['step']})")


@torch.no_grad()
def load_checkpoint_weights(modules: list[nn.Module], path: Path, process_group=None) -> bool:
    """Model weights only from one of our checkpoints (any layout) into this rank's stage modules, in place.
    Returns whether LoRA adapters were loaded: a LoRA model takes a checkpoint without adapters (its base weights;
    the caller starts fresh adapters), a model without adapters refuses a LoRA run's checkpoint."""
    model = ModelState(modules)
    keys = checkpoint_keys(path)
    own = model.state_dict()
    stored_adapters = any(k.startswith("model.") and is_adapter_key(k) for k in keys)
    own_adapters = any(is_adapter_key(k) for k in own)
    if stored_adapters and not own_adapters:
        raise ConfigError(f"checkpoint {path} is a LoRA run's (it holds adapters) and this recipe has no lora: "
                          f"section: export it merged (python -m tools.export {path} DIR --lora merged) and start "
                          "from DIR, or add the run's lora: section to continue its adapters")
    needed = [k for k in own if stored_adapters or not is_adapter_key(k)]  # fresh adapters over a plain checkpoint
    absent = sorted(f"model.{k}" for k in needed if f"model.{k}" not in keys)
    if absent:
        raise ConfigError(f"checkpoint {path} lacks {len(absent)} model tensors, e.g. {absent[:5]}")
    if own_adapters and not stored_adapters:
        base = {f"model.{k}": v for k, v in own.items() if not is_adapter_key(k)}
        load_state(path, base, process_group)
        for m in modules:
            mine = {k: base[f"model.{k}"] for k in get_model_state_dict(m) if f"model.{k}" in base}
            set_model_state_dict(m, mine, options=StateDictOptions(strict=False))
    else:
        load_state(path, {"model": model}, process_group)
    log.info("initialized the model from checkpoint %s", path)
    return stored_adapters


def resume(run: Resumable, path: Path) -> None:
    """Everything of checkpoint `path` in one DCP load. The loader position is restored when the dp size is the
    same and checkpoint.data_state=exact; otherwise the data continues with a new pass (run.data_pass + 1, which
    reseeds the loader). RNG states belong to the ranks of one layout: restored under the same layout only."""
    cfg, layout = run.cfg, run.layout
    meta = read_meta(path)
    saved = meta["layout"]
    same_dp = saved["dp"] == layout.dp
    same_layout = same_dp and saved["tp"] == layout.tp and saved["pp"] == layout.pp
    restore_data = same_dp and cfg.checkpoint.data_state == "exact"
    # Data settings that change what a sample becomes: refused or warned about (train/resume_data.py).
    check_resume_data(meta, cfg.data, restore_data, path, warn=run.is_main,
                      vision=get_family(run.mcfg.family).processing(run.mcfg))
    state = run.checkpoint_state()
    if not same_layout:
        state.pop("rng")
    if not restore_data:
        state.pop("loader", None)
    _check_keys(path, state, layout)
    run.ckpt.load(path, state)
    changed = state["schedule"].changes()
    if changed and run.is_main:
        log.warning("resuming with a different optimizer schedule than the checkpoint's (saved -> now): %s; "
                    "the new values apply from step %d", "; ".join(changed), run.step + 1)
    if "rng" in state:
        set_rng_state(state["rng"].value)
    if not restore_data:
        run.data_pass += 1
        if run.is_main:
            why = (f"the dp size changed ({saved['dp']} -> {layout.dp}): a loader position is per dp rank "
                   "and cannot be mapped to another dp size" if not same_dp else "checkpoint.data_state=restart")
            log.warning("resuming %s: %s; the data continues with a new pass, reseeded (data pass %d)",
                        path, why, run.data_pass)
    if run.step > cfg.train.steps:
        raise ConfigError(
            f"checkpoint {path} is at step {run.step}, past this recipe's train.steps={cfg.train.steps}: "
            f"raise train.steps above {run.step}, or start a new run_dir"
        )
    if run.is_main:
        log.info("resumed from %s at step %d (saved as dp%d x tp%d x pp%d)", path, run.step, saved["dp"],
                 saved["tp"], saved["pp"])


def _check_keys(path: Path, state: dict[str, Any], layout: Layout) -> None:
    """Every model / optimizer tensor and this rank's loader position are in the checkpoint (a clear error for
    a checkpoint of other trainable groups or another model, instead of DCP's)."""
    keys = checkpoint_keys(path)
    absent = [f"{name}.{k}" for name, obj in state.items() if name in ("model", "optim")
              for k in obj.state_dict() if f"{name}.{k}" not in keys]
    if absent:
        raise ConfigError(
            f"checkpoint {path} has no {absent[0]} (and {len(absent) - 1} more): it was saved with other "
            "trainable groups or another model. To start a new stage from its weights, use model.init_from "
            "with checkpoint.resume=never in a new run_dir."
        )
    if "loader" in state and f"loader.{state['loader'].key}" not in keys:
        raise ConfigError(f"checkpoint {path} has no loader state for dp rank {layout.dp_rank}")
