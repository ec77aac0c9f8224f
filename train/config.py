"""The recipe schema: typed dataclasses, one docstring per field, strict parsing.

    python -m train RECIPE.yaml [dotted.key=value ...]      # CLI > recipe file(s) > these defaults
    python -m train --help-config                           # every key, its type, default and doc

Sections: model, data (the loader's DataConfig), parallel (the engine's ParallelConfig), optim, train,
checkpoint, metrics, eval (held-out evaluation, train/eval.py), lora (model.lora.LoRAConfig), plus run_dir.
Recipes under recipes/ only select and override. The resolved config is written to RUN_DIR/config.yaml and into
every checkpoint (config.yaml next to the DCP files).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config import ConfigError, apply_overrides, expand_env, from_dict, load_yaml, restore_env_refs, to_dict
from data.config import DataConfig, DatasetSpec
from model.family import GROUPS, get_family
from model.lora import LoRAConfig
from parallel import ParallelConfig

STAGE_FROZEN = {1: ("llm",), 2: (), 3: ("vision",)}
"""The Qwen2-VL paper's recipe: stage 1 trains ViT + merger on image-text data with the LLM frozen; stage 2
trains everything; stage 3 freezes the ViT and fine-tunes merger + LLM on ChatML instruction data."""


@dataclass
class ModelSection:
    """Which model: a family and preset or an HF directory's config.json, and which weights to start from."""

    family: str | None = None
    """Model family: 'qwen2_vl' (Qwen2-VL), 'qwen2_5_vl' (Qwen2.5-VL) or 'qwen3_vl' (Qwen3-VL, dense); see
    docs/model.md. null = the family of `hf_config` or `init_from` (from their config.json / meta.json), else
    qwen2_vl. Weights of another family than the one set here are refused."""
    preset: str | None = "tiny"
    """Architecture preset of the family (model.family.get_preset): 'tiny' for every family; Qwen2-VL '2b', '7b',
    '72b'; Qwen2.5-VL '3b', '7b', '32b', '72b'; Qwen3-VL '2b', '4b', '8b', '32b'. null = take the architecture from
    `hf_config` (or from `init_from`'s weights)."""
    hf_config: str | None = None
    """An HF directory (or its config.json) of a supported family whose architecture to use instead of a preset."""
    init_from: str | None = None
    """Weights to start from, model only (fresh optimizer, schedule and data): a checkpoint of ours (a
    `step_*` directory, or a checkpoint dir / run dir whose latest complete step is taken; any parallel layout)
    or an HF directory of a supported family (config.json + safetensors). null = random init (seeded by
    train.seed). Ignored when the run resumes from its own checkpoint."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture overrides as dotted ModelConfig keys, e.g. {text.num_layers: 2, attn_backend: sdpa}."""


