"""Typed, strict configuration of the data loader (recipe section `data`).

Every field has a docstring under it (read by the recipe machinery for `--help-config`). `DataConfig.from_dict`
rejects unknown keys and wrong types with an error naming the key and the fix; `DataConfig.validate()` checks the
values that only make sense together (called by `build_loader`).

Example recipe section:

    data:
      tokenizer: /models/Qwen2-VL-7B-Instruct        # a local Hugging Face tokenizer directory
      datasets:
        - {path: s3://bucket/llava-665k, weight: 3.0}           # chat shards (+ sidecar indexes)
        - {path: /data/coyo-captions, kind: pretrain, weight: 1.0}
        - {path: /data/wiki_text_document, kind: indexed}      # megatron .bin/.idx prefix
      max_tokens: 8192
      num_workers: 4
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from core.config import from_dict
from data.media.video import DEFAULT_MAX_TOKENS as DEFAULT_VIDEO_TOKENS
from data.media.video import VideoConfig
from data.media.vision import vision_or_default
from data.storage import StorageConfig
from model.processing import VisionProcessing

DatasetKind = Literal["auto", "chat", "pretrain", "indexed"]
Supervise = Literal["auto", "assistant", "all"]
DATASET_KINDS = typing.get_args(DatasetKind)
SUPERVISE = typing.get_args(Supervise)
AUTO_SYSTEM = "auto"
"""`default_system: auto`: the system prompt the family's chat template inserts (model.processing)."""


@dataclass
class DatasetSpec:
    """One dataset of the mix."""

    path: str = ""
    """Where the dataset lives: a local directory, or an s3:// / oss:// prefix, holding WebDataset `.tar` shards
    with their sidecar indexes (made by `python -m data.shards make` or `... index`); or, for kind `indexed`, the
    prefix of a megatron-core mmap indexed dataset (`PREFIX.bin` + `PREFIX.idx`)."""
    weight: float = 1.0
    """Relative sampling weight in the mix (normalized over the datasets that still have samples)."""
    kind: DatasetKind = "auto"
    """`chat` (samples with `messages`), `pretrain` (samples with `content`, no roles), `indexed` (pre-tokenized
    megatron .bin/.idx text), or `auto`: per sample, `messages` -> chat, `content` -> pretrain; a prefix with a
    `.idx` file -> indexed."""
    name: str | None = None
    """Short name used in sample keys (`<name>/<shard>/<key>`), logs and metrics; default: the path's basename."""
    supervise: Supervise | None = None
    """Per-dataset override of `DataConfig.supervise` (None: use the loader-wide value)."""
    append_eod: bool = False
    """Indexed datasets only: append `<|endoftext|>` to every sequence (set it when the corpus was built without
    `--append-eod`)."""

    def __post_init__(self) -> None:
        if self.kind not in DATASET_KINDS:
            raise ValueError(f"dataset kind must be one of {DATASET_KINDS}, got {self.kind!r}")
        if self.supervise is not None and self.supervise not in SUPERVISE:
            raise ValueError(f"dataset supervise must be one of {SUPERVISE} or null, got {self.supervise!r}")
        if not (self.weight > 0):
            raise ValueError(f"dataset weight must be > 0, got {self.weight} for {self.path!r}")

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.path.rstrip("/")) or self.path


