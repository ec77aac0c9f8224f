"""The recipe schema: typed dataclasses, one docstring per field, strict parsing.

    python -m train RECIPE.yaml [dotted.key=value ...]      # CLI > recipe file(s) > these defaults
    python -m train --help-config                           # every key, its type, default and doc

Sections: model, data (the loader's DataConfig), parallel (the engine's ParallelConfig), optim, train,
checkpoint, metrics, plus run_dir. Recipes under recipes/ only select and override. The resolved config is
written to RUN_DIR/config.yaml and into every checkpoint (config.yaml next to the DCP files).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config import ConfigError, apply_overrides, expand_env, from_dict, load_yaml, restore_env_refs, to_dict
from data.config import DataConfig
from parallel import ParallelConfig

GROUPS = ("vision", "merger", "llm")
"""Module groups by FQN prefix: vision = visual.* except visual.merger.*; merger = visual.merger.*; llm = rest."""

STAGE_FROZEN = {1: ("llm",), 2: (), 3: ("vision",)}
"""The Qwen2-VL paper's recipe: stage 1 trains ViT + merger on image-text data with the LLM frozen; stage 2
trains everything; stage 3 freezes the ViT and fine-tunes merger + LLM on ChatML instruction data."""


@dataclass
class ModelSection:
    """Which model: a preset or an HF directory's config.json, and which weights to start from."""

    preset: str | None = "tiny"
    """Architecture preset: 'tiny', '2b', '7b' or '72b' (model.config.get_preset). null = take the
    architecture from `hf_config` (or from `init_from` when it is an HF directory)."""
    hf_config: str | None = None
    """An HF Qwen2-VL directory (or its config.json) whose architecture to use instead of a preset."""
    init_from: str | None = None
    """Weights to start from, model only (fresh optimizer, schedule and data): a checkpoint of ours (a
    `step_*` directory, or a checkpoint dir / run dir whose latest complete step is taken; any parallel layout)
    or an HF Qwen2-VL directory (config.json + safetensors). null = random init (seeded by train.seed).
    Ignored when the run resumes from its own checkpoint."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture overrides as dotted ModelConfig keys, e.g. {text.num_layers: 2, attn_backend: sdpa}."""


@dataclass
class OptimConfig:
    """AdamW with per-group learning rates, warmup + cosine decay, global gradient clipping."""

    lr: float = 1e-4
    """Peak learning rate for every trainable group without its own lr_<group>."""
    lr_vision: float | None = None
    """Peak learning rate of the ViT (visual.* except the merger); null = lr."""
    lr_merger: float | None = None
    """Peak learning rate of the patch merger (visual.merger.*); null = lr."""
    lr_llm: float | None = None
    """Peak learning rate of the LLM (embeddings, decoder layers, final norm, LM head); null = lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW). Never applied to norms, biases or 1-d parameters."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak learning rate over this many steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, to min_lr_ratio * peak at train.steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of each group's peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over every parallel group) to this value; 0 = no clipping (the norm is
    still computed and logged)."""
    implementation: Literal["auto", "fused", "foreach", "for"] = "auto"
    """AdamW kernel: 'auto' = fused on CUDA, foreach elsewhere."""


@dataclass
class TrainSection:
    """The stage, what trains, how long, the batch and numerics."""

    stage: Literal[1, 2, 3] = 1
    """Qwen2-VL stage: selects the default frozen groups (1: llm frozen; 2: none; 3: vision frozen)."""
    freeze: list[str] | None = None
    """Frozen module groups among vision, merger, llm; null = the stage's default. Frozen parameters get no
    gradients and no optimizer state."""
    steps: int = 100
    """Optimizer steps of this stage (the LR schedule ends here)."""
    global_microbatches: int | None = None
    """Packed microbatches per optimizer step over the whole job (the global batch). Each dp rank runs
    global_microbatches / dp of them per step, i.e. the engine's num_microbatches (gradient accumulation, and
    the pipeline's microbatches). Global batch in tokens ~= global_microbatches x data token budget. null =
    parallel.num_microbatches x dp. Keeping it fixed keeps the math identical across layouts."""
    seed: int = 0
    """Seed of the model init and of every RNG (the data order comes from data's own seed)."""
    max_skipped_steps: int = 20
    """Stop after this many steps skipped for a non-finite loss or gradient norm over the run."""
    max_consecutive_skips: int = 5
    """Stop after this many skipped steps in a row (a diverged run)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (slower on GPU; CPU runs are deterministic anyway)."""