@dataclass
class OptimConfig:
    """AdamW with per-group learning rates, warmup + cosine decay, global gradient clipping."""

    lr: float = 1e-4
    """Peak learning rate for every trainable group without its own lr_<group>."""
    lr_vision: float | None = None
    """Peak learning rate of the vision group (the ViT; the family's `group_of`, model/family.py); null = lr."""
    lr_merger: float | None = None
    """Peak learning rate of the merger group (the patch merger, and Qwen3-VL's DeepStack mergers); null = lr."""
    lr_llm: float | None = None
    """Peak learning rate of the LLM (embeddings, decoder layers, final norm, LM head); null = lr."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW). Never applied to norms, biases or 1-d parameters."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the peak learning rate over this many steps. A warm-up longer than train.steps is
    clamped to train.steps (with a warning), so shortening a run takes one key."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup, to min_lr_ratio * peak at train.steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of each group's peak."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (over every parallel group) to this value; 0 = no clipping (the norm is
    still computed and logged)."""
    implementation: Literal["auto", "fused", "foreach", "for"] = "auto"
    """AdamW kernel: 'auto' = fused on CUDA, foreach elsewhere. Only 'fused' skips a non-finite step on the device
    (the others read the skip flag on the host every step: one wait for the device per step)."""


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
    """Write metrics every N steps (the console line and jsonl record). The loss, gradient norm and skip flag of
    the steps in between stay on the device and are read together at the next log (or checkpoint, or stop) step:
    the only steps on which the host waits for the device, so a larger N lets the host queue further ahead."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one device for MFU; null = a table by device name (H100, H200, A100, ...).
    On CPU, MFU is not reported; achieved FLOP/s is."""
    straggler_every: int = 100
    """Every N steps, gather every rank's step time, data wait and compute time (averaged over those N steps),
    log the slowest rank against the median of its peers, and flag a rank over straggler_ratio (a `straggler`
    event in metrics.jsonl, a console warning naming its host and rank; train/straggler.py). 0 = never."""
    straggler_ratio: float = 1.5
    """Flag a rank whose busy time (data wait + compute) per step exceeds this multiple of its peers' median."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """W&B settings."""
    tensorboard: bool = False
    """Also write every step's and every evaluation's scalars (the ones W&B gets) to RUN_DIR/tensorboard with torch's
    SummaryWriter (train/tensorboard.py; needs the tensorboard package); view with
    `tensorboard --logdir RUN_DIR/tensorboard`."""


@dataclass
class EvalSection:
    """Held-out evaluation during a stage (train/eval.py): teacher-forced loss and greedy-generation accuracy."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    """Held-out datasets, in the data.datasets shard format (read with this run's data settings: tokenizer,
    pixel limits, video sampling, system prompt). Each is evaluated and reported on its own (weights are
    ignored). Empty = no evaluation."""
    every: int = 0
    """Evaluate every N optimizer steps; 0 = only at the end of the stage (with at_end)."""
    at_end: bool = True
    """Evaluate after the last step of the stage (also when the training data ran out first)."""
    loss: bool = True
    """Held-out loss: a forward-only pass through the training engine (every parallel layout, pipeline included)
    over the whole dataset once; supervised tokens only, sum / count as in training."""
    generation: bool = True
    """Greedy generation accuracy on the chat samples (kind chat or auto): the last assistant turn is the
    reference, everything before it the prompt; exact match and 'contains' after normalization. Runs with
    pp = 1 only (under pp > 1 it is skipped, and the record says why)."""
    max_new_tokens: int = 32
    """Generation stops after this many new tokens (or at <|im_end|> / <|endoftext|>)."""
    max_samples: int | None = None
    """Generation uses the first N chat samples of each dataset (in shard order); null = all."""
    num_workers: int = 0
    """Loader worker processes of the held-out loss pass; 0 = in the training process."""
    save_predictions: bool = True
    """Write every prediction (key, prompt, reference, prediction, exact, contains) to
    RUN_DIR/eval/step_<N>/<dataset>.dp<r>.jsonl."""

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every={self.every}: must be >= 0 (0 = only at the end of the stage)")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"eval.max_samples={self.max_samples}: must be >= 1 or null (all samples)")
        if self.num_workers < 0:
            raise ValueError(f"eval.num_workers={self.num_workers}: must be >= 0")
        if self.datasets and not (self.loss or self.generation):
            raise ValueError("eval.datasets are set but eval.loss and eval.generation are both false: enable one "
                             "or remove the datasets")
        names = [d.label for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval dataset names must be unique, got {names}: set eval.datasets[i].name")
        for i, d in enumerate(self.datasets):
            if not d.path:
                raise ValueError(f"eval.datasets[{i}] has no path")


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
    eval: EvalSection = field(default_factory=EvalSection)
    """Held-out evaluation (loss and generation accuracy) every N steps and at the end of the stage."""
    lora: LoRAConfig | None = None
    """LoRA adapters (model/lora.py): base weights frozen, only the adapters (and lora.fully_trainable groups) train
    and get optimizer state; null = full training of the unfrozen groups."""
    env_refs: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    # {dotted key: '${VAR}...'} of every value expanded from a credential-like environment variable: the saved
    # config.yaml writes the reference back, so a secret never lands in a run directory or a checkpoint.
    notes: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    # What validate() adjusted (a warm-up clamped to train.steps): python -m train logs each line as a warning.

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

    def microbatches_per_rank(self, dp: int) -> int:
        """Per-dp-rank microbatches per step from train.global_microbatches (or parallel.num_microbatches)."""
        g = self.train.global_microbatches
        if g is None:
            return self.parallel.num_microbatches
        if g % dp:
            raise ConfigError(
                f"train.global_microbatches={g} is not divisible by dp={dp}: choose a multiple of {dp} (the global "
                "batch is split evenly over data-parallel ranks)"
            )
        return g // dp

    def validate(self) -> None:
        """Cross-field checks that need more than one section; raise ConfigError naming values and fix."""
        t, o, c = self.train, self.optim, self.checkpoint
        if self.model.family is not None:
            try:
                get_family(self.model.family)
            except ValueError as e:
                raise ConfigError(f"model.family: {e}") from None
        for g in self.frozen_groups:
            if g not in GROUPS:
                raise ConfigError(f"train.freeze: unknown group {g!r}; groups are {', '.join(GROUPS)}")
        if set(self.frozen_groups) == set(GROUPS):
            raise ConfigError("train.freeze freezes every group (vision, merger, llm): nothing would train")
        if self.lora is not None:
            try:
                self.lora.check_frozen(self.frozen_groups)
            except ValueError as e:
                raise ConfigError(str(e)) from e
        if t.steps < 1:
            raise ConfigError(f"train.steps={t.steps}: must be >= 1")
        if t.global_microbatches is not None and t.global_microbatches < 1:
            raise ConfigError(f"train.global_microbatches={t.global_microbatches}: must be >= 1")
        if t.max_skipped_steps < 0 or t.max_consecutive_skips < 1:
            raise ConfigError("train.max_skipped_steps must be >= 0 and train.max_consecutive_skips >= 1")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
        if o.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")
        if o.warmup_steps > t.steps:  # a run shortened with train.steps alone keeps a warm-up of its full length
            self.notes.append(f"optim.warmup_steps={o.warmup_steps} is longer than train.steps={t.steps}: the "
                              f"warm-up is clamped to {t.steps} steps")
            o.warmup_steps = t.steps
        if o.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")
        if o.lr < 0:
            raise ConfigError(f"optim.lr={o.lr}: must be >= 0")
        for g in GROUPS:
            own = getattr(o, f"lr_{g}")
            if own is not None and own < 0:
                raise ConfigError(f"optim.lr_{g}={own}: must be >= 0 (or null for optim.lr)")
        if o.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
        if not o.eps > 0:
            raise ConfigError(f"optim.eps={o.eps}: must be > 0 (AdamW divides by sqrt(v) + eps)")
        if not (0 <= o.betas[0] < 1 and 0 <= o.betas[1] < 1):
            raise ConfigError(f"optim.betas={o.betas}: both must be in [0, 1)")
        if c.every < 0 or c.keep_last < 0:
            raise ConfigError(f"checkpoint.every={c.every} and checkpoint.keep_last={c.keep_last} must be >= 0")
        if self.metrics.log_every < 1:
            raise ConfigError(f"metrics.log_every={self.metrics.log_every}: must be >= 1")
        if self.metrics.straggler_every < 0 or not self.metrics.straggler_ratio > 1.0:
            raise ConfigError(f"metrics.straggler_every={self.metrics.straggler_every} must be >= 0 (0 = off) and "
                              f"metrics.straggler_ratio={self.metrics.straggler_ratio} > 1")
        if self.model.preset is None and self.model.hf_config is None and self.model.init_from is None:
            raise ConfigError("model: set model.preset, model.hf_config or an HF directory in model.init_from")

    # -------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the resolved config; values from credential-like variables as their ${...} reference."""
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
