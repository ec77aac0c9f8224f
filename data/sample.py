"""One raw sample (JSON + media bytes, or pre-tokenized text) -> one processed sample ready for packing.

Shape legend: L = tokens of the sample, P = 3 * 2 * p * p pixel-row length (p: the family's patch size),
N = patch rows.

A processed sample keeps its images as resized uint8 (H, W, 3) arrays (patchified into raw uint8 rows when the
microbatch is assembled, data.media.vision.image_rows_raw) and its videos as the raw uint8 rows that
data.media.video_cache.load_video returns;
rescale + normalization happen on the device, in the model (model.vision.normalize_pixel_rows).
How a sample becomes tokens, pixels and position ids is the model family's (its processor facts,
model.processing.VisionProcessing: resize factor, pixel bounds, chat template's default system prompt, how a
video's time is encoded). Everything here is a pure function of the raw bytes, the config and those facts, which is
what lets the loader rebuild its buffers from sample references on resume.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from core.batch import IGNORE_INDEX
from data.chatml import ParsedSample, SkipSample, VisionInfo, frame_time_text, parse_sample, render, tokenize
from data.config import DataConfig
from data.media.image import ImageDecodeError, load_image
from data.media.video import SamplingPlan, VideoClip, VideoDecodeError, probe_plan
from data.media.video_cache import load_video
from data.media.vision import AspectRatioError, vision_or_default
from data.storage import StorageConfig, get_storage
from data.tokenizer import Tokenizer
from model.processing import VisionProcessing


@dataclass
class RawSample:
    """What a source yields: a WebDataset sample (json + media members) or a pre-tokenized sequence."""

    key: str
    """'<dataset>/<shard>/<key>' (the id that appears in PackedBatch.sample_keys and in skip logs)."""
    members: dict[str, bytes] | None = None
    """Tar members of the sample by their name after '<key>.' (e.g. 'json', 'img0.jpg')."""
    tokens: np.ndarray | None = None
    """Indexed datasets: the token ids."""
    root: str = ""
    """The dataset's path, against which relative media paths resolve."""
    nbytes: int = 0


@dataclass
class Processed:
    """A sample ready to pack: tokens, labels (shifted), positions and its vision inputs."""

    key: str
    input_ids: torch.Tensor  # (L,) int64
    labels: torch.Tensor  # (L,) int64, shifted within the sample; last = -100
    position_ids: torch.Tensor  # (3, L) int64, from 0
    images: list[np.ndarray] = field(default_factory=list)  # uint8 (H, W, 3) each
    image_grids: list[tuple[int, int, int]] = field(default_factory=list)
    video_rows: list[torch.Tensor] = field(default_factory=list)  # (N, P) uint8 raw rows each
    video_grids: list[tuple[int, int, int]] = field(default_factory=list)
    truncated: bool = False
    clamped_boxes: int = 0
    """Boxes clamped to their image by more than data.chatml.BOX_TOLERANCE (counted by the loader)."""
    vision: VisionProcessing | None = None
    """The family's processor facts it was made with (None: Qwen2-VL's): raw image rows are 3 * p * p wide, video
    rows 3 * T * p * p (data.packing.assemble)."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.image_grids) + sum(t * h * w for t, h, w in self.video_grids)

    @property
    def num_supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())



def position_ids(vision: VisionProcessing, ids: torch.Tensor, image_grids: list[tuple[int, int, int]],
                 video_grids: list[tuple[int, int, int]], seconds_per_pair: list[float]) -> torch.Tensor:
    """(3, L) M-RoPE ids of one sample by the family's rule (its processing's position_ids: Qwen2.5-VL's videos
    in seconds, Qwen3-VL's one block per frame pair)."""
    return vision.position_ids(ids, torch.tensor(image_grids) if image_grids else None,
                               torch.tensor(video_grids) if video_grids else None,
                               video_seconds_per_pair=seconds_per_pair or None)


