"""Logits parity of our model against transformers' `<Family>ForConditionalGeneration` on one checkpoint of any
supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; detected from its config.json).

    python -m model.parity --hf DIR [--tol 1e-4] [--dtype fp32|bf16|fp16] [--device cpu|cuda] [--hf-attn sdpa|eager]
    python -m model.parity --make-tiny DIR [--family qwen2_5_vl]   # a tiny random HF checkpoint (no download)

Loads DIR into transformers (`from_pretrained`) and, independently, into ours (`model.hf_adapter.load_hf_model`), runs a
built-in suite of inputs and prints one line per case with the max absolute logit difference; exits 1 if
any case exceeds --tol. The last line printed is exactly `max_abs_logit_diff=<value>`.

Cases: text only; one image; one image with transformers computing its own position ids; two images of
different sizes and aspect ratios; one video; image + video + text interleaved; a packed sequence of
several samples (ours, one call with cu_seqlens) against each sample run alone through transformers.

Position ids: we pass OUR ids (Qwen's reference M-RoPE algorithm, model/position_ids.py, through the family's
processing facts) to transformers explicitly, so the comparison isolates the network. Each line also says whether
transformers' own get_rope_index agrees with ours on that input: transformers 5.x advances the running position by
max(h, w)/2 after a vision block where the reference advances to the block's largest id + 1 (max(t, h/2, w/2) for
Qwen2-VL; the scaled time for Qwen2.5-VL), so they differ after a video whose (scaled) frame-pair count exceeds its
merged height and width (the `video` and `interleaved` cases here). Qwen3-VL's videos are one block per frame pair,
where the two agree. A Qwen3-VL video is laid out as its processor does: per frame pair a text timestamp, then
<|vision_start|> pads <|vision_end|>.

Pixel values are random normal rows (what a normalizing processor produces): the suite tests the network,
not the image processor.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.cli import run_cli
from core.dtypes import DTYPES
from model.config import ModelConfig
from model.family import FAMILY_NAMES, get_family, get_preset, hf_config_dict
from model.hf_adapter import is_hf_dir, load_hf_model, read_hf_config, write_safetensors_shards
from model.vlm import VLModel

_FIRST_SPECIAL_ID = 151643  # <|endoftext|>; text ids are drawn below it


@dataclass
class Sample:
    """One sample (a row of a batch): token ids and the pixel rows of its images and videos."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_seconds: list[float] | None = None
    """Seconds per frame pair of each video (Qwen2.5-VL's temporal M-RoPE ids)."""