@dataclass
class DataConfig:
    """The loader: what to read, how to render it, how to pack it, how to stream it."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    """The datasets of the mix (at least one)."""
    tokenizer: str = ""
    """A local Hugging Face tokenizer directory (with tokenizer.json), e.g. a Qwen2-VL checkpoint directory."""
    max_tokens: int = 8192
    """LLM token budget per microbatch: samples are packed back to back up to this many tokens."""
    max_patches: int | None = None
    """ViT patch-row budget per microbatch (images + videos), so a few high-resolution images cannot blow up the
    ViT's memory. None = 4 * max_tokens (a microbatch made only of vision tokens then fits)."""
    max_video_sample_tokens: int | None = None
    """Token budget of a sample that holds a video: a video sample longer than max_tokens (up to this many tokens)
    travels alone in a microbatch of its own, so long videos (video.max_tokens merged tokens each, plus their
    text) train without raising max_tokens for every microbatch. None = max_tokens. The longest microbatch, which
    activation memory must hold, has max(max_tokens, max_video_sample_tokens) tokens."""
    max_video_sample_patches: int | None = None
    """ViT patch-row budget of a sample that holds a video (a video of N merged tokens has 4 * N rows); like
    max_video_sample_tokens, a sample over max_patches travels alone. None = max_patches."""
    min_pixels: int | None = None
    """Images: smallest resized area in pixels (smart_resize). None = the family's default as qwen-vl-utils, 4 merged
    tokens: 4 x factor^2, factor = patch x merge (28 for Qwen2-VL / Qwen2.5-VL: 3136 pixels; 32 for Qwen3-VL:
    4096). At least factor^2."""
    max_pixels: int | None = None
    """Images: largest resized area in pixels (smart_resize). None = the family's default as qwen-vl-utils, 16384
    merged tokens: 16384 x factor^2 (12845056 pixels at factor 28, 16777216 at 32; the Qwen2-VL paper's ablation
    used 100*28*28 / 16384*28*28)."""
    supervise: Supervise = "auto"
    """Which tokens are trained on. `auto`: assistant turns (with their <|im_end|>) for chat samples, all text for
    pretraining samples; `assistant`: assistant turns only (pretraining samples then supervise all text);
    `all`: every text token of every sample. Vision tokens (<|vision_start|>, pads, <|vision_end|>) never."""
    overlong: Literal["skip", "truncate"] = "skip"
    """A sample longer than max_tokens: `skip` it (counted), or `truncate` it when it has no vision input
    (samples with images/videos are always skipped: cutting a vision block would break it)."""
    default_system: str | None = AUTO_SYSTEM
    """System prompt inserted when a chat's first message is not a system message. `auto`: the family's chat
    template's (Qwen2-VL and Qwen2.5-VL insert "You are a helpful assistant.", Qwen3-VL nothing); any other string
    is inserted as is; null inserts nothing."""
    pretrain_eos: bool = True
    """Append <|endoftext|> (supervised) to every pretraining sample, so the model learns where documents end."""
    shuffle_buffer: int = 1000
    """Per dataset and worker: samples held (as compressed bytes) for the seeded shuffle; 0 = no shuffle."""
    shuffle_buffer_bytes: int = 64 * 1024 * 1024
    """Per dataset and worker: cap on the bytes held by the shuffle buffer (bounds RAM with large media)."""
    pack_buffer: int = 256
    """Per worker: processed samples held for best-fit packing (larger = fuller microbatches, more RAM)."""
    pack_buffer_patches: int | None = None
    """Per worker: cap on the ViT patch rows held in the packing buffer (bounds RAM: an image row is held as
    3 x p x p uint8 bytes, a video row as 3 x 2 x p x p, p the family's patch size: 588 / 1176 bytes at 14, 768 /
    1536 at 16). None = 4 * max_patches."""
    seed: int = 0
    """Seed of the shard order, the shuffle and the dataset mix (the loader uses no global RNG)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 = in the training process. Exact resume needs the same value."""
    prefetch_factor: int = 2
    """Microbatches each worker prepares ahead."""
    epochs: int | None = None
    """Passes over each dataset; None = repeat forever (each epoch reshuffled). A dataset that finishes its
    epochs leaves the mix; iteration ends when all have finished."""
    read_chunk_bytes: int = 16 * 1024 * 1024
    """Sequential shard reads fetch up to this many bytes of consecutive samples per request."""
    worker_timeout_s: float = 600.0
    """A worker that produces no usable sample for this long (everything it reads is skipped, or it is stuck)
    stops the run with an error naming the dataset and the skip counts by reason, instead of hanging the job."""
    stall_report_s: float = 30.0
    """A worker that has produced no microbatch for this long reports which datasets and skip reasons keep it busy
    (logged by the training process), and again every as long."""
    max_bad_shard_fraction: float = 0.1
    """Unreadable shards (a truncated tar, a missing or stale sidecar index) are skipped, counted
    (skipped/bad_shard, per sample) and logged once with the fix; when more than this fraction of a dataset's
    shards is found unreadable, the run stops with an error. 0 = stop at the first unreadable shard."""
    max_error_fraction: float = 0.01
    """A sample whose processing raises an error no check anticipated (a bug, or data nothing validates) is skipped
    and counted (skipped/error), logged with its dataset and key (the traceback at debug level), so one sample can
    never stop a run; when more than this fraction of the samples a loader worker has read (judged once it has
    read data.pipeline.ERROR_MIN_SAMPLES) failed so, the run stops with an error naming the datasets and an example.
    1 = never stop."""
    start_method: Literal["fork", "spawn", "forkserver"] | None = None
    """multiprocessing start method of the workers; None = the platform default."""
    log_skips: int = 20
    """Per worker and reason: log the first N skipped samples (shard and key), then every 1000th."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-store settings for s3:// and oss:// paths (credentials come from the environment only)."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Video sampling, resizing, decode timeout and cache (data/media/video.py)."""

    def __post_init__(self) -> None:
        # Accept plain dicts for nested sections (e.g. DataConfig(datasets=[{"path": ...}])), strictly.
        self.datasets = [from_dict(DatasetSpec, d, f"data.datasets[{i}]") if isinstance(d, dict) else d
                         for i, d in enumerate(self.datasets)]
        if isinstance(self.storage, dict):
            self.storage = from_dict(StorageConfig, self.storage, "data.storage")
        if isinstance(self.video, dict):
            self.video = from_dict(VideoConfig, self.video, "data.video")
        if self.supervise not in SUPERVISE:
            raise ValueError(f"data.supervise must be one of {SUPERVISE}, got {self.supervise!r}")
        if self.overlong not in ("skip", "truncate"):
            raise ValueError(f"data.overlong must be 'skip' or 'truncate', got {self.overlong!r}")

    @property
    def patch_budget(self) -> int:
        return self.max_patches if self.max_patches is not None else 4 * self.max_tokens

    @property
    def pack_patch_cap(self) -> int:
        return self.pack_buffer_patches if self.pack_buffer_patches is not None else 4 * self.patch_budget

    @property
    def video_sample_tokens(self) -> int:
        """Token budget of a sample holding a video (a longer one than max_tokens travels alone)."""
        return max(self.max_tokens, self.max_video_sample_tokens or 0)

    @property
    def video_sample_patches(self) -> int:
        """Patch-row budget of a sample holding a video."""
        return max(self.patch_budget, self.max_video_sample_patches or 0)

    def image_pixels(self, vision: VisionProcessing | None = None) -> tuple[int, int]:
        """(min_pixels, max_pixels) of images in force for the family (`vision` None: Qwen2-VL's): the configured
        values, or 4 and 16384 merged tokens of factor x factor pixels."""
        v = vision_or_default(vision)
        lo = v.min_pixels if self.min_pixels is None else self.min_pixels
        hi = v.max_pixels if self.max_pixels is None else self.max_pixels
        return lo, hi

    def system_prompt(self, vision: VisionProcessing | None = None) -> str | None:
        """The default system prompt in force: `auto` -> the family's chat template's (None for Qwen3-VL)."""
        if self.default_system == AUTO_SYSTEM:
            return vision_or_default(vision).default_system
        return self.default_system

    def resolved_video(self, vision: VisionProcessing | None = None) -> VideoConfig:
        """The video config the loader uses for the family (`vision` None: Qwen2-VL's): video.min_pixels /
        max_pixels null become the family's 128 / 768 merged tokens per frame, and video.max_tokens = 0
        (automatic) becomes 16384 or less, so that one video plus text fits a video sample's budgets (at most a
        quarter of the patch rows' worth of tokens, and three quarters of the tokens: the rest is the text's)."""
        lo, hi = self.video.frame_pixels(vision)
        v = dataclasses.replace(self.video, min_pixels=lo, max_pixels=hi)
        if v.max_tokens:
            return v
        m = vision_or_default(vision).merge_size ** 2
        fit = min(DEFAULT_VIDEO_TOKENS, self.video_sample_patches // m, self.video_sample_tokens * 3 // 4)
        # Below one frame pair no video fits at all: keep the smallest valid cap, and every video sample is then
        # a counted skip whose message names the budget to raise (data.sample).
        return dataclasses.replace(v, max_tokens=max(fit, v.floor_tokens(vision)))

    def validate(self, vision: VisionProcessing | None = None) -> None:
        """Raise ValueError naming the first bad value and the fix. Without `vision` (parsing: the family is not
        known yet) the family-dependent checks (pixel bounds against the resize factor) are left out; build_loader
        runs them with the family's facts."""
        if not self.datasets:
            raise ValueError("data.datasets is empty: list at least one dataset (path: DIR or s3://... prefix)")
        for d in self.datasets:
            if not d.path:
                raise ValueError("a dataset has no path: set data.datasets[i].path")
        names = [d.label for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}: set data.datasets[i].name")
        if not self.tokenizer:
            raise ValueError("data.tokenizer is not set: give a local Hugging Face tokenizer directory")
        checks = [
            (self.max_tokens >= 16, f"max_tokens must be >= 16, got {self.max_tokens}"),
            (self.patch_budget >= 4, f"max_patches must be >= 4, got {self.patch_budget}"),
            (self.min_pixels is None or self.min_pixels >= 1, f"min_pixels must be >= 1, got {self.min_pixels}"),
            (self.max_pixels is None or self.max_pixels >= 1, f"max_pixels must be >= 1, got {self.max_pixels}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}"),
            (self.shuffle_buffer_bytes >= 0, f"shuffle_buffer_bytes must be >= 0, got {self.shuffle_buffer_bytes}"),
            (self.pack_buffer >= 1, f"pack_buffer must be >= 1, got {self.pack_buffer}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.prefetch_factor >= 1, f"prefetch_factor must be >= 1, got {self.prefetch_factor}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1 or null, got {self.epochs}"),
            (self.read_chunk_bytes >= 4096, f"read_chunk_bytes must be >= 4096, got {self.read_chunk_bytes}"),
            (self.worker_timeout_s > 0, f"worker_timeout_s must be > 0, got {self.worker_timeout_s}"),
            (self.stall_report_s > 0, f"stall_report_s must be > 0, got {self.stall_report_s}"),
            (0 <= self.max_bad_shard_fraction <= 1,
             f"max_bad_shard_fraction must be in [0, 1], got {self.max_bad_shard_fraction}"),
            (0 <= self.max_error_fraction <= 1,
             f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}"),
            (self.max_video_sample_tokens is None or self.max_video_sample_tokens >= self.max_tokens,
             f"max_video_sample_tokens ({self.max_video_sample_tokens}) < max_tokens ({self.max_tokens}): raise it "
             "or leave it null (= max_tokens)"),
            (self.max_video_sample_patches is None or self.max_video_sample_patches >= self.patch_budget,
             f"max_video_sample_patches ({self.max_video_sample_patches}) < max_patches ({self.patch_budget}): "
             "raise it or leave it null (= max_patches)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if vision is not None:
            self._check_family(vision)
        self._check_video_fits()

    def _check_family(self, vision: VisionProcessing) -> None:
        """The pixel bounds against the family's resize factor (a smaller image has no patch to give)."""
        f = vision.factor
        lo, hi = self.image_pixels(vision)
        if lo < f * f:
            raise ValueError(f"data.min_pixels={lo} is below one {f}x{f} merge window ({vision.family}'s patch "
                             f"{vision.patch_size} x merge {vision.merge_size}): set it >= {f * f} or null (the "
                             f"family's default, {vision.min_pixels})")
        if hi < lo:
            raise ValueError(f"data.max_pixels ({hi}) < data.min_pixels ({lo}) for {vision.family} (null = the "
                             f"family's defaults {vision.min_pixels} and {vision.max_pixels})")
        try:
            self.video.check(vision)
        except ValueError as e:
            raise ValueError(f"data.{e} ({vision.family})") from None

    def _check_video_fits(self) -> None:
        """An explicit video.max_tokens must fit a video sample's budgets: otherwise every video that reaches the
        cap (any long video) would be decoded and then skipped, epoch after epoch."""
        cap = self.video.max_tokens
        if not cap:
            return
        need_t, need_p = cap + 2, 4 * cap  # + <|vision_start|>, <|vision_end|>; 4 patch rows per merged token
        t_key = "data.max_video_sample_tokens" if self.max_video_sample_tokens else "data.max_tokens"
        p_key = "data.max_video_sample_patches" if self.max_video_sample_patches else "data.max_patches"
        short = []
        if need_t > self.video_sample_tokens:
            short.append(f"{need_t} LLM tokens > {t_key}={self.video_sample_tokens}")
        if need_p > self.video_sample_patches:
            short.append(f"{need_p} ViT patch rows > {p_key}={self.video_sample_patches}")
        if short:
            fit = min(self.video_sample_tokens - 2, self.video_sample_patches // 4)
            raise ValueError(
                f"data.video.max_tokens={cap} cannot fit in a microbatch: such a video needs {' and '.join(short)}. "
                f"Raise data.max_video_sample_tokens to >= {need_t} plus room for the text (e.g. {need_t + 4094}) "
                f"and data.max_video_sample_patches to >= {need_p} (a video sample then travels alone in a microbatch "
                f"that large), or lower data.video.max_tokens to <= {fit} (0 = the largest that fits)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Strict construction from a plain dict (YAML, core.config): unknown keys and wrong types raise
        core.config.ConfigError (a ValueError) naming the key; then validate() runs."""
        return from_dict(cls, d, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
