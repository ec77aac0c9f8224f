"""What a checkpoint holds, as `Stateful` objects that torch.distributed.checkpoint saves and loads in one call.

    model     this rank's stage(s) (interleaved 1F1B: several model chunks) through DCP's
              get/set_model_state_dict: FQNs of the single-process model,
              DTensor shards under TP/FSDP, so any layout loads any other (DCP reshards)
    optim     AdamW state through get/set_optimizer_state_dict (flattened, keyed by FQN: layout independent;
              DCP creates the optimizer state of a fresh run itself before loading into it)
    trainer   step, skipped steps, tokens and samples seen, data pass (identical on every rank): the
              Trainer itself is Stateful (train/trainer.py)
    schedule  the LR schedule and AdamW settings the run used (train/optim.py ScheduleState; compared on
              resume: a change is a warning)
    loader    the loader position of each dp rank (`loader.dp<r>`, written by the dp rank's first stage)
    rng       python / numpy / torch / CUDA RNG states of each global rank (`rng.rank<g>`)

Tied embeddings: a pipeline's last stage keeps the tied embedding module as its head (parallel/pipeline_split),
so its head weight has the FQN `embed_tokens.weight` for the optimizer, as in one process: every layout reads
and writes the same keys, with no renaming.

Every non-tensor value is made of plain types (ints, floats, strings, lists, dicts, tensors), so it loads with
`torch.load(weights_only=True)`: nothing in a checkpoint can run code (train/checkpoint.py's safe reader).
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from parallel.pipeline_split import merge_stage_modules

_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelState(Stateful):
    """The model parameters of this rank's pipeline stage module(s)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in self.modules:
            out.update(get_model_state_dict(m))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for m in self.modules:
            own = get_model_state_dict(m)
            set_model_state_dict(m, {k: state_dict[k] for k in own}, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    """AdamW state of this rank's trainable parameters (empty when the rank has none: a frozen stage)."""

    def __init__(self, modules: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
        self.modules, self.optimizer = modules, optimizer
        # Interleaved 1F1B gives a rank several model chunks and one optimizer over all of them; DCP's optimizer
        # state API takes one module: a view over the chunks with the single-process FQNs (no prefixes).
        self.module = merge_stage_modules(modules)

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        return get_optimizer_state_dict(self.module, self.optimizer, options=_OPTIM_OPTIONS)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is not None:
            set_optimizer_state_dict(self.module, self.optimizer, state_dict, options=_OPTIM_OPTIONS)


class BlobState(Stateful):
    """One plain-typed value (a loader position, an RNG state) stored as one blob under one key; after a load,
    `value` holds what was read (the loader is built after the load: its seed depends on the restored counters).
    """

    def __init__(self, key: str, value: Any = None) -> None:
        self.key, self.value = key, value

    def state_dict(self) -> dict[str, Any]:
        # Serialized here (DCP would otherwise flatten a nested dict into one key per leaf).
        buf = io.BytesIO()
        torch.save(self.value, buf)
        return {self.key: buf.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = torch.load(io.BytesIO(state_dict[self.key]), weights_only=True)


class LoaderState(BlobState):
    """This dp rank's loader position (`loader.dp<r>`). The loader is built after a resume's load (its seed depends
    on the restored data pass): a loaded position waits in `value` until the loader is attached."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.loader: Any = None

    def state_dict(self) -> dict[str, Any]:
        if self.loader is not None:  # else (a resume's load, before the loader exists) a template for the load
            self.value = self.loader.state_dict()
        return super().state_dict()

    def attach(self, loader: Any) -> None:
        """From now on save this loader's position; restore the loaded one into it (ValueError when the loader's
        settings differ from the saved ones)."""
        self.loader = loader
        if self.value is not None:
            loader.load_state_dict(self.value)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Python / numpy / torch (and CUDA) RNG states in plain types (tensors, ints, lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    st = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    py = st["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