@dataclass
class Case:
    name: str
    samples: list[Sample]
    hf_own_positions: bool = False
    """Let transformers compute position ids itself (only where its rope index agrees with the reference)."""
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ inputs
class SampleBuilder:
    """Assembles token sequences with vision blocks exactly as the chat template + processor do."""

    def __init__(self, cfg: ModelConfig, gen: torch.Generator) -> None:
        self.cfg, self.gen = cfg, gen
        specials = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
        self.text_hi = min(cfg.text.vocab_size, _FIRST_SPECIAL_ID, *specials)

    def text(self, n: int) -> list[torch.Tensor]:
        return [torch.randint(0, self.text_hi, (n,), generator=self.gen)]

    def block(self, pad: int, n: int) -> list[torch.Tensor]:
        cfg = self.cfg
        start, end = torch.tensor([cfg.vision_start_token_id]), torch.tensor([cfg.vision_end_token_id])
        return [start, torch.full((n,), pad), end]

    def sample(self, *parts: int | tuple[str, tuple[int, int, int]]) -> Sample:
        """parts: an int = that many text tokens; ("image" | "video", (t, h, w)) = a vision block (a Qwen3-VL video:
        one block per frame pair, each after a 4-token text timestamp, inside the template's vision_start/end)."""
        cfg, m = self.cfg, self.cfg.vision.spatial_merge_size
        timestamps = get_family(cfg.family).processing(cfg).video_time == "timestamps"
        ids: list[torch.Tensor] = []
        pix: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        grids: dict[str, list[tuple[int, int, int]]] = {"image": [], "video": []}
        for p in parts:
            if isinstance(p, int):
                ids += self.text(p)
                continue
            kind, (t, h, w) = p
            if h % m or w % m:
                raise ValueError(f"grid {(t, h, w)} must be divisible by spatial_merge_size={m}")
            if kind == "video" and timestamps:
                ids.append(torch.tensor([cfg.vision_start_token_id]))
                for _ in range(t):
                    ids += self.text(4) + self.block(cfg.video_token_id, h * w // m**2)
                ids.append(torch.tensor([cfg.vision_end_token_id]))
            else:
                pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
                ids += self.block(pad, t * h * w // m**2)
            pix[kind].append(torch.randn(t * h * w, cfg.vision.patch_dim, generator=self.gen))
            grids[kind].append((t, h, w))
        s = Sample(torch.cat(ids))
        if grids["image"]:
            s.pixel_values, s.image_grid_thw = torch.cat(pix["image"]), torch.tensor(grids["image"])
        if grids["video"]:
            s.pixel_values_videos, s.video_grid_thw = torch.cat(pix["video"]), torch.tensor(grids["video"])
            # Qwen2.5-VL: one frame pair a second, then one every 0.5 s (2 and 1 temporal ids per pair).
            s.video_seconds = [1.0 if i % 2 == 0 else 0.5 for i in range(len(grids["video"]))]
        return s


def default_cases(cfg: ModelConfig, seed: int = 0) -> list[Case]:
    """The built-in suite. Grids are (t, h, w) in 14-pixel patches; merged tokens = t*h*w/4."""
    b = SampleBuilder(cfg, torch.Generator().manual_seed(seed))
    one_image = b.sample(9, ("image", (1, 8, 12)), 11)
    text_sample = b.sample(23)
    video_sample = b.sample(5, ("video", (3, 4, 4)), 7)
    return [
        Case("text only", [b.sample(37)]),
        Case("one image", [one_image]),
        Case("one image, transformers' own position ids", [one_image], hf_own_positions=True),
        # 168x84 px (wide, 2:1) and 56x196 px (tall, 2:7): different sizes and aspect ratios
        Case("two images, different sizes", [b.sample(6, ("image", (1, 6, 14)), 4, ("image", (1, 14, 4)), 8)]),
        # 6 frame pairs > merged 2x3 spatial grid: where transformers' rope index departs from the reference
        Case("one video (6 frame pairs)", [b.sample(7, ("video", (6, 4, 6)), 9)]),
        Case(
            "image + video + text interleaved",
            [b.sample(5, ("image", (1, 4, 8)), 6, ("video", (4, 6, 4)), 3, ("image", (1, 10, 6)), 8)],
        ),
        Case("packed: 4 samples vs each alone",
             [text_sample, one_image, video_sample, b.sample(3, ("image", (1, 4, 4)))]),
    ]


def _cat_opt(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
    xs = [x for x in xs if x is not None]
    return torch.cat(xs) if xs else None


def mm_token_type_ids(ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """transformers 5.x's modality ids: 0 text, 1 image pad, 2 video pad."""
    return (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()


def sample_positions(s: Sample, cfg: ModelConfig) -> torch.Tensor:
    """Our (reference-algorithm) position ids (3, L) for one sample."""
    proc = get_family(cfg.family).processing(cfg)
    return proc.position_ids(s.input_ids, s.image_grid_thw, s.video_grid_thw, s.video_seconds)


def video_kwargs(s: Sample, cfg: ModelConfig, device) -> dict:
    """What transformers needs besides the grids to compute a family's video positions itself."""
    if s.video_grid_thw is None or get_family(cfg.family).processing(cfg).video_time != "seconds":
        return {}
    return {"second_per_grid_ts": torch.tensor(s.video_seconds, device=device)}


# ------------------------------------------------------------------------------------------ running
def hf_logits(hf, s: Sample, cfg: ModelConfig, position_ids: torch.Tensor | None, device, dtype) -> torch.Tensor:
    """transformers' logits (L, V) for one sample; position_ids (3, L) or None (transformers computes them)."""
    ids = s.input_ids.to(device)
    kw = {
        "input_ids": ids[None],
        "mm_token_type_ids": mm_token_type_ids(ids, cfg)[None],
        "use_cache": False,
    }
    if position_ids is not None:
        kw["position_ids"] = position_ids.to(device)[:, None, :]  # (3, batch=1, L)
    if s.pixel_values is not None:
        kw["pixel_values"], kw["image_grid_thw"] = s.pixel_values.to(device, dtype), s.image_grid_thw.to(device)
    if s.pixel_values_videos is not None:
        kw["pixel_values_videos"] = s.pixel_values_videos.to(device, dtype)
        kw["video_grid_thw"] = s.video_grid_thw.to(device)
        kw.update(video_kwargs(s, cfg, device))
    hf.model.rope_deltas = None  # no state carried over between calls
    return hf(**kw).logits[0].float()


def our_logits(model: VLModel, samples: list[Sample], device, dtype) -> tuple[torch.Tensor, list[int]]:
    """Our logits (T, V) for the samples packed into one sequence, and the sample boundaries."""
    ids = torch.cat([s.input_ids for s in samples])
    lengths = [s.input_ids.numel() for s in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    img_grid = _cat_opt([s.image_grid_thw for s in samples])
    vid_grid = _cat_opt([s.video_grid_thw for s in samples])
    seconds = [x for s in samples for x in (s.video_seconds or [])]
    pos = model.processing.packed_position_ids(ids, cu, img_grid, vid_grid, seconds if vid_grid is not None else None)
    pv, pvv = _cat_opt([s.pixel_values for s in samples]), _cat_opt([s.pixel_values_videos for s in samples])
    h = model(
        input_ids=ids.to(device), position_ids=pos.to(device), cu_seqlens=cu.to(device), max_seqlen=max(lengths),
        pixel_values=None if pv is None else pv.to(device, dtype), image_grid_thw=img_grid,
        pixel_values_videos=None if pvv is None else pvv.to(device, dtype), video_grid_thw=vid_grid,
    )
    return model.logits(h).float(), cu.tolist()


def rope_index_note(hf, s: Sample, cfg: ModelConfig, ours_3L: torch.Tensor) -> str:
    """Compare transformers' own get_rope_index with our reference ids on one sample."""
    if s.image_grid_thw is None and s.video_grid_thw is None:
        return "same"  # text only: both are 0..L-1 on all three streams
    ids = s.input_ids
    theirs, _ = hf.model.get_rope_index(
        ids[None].to(hf.device), mm_token_type_ids=mm_token_type_ids(ids, cfg)[None].to(hf.device),
        image_grid_thw=None if s.image_grid_thw is None else s.image_grid_thw.to(hf.device),
        video_grid_thw=None if s.video_grid_thw is None else s.video_grid_thw.clone().to(hf.device),
        **video_kwargs(s, cfg, hf.device),
    )
    n = int((theirs[:, 0].cpu() != ours_3L).any(0).sum())
    return "same" if n == 0 else f"transformers differs at {n} tokens (5.x max(h,w)/2 advance; reference passed)"


@dataclass
class CaseResult:
    name: str
    max_abs_diff: float
    max_abs_logit: float
    tokens: int
    rope_index: str


def run_case(hf, ours: VLModel, case: Case, device, dtype) -> CaseResult:
    cfg = ours.cfg
    with torch.no_grad():
        mine, cu = our_logits(ours, case.samples, device, dtype)
        diffs, notes, scale = [], [], 0.0
        for s, a, b in zip(case.samples, cu[:-1], cu[1:]):
            pos = sample_positions(s, cfg)
            theirs = hf_logits(hf, s, cfg, None if case.hf_own_positions else pos, device, dtype)
            diffs.append(float((theirs - mine[a:b]).abs().max()))
            scale = max(scale, float(theirs.abs().max()))
            notes.append(rope_index_note(hf, s, cfg, pos))
    if case.hf_own_positions and any(n != "same" for n in notes):
        raise ValueError(f"case {case.name!r} lets transformers compute positions, but they differ from ours")
    note = "same" if all(n == "same" for n in notes) else next(n for n in notes if n != "same")
    return CaseResult(case.name, max(diffs), scale, cu[-1], note)


def hf_class(family: str):
    """transformers' model class of a family (e.g. Qwen2_5_VLForConditionalGeneration)."""
    import transformers

    return getattr(transformers, get_family(family).hf_architecture)


def load_pair(hf_dir: str | Path, dtype: torch.dtype, device: str, hf_attn: str):
    """transformers' model and ours from the same directory, each through its own loader."""
    if not is_hf_dir(hf_dir):
        # transformers would take a missing path for a hub repo id and fail with "Repo id must be in the form".
        raise FileNotFoundError(f"--hf {hf_dir}: no HF checkpoint directory there (it needs config.json and "
                                "*.safetensors); export one with `python -m tools.export CHECKPOINT DIR`")
    family = read_hf_config(hf_dir).family  # one check of the family, with the file and key in its message
    hf, info = hf_class(family).from_pretrained(
        str(hf_dir), dtype=dtype, attn_implementation=hf_attn, output_loading_info=True
    )
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(f"transformers could not load every weight of {hf_dir}: {info}")
    hf = hf.to(device).eval()
    ours = load_hf_model(hf_dir, dtype=dtype, device=device).eval()
    return hf, ours


def run_parity(
    hf_dir: str | Path,
    *,
    tol: float = 1e-4,
    dtype: str = "fp32",
    device: str = "cpu",
    hf_attn: str = "sdpa",
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> tuple[float, list[CaseResult]]:
    """Run the suite; print one line per case and the final `max_abs_logit_diff=<value>` line."""
    dt = DTYPES[dtype]
    hf, ours = load_pair(hf_dir, dt, device, hf_attn)
    print_fn(f"# parity {hf_dir}: dtype={dtype} device={device} transformers attn={hf_attn} tol={tol:g}")
    results = []
    for case in default_cases(ours.cfg, seed):
        r = run_case(hf, ours, case, device, dt)
        results.append(r)
        status = "ok" if r.max_abs_diff <= tol else "FAIL"
        print_fn(f"{status:4} {r.name:44} max_abs_logit_diff={r.max_abs_diff:.3e}  max|logit|={r.max_abs_logit:.3e}"
                 f"  tokens={r.tokens}  rope_index: {r.rope_index}")
    worst = max(r.max_abs_diff for r in results)
    print_fn(f"max_abs_logit_diff={worst:.6e}")
    return worst, results


# ------------------------------------------------------------------------------------------ tiny checkpoints
def make_tiny_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig | None = None,
    *,
    seed: int = 0,
    layout: str = "hub",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random checkpoint of cfg's family (default: Qwen2-VL's tiny preset) built by transformers itself (no
    download).

    layout 'hub': transformers' save_pretrained (the keys its version writes, with its nested config.json);
    layout 'transformers5': the 5.x in-memory keys (`model.visual.*`, `model.language_model.*`) written directly,
    as some re-saved checkpoints hold them. max_shard_bytes shards the weights (with an index).
    Norm weights and biases are randomized too (transformers initializes them to 1 and 0), so parity
    cannot miss a bias or a norm weight.
    """
    from transformers import AutoConfig

    if layout not in ("hub", "transformers5"):
        raise ValueError(f"layout={layout!r}; choose 'hub' or 'transformers5'")
    cfg = cfg or get_preset("qwen2_vl", "tiny")
    torch.manual_seed(seed)
    d = hf_config_dict(cfg)
    hf = hf_class(cfg.family)(AutoConfig.for_model(d.pop("model_type"), **d)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    out = Path(out_dir)
    if layout == "hub":
        kw = {"max_shard_size": max_shard_bytes} if max_shard_bytes else {}
        hf.save_pretrained(str(out), **kw)
    else:
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if cfg.text.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        write_safetensors_shards(sd, out, max_shard_bytes or 2**62)
        hf.config.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", type=Path, help="HF checkpoint directory (any supported family) to compare on")
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed (default 1e-4, fp32)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers' attention kernel")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--make-tiny", type=Path, metavar="DIR", help="write a tiny random HF checkpoint to DIR and exit")
    ap.add_argument("--family", choices=FAMILY_NAMES, default="qwen2_vl", help="model family of --make-tiny")
    args = ap.parse_args(argv)
    if args.make_tiny:
        out = make_tiny_checkpoint(args.make_tiny, get_preset(args.family, "tiny"), seed=args.seed)
        print(f"wrote a tiny random {get_family(args.family).title} checkpoint to {out}; compare with: "
              f"python -m model.parity --hf {out}")
        return 0
    if args.hf is None:
        ap.error("--hf DIR is required (or --make-tiny DIR)")
    worst, _ = run_parity(args.hf, tol=args.tol, dtype=args.dtype, device=args.device, hf_attn=args.hf_attn,
                          seed=args.seed)
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(run_cli("python -m model.parity", main))