@dataclass
class CheckpointConfig:
    """Sharded checkpoints with torch.distributed.checkpoint: each rank writes its own shards."""

    dir: str | None = None
    """Checkpoint directory (shared by all nodes); null = RUN_DIR/checkpoints."""
    every: int = 500
    """Save every this many steps; 0 = only the final one."""
    keep_last: int = 3
    """Keep the newest N complete checkpoints (the final one of a stage is always kept); 0 = keep all."""
    async_save: bool = False
    """Write in a background thread after staging to CPU memory (torch.distributed.checkpoint.async_save);
    training continues while the files are written."""
    resume: str = "auto"
    """'auto' = continue from the latest complete checkpoint in `dir` if any; 'never' = start fresh (fails if
    `dir` already has checkpoints, so nothing is overwritten); or a path to one step_* directory."""
    data_state: Literal["exact", "restart"] = "exact"
    """On resume: 'exact' restores every dp rank's loader position (the data continues bitwise; needs the same
    data settings and dp size; when the dp size changed, the data continues with a new reseeded pass instead);
    'restart' always continues with a new reseeded pass over the data."""
    save_final: bool = True
    """Save after the last step (the stage hand-off point for the next stage's model.init_from)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (optional)."""

    mode: Literal["auto", "online", "offline", "disabled"] = "disabled"
    """'auto' = WANDB_MODE if set, else online with an API key, offline without one. The WANDB_MODE environment
    variable also overrides 'online'/'offline' here. Offline runs are written under RUN_DIR/wandb."""
    project: str = "qwen2vl-train"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team); null = the key's default."""
    name: str | None = None
    """Run name; null = the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""


@dataclass
class MetricsConfig:
    """Per-step metrics: RUN_DIR/metrics.jsonl, one console line on rank 0, optional W&B."""

    log_every: int = 1
    """Write metrics every N steps (the console line and jsonl record)."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one device for MFU; null = a table by device name (H100, H200, A100, ...).
    On CPU, MFU is not reported; achieved FLOP/s is."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B settings."""


@dataclass
class JobConfig:
    """A whole stage: every section of a recipe."""

    run_dir: str = "runs/default"
    """Directory of this run: config.yaml, metrics.jsonl, checkpoints/ (unless checkpoint.dir), wandb/."""
    model: ModelSection = field(default_factory=ModelSection)
    """Model architecture and initial weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """The loader (data/config.py): shards, tokenizer, token budget, workers, seed."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The parallel layout (parallel/): dp, tp, pp, microbatches, activation checkpointing, precision."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainSection = field(default_factory=TrainSection)
    """Stage, frozen groups, steps, batch, numerics."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Logging."""
    env_refs: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    # {dotted key: '${VAR}...'} of every value expanded from the environment: the saved config.yaml writes the
    # reference back, so a secret in the environment never lands in a run directory or a checkpoint.

    # -------------------------------------------------------------------------------- derived values
    @property
    def frozen_groups(self) -> tuple[str, ...]:
        return tuple(self.train.freeze) if self.train.freeze is not None else STAGE_FROZEN[self.train.stage]

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    def group_lr(self, group: str) -> float:
        v = getattr(self.optim, f"lr_{group}")
        return self.optim.lr if v is None else v

    def validate(self) -> None:
        """Cross-field checks that need more than one section; raise ConfigError naming values and fix."""
        t, o, c = self.train, self.optim, self.checkpoint
        for g in self.frozen_groups:
            if g not in GROUPS:
                raise ConfigError(f"train.freeze: unknown group {g!r}; groups are {', '.join(GROUPS)}")
        if set(self.frozen_groups) == set(GROUPS):
            raise ConfigError("train.freeze freezes every group (vision, merger, llm): nothing would train")
        if t.steps < 1:
            raise ConfigError(f"train.steps={t.steps}: must be >= 1")
        if t.global_microbatches is not None and t.global_microbatches < 1:
            raise ConfigError(f"train.global_microbatches={t.global_microbatches}: must be >= 1")
        if t.max_skipped_steps < 0 or t.max_consecutive_skips < 1:
            raise ConfigError("train.max_skipped_steps must be >= 0 and train.max_consecutive_skips >= 1")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
        if o.warmup_steps < 0 or o.warmup_steps > t.steps:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be in [0, train.steps={t.steps}]")
        if o.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")
        for g in GROUPS:
            lr = self.group_lr(g)
            if lr < 0:
                raise ConfigError(f"optim.lr_{g}={lr}: must be >= 0")
        if not (0 <= o.betas[0] < 1 and 0 <= o.betas[1] < 1):
            raise ConfigError(f"optim.betas={o.betas}: both must be in [0, 1)")
        if c.every < 0 or c.keep_last < 0:
            raise ConfigError(f"checkpoint.every={c.every} and checkpoint.keep_last={c.keep_last} must be >= 0")
        if self.metrics.log_every < 1:
            raise ConfigError(f"metrics.log_every={self.metrics.log_every}: must be >= 1")
        if self.model.preset is None and self.model.hf_config is None and self.model.init_from is None:
            raise ConfigError("model: set model.preset, model.hf_config or an HF directory in model.init_from")

    # -------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the resolved config, with environment-derived values written as their ${...} reference."""
        return restore_env_refs(to_dict(self), self.env_refs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def save(self, path: str | Path) -> None:
        """Write the resolved config atomically (a crash never leaves a half-written config.yaml)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)


def load_config(recipe: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Recipe file(s) + CLI overrides -> a validated JobConfig (CLI > file > defaults)."""
    raw: dict = load_yaml(recipe) if recipe is not None else {}
    raw = apply_overrides(raw, list(overrides or []), JobConfig)
    refs: dict[str, str] = {}
    raw = expand_env(raw, refs=refs)
    cfg = from_dict(JobConfig, raw)  # runs every section's checks and JobConfig.validate()
    cfg.env_refs = refs
    return cfg


def config_from_dict(raw: dict) -> JobConfig:
    """A JobConfig from an already-resolved dict (e.g. the config.yaml saved in a checkpoint)."""
    return from_dict(JobConfig, raw)


def replace(cfg: JobConfig, **sections: Any) -> JobConfig:
    return dataclasses.replace(cfg, **sections)
