"""The model on the meta device, built without running any weight init.

A model whose weights will be loaded (resume, init_from), or that is only measured (the dry run), is built on the
meta device: no memory, and the engine allocates only this rank's shards later (ParallelModel.materialize). The
modules' own inits (nn.Linear.reset_parameters, ...) would still run there and do nothing useful, so SkipInit
turns every torch.nn.init.* call on a meta tensor into a no-op for the duration of the build.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from model.config import ModelConfig
from model.vlm import VLModel

_INITS = frozenset(getattr(nn.init, name) for name in dir(nn.init)
                   if name.endswith("_") and not name.startswith("_") and callable(getattr(nn.init, name)))
"""The in-place initializers of torch.nn.init (normal_, uniform_, kaiming_uniform_, zeros_, ...)."""


class SkipInit(TorchFunctionMode):
    """Within it, torch.nn.init.* on a meta tensor returns the tensor untouched (every other call runs)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITS:
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def meta_model(mcfg: ModelConfig) -> VLModel:
    """The whole model on the meta device, no init run (see the module doc)."""
    with torch.device("meta"), SkipInit():
        return VLModel(mcfg)


def empty_model(mcfg: ModelConfig, device: torch.device | str) -> VLModel:
    """The whole model on `device` with uninitialized weights, to load weights into: tied head and rotary buffers
    set (neither to_empty nor a state dict carries those)."""
    model = meta_model(mcfg).to_empty(device=device)
    if mcfg.text.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers(device)
    return model