def shift_labels(ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1] when token t+1 is a target, else -100; the last position is -100."""
    labels = np.full(ids.shape[0], IGNORE_INDEX, dtype=np.int64)
    if ids.shape[0] > 1:
        labels[:-1] = np.where(targets[1:], ids[1:], IGNORE_INDEX)
    return labels


def media_bytes(raw: RawSample, ref: str, storage: StorageConfig) -> tuple[bytes, str]:
    """Bytes of a media reference of a sample (a member of the sample, a URL, or a path relative to the
    dataset's root), plus the identity string the video cache keys it by. Raises SkipSample."""
    m = raw.members or {}
    if ref in m:
        return m[ref], f"{raw.key}.{ref}"
    short_key = raw.key.rsplit("/", 1)[-1]
    if ref.startswith(short_key + ".") and ref[len(short_key) + 1 :] in m:
        return m[ref[len(short_key) + 1 :]], f"{raw.key}.{ref}"
    if "://" in ref or os.path.isabs(ref):
        url = ref
    else:
        url = f"{raw.root.rstrip('/')}/{ref}" if raw.root else ref
    try:
        st = get_storage(url, storage)
        if "://" not in url and not st.exists(url):
            raise FileNotFoundError(url)
        return st.read(url), url
    except (FileNotFoundError, KeyError) as e:
        raise SkipSample("missing_media", f"{ref!r} is neither a member of the sample nor a readable file") from e
    except Exception as e:  # noqa: BLE001 - one unreadable media URL skips its sample, not the job
        raise SkipSample("media_read_error", f"cannot read {url!r}: {type(e).__name__}: {e}") from e


# Skip reasons of a video sample that are a pure function of its bytes and the config: remembered, so the next
# epoch skips the sample without opening its videos again (a timeout or an unreadable URL may pass next time).
_TRANSIENT = ("video_timeout", "missing_media", "media_read_error")
_REMEMBER_MAX = 100_000  # sample keys remembered per worker (a key and a short message each: ~30 MB at most)


class SampleProcessor:
    """Turns RawSamples into Processed samples under one DataConfig and one model family's processor facts
    (`vision`: model.processing.VisionProcessing, `get_family(mcfg.family).processing(mcfg)`; None = Qwen2-VL's),
    one instance per worker."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None = None,
                 vision: VisionProcessing | None = None) -> None:
        self.cfg = cfg
        self.vision = vision_or_default(vision)
        self.tok = tokenizer or Tokenizer.load(cfg.tokenizer)
        self.vcfg = cfg.resolved_video(self.vision)  # family's frame bounds; max_tokens 0 -> what the budgets hold
        self.min_pixels, self.max_pixels = cfg.image_pixels(self.vision)
        self.system = cfg.system_prompt(self.vision)
        self._ts_tokens: int | None = None
        self._remembered: OrderedDict[str, tuple[str, str]] = OrderedDict()  # key -> (reason, detail)

    @property
    def _rows_per_token(self) -> int:
        return self.vision.merge_size ** 2

    def _video_error(self, e: Exception) -> SkipSample:
        if isinstance(e, VideoDecodeError):
            return SkipSample(f"video_{getattr(e, 'reason', 'decode_failed')}", str(e))
        return SkipSample("video_aspect_ratio", str(e))

    def _load_video(self, data: bytes, identity: str) -> VideoClip:
        try:
            return load_video(data, self.vcfg, identity=identity, vision=self.vision)
        except (VideoDecodeError, AspectRatioError) as e:
            raise self._video_error(e) from e

    def _video_info(self, grid: tuple[int, int, int], indices: list[int], video_fps: float) -> VisionInfo:
        """A video's rendering: its merged tokens, and per frame pair its time when the family writes it as text."""
        t, h, w = grid
        times = None
        if self.vision.video_time == "timestamps":
            if not video_fps > 0:
                raise SkipSample("video_decode_failed", "the video's frame rate is unknown: its frame timestamps "
                                                        "cannot be written")
            times = self.vision.frame_pair_timestamps(indices, video_fps)
        return VisionInfo("video", t * h * w // self._rows_per_token, None, times)

    # ------------------------------------------------------------------ processing
    def process(self, raw: RawSample, kind: str = "auto", supervise: str | None = None,
                append_eod: bool = False) -> Processed:
        """Raises SkipSample (reason + detail) for anything unusable."""
        if raw.tokens is not None:
            return self._process_tokens(raw, append_eod)
        known = self._remembered.get(raw.key)
        if known is not None:
            raise SkipSample(known[0], f"{known[1]} (remembered: not opened again)")
        members = raw.members or {}
        if "json" not in members:
            raise SkipSample("missing_json", f"no .json member (members: {sorted(members)})")
        try:
            obj = json.loads(members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SkipSample("malformed_json", str(e)) from e
        parsed = parse_sample(obj, kind)
        if not any(t == "video" for t, _ in parsed.media):
            return self._process_parsed(raw, parsed, supervise)
        try:
            return self._process_parsed(raw, parsed, supervise)
        except SkipSample as e:
            if e.reason not in _TRANSIENT:  # the reason and text only: the exception would hold the video's bytes
                self._remembered[raw.key] = (e.reason, e.detail)
                if len(self._remembered) > _REMEMBER_MAX:
                    self._remembered.popitem(last=False)
            raise

    def _process_parsed(self, raw: RawSample, parsed: ParsedSample, supervise: str | None) -> Processed:
        cfg = self.cfg
        has_video = any(t == "video" for t, _ in parsed.media)
        # A sample holding a video may use the larger budgets of its own (it then travels alone).
        max_tok = cfg.video_sample_tokens if has_video else cfg.max_tokens
        max_pat = cfg.video_sample_patches if has_video else cfg.patch_budget
        mode = supervise or cfg.supervise
        vision: list[VisionInfo | None] = []
        images, image_grids = [], []
        videos: list[tuple[int, bytes, str]] = []  # (index in vision, bytes, identity), decoded after the check
        patches = 0
        for mtype, ref in parsed.media:
            data, identity = media_bytes(raw, ref, cfg.storage)
            if mtype == "image":
                try:
                    img = load_image(data, self.min_pixels, self.max_pixels, name=ref, vision=self.vision)
                except AspectRatioError as e:
                    raise SkipSample("aspect_ratio", str(e)) from e
                except ImageDecodeError as e:
                    raise SkipSample("bad_image", str(e)) from e
                images.append(img.pixels_HWC)
                image_grids.append(img.grid_thw)
                vision.append(VisionInfo("image", img.num_tokens, img.orig_size))
                patches += img.num_patches
                if patches > max_pat:
                    raise SkipSample("too_many_patches", f"{patches} ViT patches > max_patches {max_pat}")
            else:
                videos.append((len(vision), data, identity))
                vision.append(None)
        video_rows, video_grids, seconds = [], [], []
        if videos:
            self._check_videos_fit(parsed, vision, videos, patches, max_tok, max_pat, mode)
            for k, data, identity in videos:
                clip = self._load_video(data, identity)
                grid = tuple(int(x) for x in clip.grid_thw)
                video_rows.append(clip.rows_u8)
                video_grids.append(grid)
                seconds.append(clip.seconds_per_pair)
                vision[k] = self._video_info(grid, clip.frame_indices, clip.video_fps)  # type: ignore[arg-type]
                patches += grid[0] * grid[1] * grid[2]
            if patches > max_pat:
                raise SkipSample("too_many_patches", f"{patches} ViT patches > max_patches {max_pat}")
        counts: dict[str, int] = {}
        pieces = render(parsed, vision, self.tok.special, mode, self.system, cfg.pretrain_eos,  # type: ignore[arg-type]
                        counts)
        ids, targets = tokenize(pieces, vision, self.tok)  # type: ignore[arg-type]
        truncated = False
        if ids.shape[0] > max_tok:
            if cfg.overlong == "truncate" and not vision:
                ids, targets, truncated = ids[:max_tok], targets[:max_tok], True
            else:
                raise SkipSample("overlong", f"{ids.shape[0]} tokens > max_tokens {max_tok}{self._hint(video_grids)}")
        labels = shift_labels(ids, targets)
        if not (labels != IGNORE_INDEX).any():
            raise SkipSample("no_supervised_tokens", f"nothing to train on under supervise={mode!r}")
        ids_t = torch.from_numpy(ids)
        pos = position_ids(self.vision, ids_t, image_grids, video_grids, seconds)
        return Processed(raw.key, ids_t, torch.from_numpy(labels), pos, images, image_grids, video_rows,
                         video_grids, truncated, counts.get("clamped_boxes", 0), self.vision)

    def _hint(self, video_grids: list[tuple[int, int, int]]) -> str:
        if not video_grids:
            return ""
        n = sum(t * h * w // self._rows_per_token for t, h, w in video_grids)
        return (f" (videos: {n} tokens; data.video.max_tokens={self.vcfg.max_tokens} caps a video's tokens, "
                "data.max_video_sample_tokens is the budget of a video sample)")

    def _check_videos_fit(self, parsed: ParsedSample, vision: list[VisionInfo | None],
                          videos: list[tuple[int, bytes, str]], patches: int, max_tok: int, max_pat: int,
                          mode: str) -> None:
        """Skip a sample whose videos cannot fit its budgets BEFORE decoding them (a long video costs seconds).

        Bound first: a video has at most video.max_tokens merged tokens (merge^2 patch rows each), plus, where the
        family writes frame times as text, a bounded timestamp per frame pair; when the sample fits even so,
        nothing is opened here. Otherwise each video's exact sampling plan comes from its container (demuxed, not
        decoded: data.media.video.probe_plan) and the sample is skipped when it does not fit. The text's length
        counts: it is tokenized with empty video blocks (their tokens are added from the grids), or, with
        timestamps, rendered with the planned frames.
        """
        cap, m2 = self.vcfg.max_tokens, self._rows_per_token
        empty = [v if v is not None else VisionInfo("video", 0, None) for v in vision]
        base = self._length(parsed, empty, mode)  # text + images + 2 per video
        per_video = cap + self._timestamps_bound(cap)
        if base + per_video * len(videos) <= max_tok and patches + m2 * cap * len(videos) <= max_pat:
            return
        plans: dict[int, SamplingPlan] = {}
        for k, data, _ in videos:
            try:
                plans[k] = probe_plan(data, self.vcfg, self.vision)
            except (VideoDecodeError, AspectRatioError) as e:
                raise self._video_error(e) from e
        n_rows = sum(t * h * w for t, h, w in (p.grid_thw for p in plans.values()))
        if patches + n_rows > max_pat:
            raise SkipSample("too_many_patches", f"{patches + n_rows} ViT patches > max_patches {max_pat} (the "
                                                 "videos' grids from their metadata; not decoded)")
        if self.vision.video_time == "timestamps":
            planned = [v if v is not None else self._video_info(plans[k].grid_thw, plans[k].indices,
                                                                  plans[k].video_fps) for k, v in enumerate(vision)]
            length = self._length(parsed, planned, mode)
        else:
            length = base + n_rows // m2
        if length > max_tok:
            raise SkipSample("overlong", f"{length} tokens > max_tokens {max_tok} (the videos' grids from "
                                         f"their metadata; not decoded){self._hint([(1, 1, n_rows)])}")

    def _length(self, parsed: ParsedSample, vision: list[VisionInfo], mode: str) -> int:
        pieces = render(parsed, vision, self.tok.special, mode, self.system, self.cfg.pretrain_eos)
        return int(tokenize(pieces, vision, self.tok)[0].shape[0])

    def _timestamps_bound(self, cap: int) -> int:
        """Tokens a video's frame timestamps add at most (0 when the family writes none): per frame pair its
        timestamp and a block's <|vision_start|> and <|vision_end|>, for at most as many pairs as the cap holds at
        the smallest frame (the per-frame floor) or the frame count allows. The timestamp of a 27-hour video is
        counted for every pair; longer videos are still caught after decoding (the sample's exact length)."""
        if self.vision.video_time != "timestamps":
            return 0
        if self._ts_tokens is None:
            self._ts_tokens = len(self.tok.encode(frame_time_text(99999.9)))
        f2 = self.vision.factor ** 2
        smallest = max(1, self.vcfg.min_pixels // f2)  # type: ignore[operator]
        pairs = min(-(-self.vcfg.max_frames // self.vision.temporal_patch_size), max(1, cap // smallest))
        return pairs * (self._ts_tokens + 2)

    def _process_tokens(self, raw: RawSample, append_eod: bool) -> Processed:
        ids = np.asarray(raw.tokens, dtype=np.int64)
        if append_eod:
            ids = np.concatenate([ids, np.asarray([self.tok.special.endoftext], dtype=np.int64)])
        if ids.shape[0] == 0:
            raise SkipSample("empty_conversation", "empty sequence")
        if int(ids.max()) >= self.tok.vocab_size or int(ids.min()) < 0:
            raise SkipSample("bad_token_ids", f"token ids outside [0, {self.tok.vocab_size}): wrong tokenizer?")
        vis = np.isin(ids, [self.tok.special.image_pad, self.tok.special.video_pad])
        if vis.any():
            raise SkipSample("bad_token_ids", "pre-tokenized text holds vision pad tokens but no vision input")
        truncated = False
        if ids.shape[0] > self.cfg.max_tokens:
            if self.cfg.overlong != "truncate":
                raise SkipSample("overlong", f"{ids.shape[0]} tokens > max_tokens {self.cfg.max_tokens}")
            ids, truncated = ids[: self.cfg.max_tokens], True
        if ids.shape[0] < 2:
            raise SkipSample("no_supervised_tokens", "a one-token sequence has nothing to predict")
        labels = shift_labels(ids, np.ones(ids.shape[0], dtype=bool))
        L = ids.shape[0]
        pos = torch.arange(L, dtype=torch.long).expand(3, L).contiguous()
        return Processed(raw.key, torch.from_numpy(ids), torch.from_numpy(labels), pos, truncated=truncated,
                         vision=self.vision)
