"""ParallelConfig: the typed, strict description of one parallel layout and its engine options.

Recipes select and override these fields (YAML -> `ParallelConfig.from_dict`, core.config's strict parser:
unknown keys and wrong types are errors naming the key). Every field has a docstring; `validate()` raises
ValueError naming the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from core.config import from_dict

ACMode = Literal["none", "selective", "full"]
ACSelective = Literal["op", "block"]
Precision = Literal["fp32", "bf16"]
Backend = Literal["auto", "nccl", "gloo"]
DeviceKind = Literal["auto", "cpu", "cuda"]
CompileBackend = Literal["inductor", "aot_eager", "eager"]
PPSchedule = Literal["1f1b", "interleaved_1f1b"]
_AC_MODES = typing.get_args(ACMode)
_AC_SELECTIVE = typing.get_args(ACSelective)
_PRECISIONS = typing.get_args(Precision)
_BACKENDS = typing.get_args(Backend)
_PP_SCHEDULES = typing.get_args(PPSchedule)


@dataclass
class ParallelConfig:
    """One parallel layout (pp x dp x tp = world size) and the engine's options."""

    dp: int = -1
    """Data-parallel degree (FSDP2 shard group). -1 = fill from the world size: world / (pp * tp)."""
    tp: int = 1
    """Tensor-parallel degree: ViT and LLM attention/MLP projections are split over tp ranks (DTensor)."""
    pp: int = 1
    """Pipeline-parallel degree: number of 1F1B stages (stage 0 = ViT + merger + embeddings + first k layers)."""
    sequence_parallel: bool = True
    """With tp > 1: shard norms and the residual stream along the sequence between blocks (Korthikanti et al.).
    Packed sequences are then padded at the tail to a multiple of tp (a separate, unsupervised segment)."""
    sp_pad_multiple: int = 0
    """With SP: pad each packed sequence (and the ViT's patch rows) to a multiple of lcm(tp, this) instead of
    just tp. DTensor caches its sharding decisions per tensor shape, so every new packed length costs CPU time
    in every TP op; a multiple such as 128 bounds the number of distinct shapes. 0 = pad to tp only."""
    pp_first_stage_layers: int | str = "auto"
    """k = decoder layers on pipeline stage 0 (which also holds the ViT). An int, or 'auto' to derive k from
    FLOPs so stage 0 (ViT + k layers) costs about as much as each later stage."""
    pp_vision_fraction: float = 0.25
    """Only for pp_first_stage_layers='auto': the expected fraction of LLM tokens that are vision tokens, which
    sets how much ViT work stage 0 carries per LLM token."""
    num_microbatches: int = 1
    """Microbatches per optimizer step per dp rank (gradient accumulation; with pp > 1 the 1F1B microbatches).
    The engine takes whatever list step() gets and checks that every dp rank passed the same count."""
    pp_schedule: PPSchedule = "1f1b"
    """Pipeline schedule with pp > 1: '1f1b' (one model chunk per rank; idle share of a step (p-1)/(m+p-1)) or
    'interleaved_1f1b' (Narayanan et al. 2021: pp_virtual_stages chunks per rank; idle share (p-1)/(v*m+p-1)
    for v times the inter-stage messages; needs the microbatches per step to be a multiple of pp). Which one
    is faster depends on the message cost: docs/parallel.md has the measurements."""
    pp_virtual_stages: int = 1
    """With pp_schedule='interleaved_1f1b': model chunks per rank, v >= 2. The model is cut into pp * v stages
    (pp_first_stage_layers applies to the first of them) and rank r holds stages r, r + pp, ..., r + (v-1)pp.
    Must be 1 with '1f1b'."""
    activation_checkpoint: ACMode = "none"
    """'none', 'selective' (see ac_selective) or 'full' (recompute every ViT block and decoder layer)."""
    ac_selective: ACSelective = "op"
    """With activation_checkpoint='selective': 'op' = per op class in every block (keep matmul, attention and
    TP-collective outputs, recompute norms/activations/elementwise), or 'block' = fully recompute every
    ac_every-th block."""
    ac_every: int = 2
    """With ac_selective='block': checkpoint every ac_every-th ViT block / decoder layer (1 = all)."""
    zero_stage: Literal[1, 3] = 1
    """1 = ZeRO-1 semantics (FSDP2 reshard_after_forward=False: parameters stay unsharded for the whole step,
    one gradient reduce-scatter per step, optimizer state and fp32 master weights sharded over dp);
    3 = ZeRO-3 (reshard after forward, gradients reduce-scattered every microbatch), for big models without PP."""
    mixed_precision: Precision = "fp32"
    """'fp32', or 'bf16' = bf16 compute with fp32 master weights, fp32 gradient reduction and fp32 loss."""
    timeout_s: float = 600.0
    """Timeout in seconds of every process group and every P2P wait: a hang becomes an error after this long."""
    check_replicated_every: int = 0
    """Debug: every N steps check that weights replicated across tp ranks (patch embed, norms, merger) and the
    pipeline-tied embedding are bitwise identical (raises naming the parameter). 0 = never."""
    backend: Backend = "auto"
    """Process-group backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'."""
    device: DeviceKind = "auto"
    """'auto' (cuda:LOCAL_RANK when CUDA is available, else cpu), 'cpu' or 'cuda'."""
    loss_chunk_size: int = 0
    """Supervised rows per chunk of the (vocab-parallel) LM head + cross-entropy: peak memory is one chunk of
    logits (rows x V/tp, fp32), never T x V. 0 = the model's default (model.loss.DEFAULT_CHUNK_SIZE)."""
    compile: bool = False
    """torch.compile every ViT block and decoder layer (parallel/compile.py; after TP and activation
    checkpointing, before FSDP; parameter names unchanged). Shapes are compiled dynamic, so packed lengths that
    change every step reuse one graph per block kind instead of compiling once per length."""
    compile_backend: CompileBackend = "inductor"
    """With compile: 'inductor' (generated fused kernels: the fast one), 'aot_eager' (traces forward and
    backward as inductor does but runs eager kernels: compiles in seconds, for CPU CI and debugging) or 'eager'
    (graph capture only)."""

    # ------------------------------------------------------------------------------------------------ API
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ParallelConfig:
        """Build from a recipe dict, strictly (core.config): unknown keys, wrong types and invalid values are a
        ConfigError (a ValueError) naming the key and the valid choices."""
        return from_dict(cls, dict(d or {}), "parallel")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def pad_multiple(self, tp: int) -> int:
        """The multiple packed sequences are padded to under SP (1 = no padding)."""
        if tp == 1 or not self.sequence_parallel:
            return 1
        return math.lcm(tp, self.sp_pad_multiple) if self.sp_pad_multiple else tp

    def validate(self) -> None:
        """Raise ValueError naming the offending value and the fix (world size is checked by ParallelDims)."""
        for name in ("tp", "pp", "num_microbatches", "ac_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel.{name}={v!r} must be an integer >= 1")
        if not isinstance(self.dp, int) or isinstance(self.dp, bool) or (self.dp < 1 and self.dp != -1):
            raise ValueError(f"parallel.dp={self.dp!r} must be an integer >= 1, or -1 to fill from the world size")
        k = self.pp_first_stage_layers
        if not (k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)):
            raise ValueError(f"parallel.pp_first_stage_layers={k!r} must be 'auto' or an integer >= 1")
        if not 0.0 <= float(self.pp_vision_fraction) <= 1.0:
            raise ValueError(f"parallel.pp_vision_fraction={self.pp_vision_fraction} must be in [0, 1]")
        if self.activation_checkpoint not in _AC_MODES:
            raise ValueError(
                f"parallel.activation_checkpoint={self.activation_checkpoint!r}; choose one of {_AC_MODES}"
            )
        if self.ac_selective not in _AC_SELECTIVE:
            raise ValueError(f"parallel.ac_selective={self.ac_selective!r}; choose one of {_AC_SELECTIVE}")
        if self.zero_stage not in (1, 3):
            raise ValueError(f"parallel.zero_stage={self.zero_stage!r}; choose 1 (ZeRO-1 semantics) or 3 (ZeRO-3)")
        if self.mixed_precision not in _PRECISIONS:
            raise ValueError(f"parallel.mixed_precision={self.mixed_precision!r}; choose one of {_PRECISIONS}")
        if not float(self.timeout_s) > 0:
            raise ValueError(f"parallel.timeout_s={self.timeout_s} must be > 0 seconds")
        if not isinstance(self.check_replicated_every, int) or self.check_replicated_every < 0:
            raise ValueError(f"parallel.check_replicated_every={self.check_replicated_every!r} must be >= 0")
        if self.backend not in _BACKENDS:
            raise ValueError(f"parallel.backend={self.backend!r}; choose one of {_BACKENDS}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"parallel.device={self.device!r}; choose 'auto', 'cpu' or 'cuda'")
        if not isinstance(self.sp_pad_multiple, int) or self.sp_pad_multiple < 0:
            raise ValueError(f"parallel.sp_pad_multiple={self.sp_pad_multiple!r} must be an integer >= 0")
        if self.pp_schedule not in _PP_SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={self.pp_schedule!r}; choose one of {_PP_SCHEDULES}")
        v = self.pp_virtual_stages
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"parallel.pp_virtual_stages={v!r} must be an integer >= 1")
        if self.pp_schedule == "1f1b" and v != 1:
            raise ValueError(f"parallel.pp_virtual_stages={v} needs pp_schedule='interleaved_1f1b' (or set it to 1)")
        if self.pp_schedule == "interleaved_1f1b":
            if self.pp < 2 or v < 2:
                raise ValueError(
                    f"parallel.pp_schedule='interleaved_1f1b' needs pp >= 2 and pp_virtual_stages >= 2, got pp="
                    f"{self.pp}, pp_virtual_stages={v}; or use pp_schedule='1f1b'"
                )
            if self.num_microbatches % self.pp:
                m, p = self.num_microbatches, self.pp
                use = " or ".join(str(x) for x in (m - m % p, m - m % p + p) if x >= p)
                raise ValueError(
                    f"parallel.num_microbatches={m} must be a multiple of pp={p} with pp_schedule="
                    f"'interleaved_1f1b'; use {use}"
                )
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ValueError(f"parallel.loss_chunk_size={self.loss_chunk_size!r} must be an integer >= 0")
        if self.compile_backend not in typing.get_args(CompileBackend):
            raise ValueError(f"parallel.compile_backend={self.compile_backend!r}; choose one of "
                             f"{typing.get_args(CompileBackend)}")
