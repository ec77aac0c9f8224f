"""Helpers for the data tests: real images, shard writing, and the transformers oracle (processor + template)."""

from __future__ import annotations

import functools
import io
import json
import os

import numpy as np
from PIL import Image

from data.shards import ShardWriter, index_shard_file, write_manifest


def tokenizer_dir() -> str:
    from tests.conftest import qwen_tokenizer_dir  # one rule for a missing test dependency (fail under CI)

    return str(qwen_tokenizer_dir())


def skimage_rgb(name: str) -> np.ndarray:
    import skimage.data as sd

    return getattr(sd, name)()


def encode(arr: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def small_image(seed: int, h: int, w: int, fmt: str = "PNG") -> bytes:
    """A crop of a real photo (astronaut / coffee / chelsea), resized to (h, w)."""
    names = ("astronaut", "coffee", "chelsea", "rocket")
    img = Image.fromarray(skimage_rgb(names[seed % len(names)]))
    return encode(np.asarray(img.resize((w, h), Image.Resampling.BILINEAR)), fmt)


def write_dataset(root: str | os.PathLike, samples: list[tuple[str, dict[str, bytes]]], per_shard: int = 8) -> str:
    """Write (key, members) samples as shards + sidecar indexes + manifest; returns the root path."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    indexes = []
    for s in range(0, len(samples), per_shard):
        path = os.path.join(root, f"shard-{s // per_shard:06d}.tar")
        with ShardWriter(path) as w:
            for key, members in samples[s : s + per_shard]:
                w.write(key, members)
        indexes.append(index_shard_file(path))
    write_manifest(root, indexes)
    return root


def js(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def text_chat(i: int, n_words: int) -> dict:
    words = " ".join(f"w{(i * 7 + j) % 97}" for j in range(n_words))
    return {"messages": [{"role": "user", "content": f"Question {i}: {words}"},
                         {"role": "assistant", "content": f"Answer {i}."}]}


def mixed_samples(n: int, seed: int = 0, img_every: int = 3, max_words: int = 60) -> list[tuple[str, dict[str, bytes]]]:
    """n samples: every `img_every`-th has a small real image; text lengths vary."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"s{i:05d}"
        if img_every and i % img_every == 0:
            h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
            obj = {"messages": [
                {"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                             {"type": "text", "text": f"Describe image {i}."}]},
                {"role": "assistant", "content": "It shows " + "something " * int(rng.integers(1, 20))}]}
            out.append((key, {"json": js(obj), "img0.png": small_image(i, h, w)}))
        else:
            out.append((key, {"json": js(text_chat(i, int(rng.integers(1, max_words))))}))
    return out


# --------------------------------------------------------------------------------------------- the oracle
# The Qwen-VL Instruct chat templates, written from their published semantics (the tokenizer files we have carry a
# newer template): `<|im_start|>role\n` + content + `<|im_end|>\n`, images/videos as vision_start + pad +
# vision_end, text items verbatim; Qwen2-VL's and Qwen2.5-VL's insert a default system turn when the first message
# is not a system message, Qwen3-VL's does not.
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
DEFAULT_SYSTEMS = {"qwen2_vl": QWEN_DEFAULT_SYSTEM, "qwen2_5_vl": QWEN_DEFAULT_SYSTEM, "qwen3_vl": None}


def _system_block(default_system: str | None) -> str:
    if default_system is None:
        return ""
    return ("{% if loop.first and message['role'] != 'system' %}"
            f"<|im_start|>system\n{default_system}<|im_end|>\n{{% endif %}}")


def chat_template(default_system: str | None) -> str:
    return (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}" + _system_block(default_system) +
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
        "{% set image_count.value = image_count.value + 1 %}"
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif content['type'] == 'video' or 'video' in content %}"
        "{% set video_count.value = video_count.value + 1 %}"
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# The same rendering with {% generation %} around each assistant turn's content + <|im_end|>: transformers then
# returns `assistant_masks`, an independent oracle for which tokens are supervised.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)


def mask_template(default_system: str | None) -> str:
    return (
        "{% for message in messages %}" + _system_block(default_system) +
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT
        + "<|im_end|>{% endgeneration %}{{ '\\n' }}"
        "{% else %}" + _CONTENT + "<|im_end|>\n{% endif %}{% endfor %}"
    )


QWEN2VL_TEMPLATE = chat_template(QWEN_DEFAULT_SYSTEM)
QWEN2VL_MASK_TEMPLATE = mask_template(QWEN_DEFAULT_SYSTEM)
HF_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def hf_image_processor(family: str = "qwen2_vl", **kw):
    """transformers' image processor of a family: Qwen2VLImageProcessorPil (PIL bicubic resize, as our loader) with
    the family's patch / merge sizes and mean / std (Qwen3-VL: patch 16, 0.5 / 0.5), as its preprocessor_config
    sets them."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from data.media.vision import family_vision

    v = family_vision(family)
    return Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                    merge_size=v.merge_size, image_mean=list(v.pixel_mean),
                                    image_std=list(v.pixel_std), **kw)


def hf_processor(min_pixels: int, max_pixels: int, family: str = "qwen2_vl"):
    """transformers' processor of a family (Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor) assembled
    offline: Qwen2TokenizerFast (real files) + the family's image processor + its chat template; no video processor
    (transformers' need torchvision, which is not installed: videos are compared against their pure functions)."""
    import transformers
    from transformers import Qwen2TokenizerFast

    base = getattr(transformers, HF_PROCESSORS[family])

    class ImageOnlyProcessor(base):  # type: ignore[valid-type, misc]
        # ProcessorMixin takes its sub-processors from __init__'s parameters: leaving out video_processor
        # builds the processor without it.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    tok = Qwen2TokenizerFast.from_pretrained(tokenizer_dir())
    ip = hf_image_processor(family, min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyProcessor(image_processor=ip, tokenizer=tok, chat_template=chat_template(DEFAULT_SYSTEMS[family]))


_ROPE_MODELS: dict = {}


def hf_position_ids(family: str, ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None):
    """(3, L) position ids of one sample from transformers' own get_rope_index of the family's model (built on the
    meta device from its tiny preset's config.json: only the vision config's merge size and tokens per second
    matter)."""
    import torch
    from transformers import AutoConfig

    from model.family import get_preset, hf_config_dict
    from model.parity import hf_class

    if family not in _ROPE_MODELS:
        d = hf_config_dict(get_preset(family, "tiny"))
        with torch.device("meta"):
            _ROPE_MODELS[family] = hf_class(family)(AutoConfig.for_model(d.pop("model_type"), **d)).model
    model = _ROPE_MODELS[family]
    image_pad, video_pad = model.config.image_token_id, model.config.video_token_id
    if not bool(((ids == image_pad) | (ids == video_pad)).any()):
        return torch.arange(ids.numel()).expand(3, -1)  # text only: transformers' own default positions
    mm = (ids == image_pad).int() + 2 * (ids == video_pad).int()
    kw = {}
    if second_per_grid_ts is not None:
        kw["second_per_grid_ts"] = torch.tensor(second_per_grid_ts, dtype=torch.float32)
    pos, _ = model.get_rope_index(ids[None], mm_token_type_ids=mm[None], image_grid_thw=image_grid_thw,
                                  video_grid_thw=None if video_grid_thw is None else video_grid_thw.clone(), **kw)
    return pos[:, 0]


def encode_video(width: int, height: int, nframes: int, fps: int = 8) -> bytes:
    """H.264 MP4 bytes encoded now with PyAV: scikit-image's astronaut panning across the frame."""
    import tempfile

    import av

    base = np.asarray(Image.fromarray(skimage_rgb("astronaut")).resize((width, height), Image.Resampling.BICUBIC))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.mp4")
        with av.open(path, "w", format="mp4") as c:
            s = c.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            s.options = {"preset": "ultrafast", "crf": "20"}
            for i in range(nframes):
                frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * i, axis=1).copy(), format="rgb24")
                for p in s.encode(frame):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        with open(path, "rb") as f:
            return f.read()


def take(loader, n: int) -> list:
    """The next n microbatches of a loader (fewer at its end)."""
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def interrupted_run(cfg, cut: int, dp_rank: int = 0, dp_size: int = 1):
    """The first `cut` microbatches of a loader, then a new loader restored from its state_dict(): returns (the
    microbatches of both, in order, and the resumed loader)."""
    from data.loader import build_loader

    first = build_loader(cfg, dp_rank, dp_size)
    head = take(first, cut)
    state = first.state_dict()
    first.close()
    resumed = build_loader(cfg, dp_rank, dp_size)
    resumed.load_state_dict(state)
    return head + list(resumed), resumed


def assert_same_batches(a: list, b: list) -> None:
    """Two runs' microbatches are identical: keys, and every tensor torch.equal with its dtype."""
    import torch

    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.sample_keys == y.sample_keys, f"batch {i}"
        for name, v in x.as_dict().items():
            w = getattr(y, name)
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and torch.equal(v, w), f"batch {i}: {name} differs"
            else:
                assert v == w, f"batch {i}: {name} differs"


def damaged_dataset(root: str | os.PathLike) -> tuple[str, set[str], list[str]]:
    """6 shards of 6 text samples, three of them damaged: shard 1 truncated inside sample 3 (an interrupted copy),
    shard 3 without its sidecar index, shard 4 rewritten after indexing (other keys at the same offsets: a stale
    index). Returns the root, the keys that can be read and the damaged shards' file names."""
    root = write_dataset(root, [(f"s{i:03d}", {"json": js(text_chat(i, 5 + i % 7))}) for i in range(36)],
                         per_shard=6)

    def shard(k: int) -> str:
        return os.path.join(root, f"shard-{k:06d}.tar")

    with open(shard(1) + ".index.json") as f:
        cut = json.load(f)["samples"][3]["offset"] + 600
    with open(shard(1), "rb") as f:
        head = f.read(cut)
    with open(shard(1), "wb") as f:
        f.write(head)
    os.remove(shard(3) + ".index.json")
    with ShardWriter(shard(4)) as w:
        for i in range(24, 30):
            w.write(f"x{i:03d}", {"json": js(text_chat(i, 5 + i % 7))})
    good = {f"s{i:03d}" for i in [*range(0, 6), 6, 7, 8, *range(12, 18), *range(30, 36)]}
    return root, good, [f"shard-{k:06d}.tar" for k in (1, 3, 4)]


# ------------------------------------------------------------------------------------- the video oracle
@functools.lru_cache(maxsize=8)  # the video and the loader parity tests ask for the same reference
def video_reference(family: str, data: bytes, max_tokens: int, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> dict:
    """What the family's reference pipeline makes of a video, from transformers' and qwen-vl-utils' pure functions
    (transformers' video processors need torchvision, absent here): qwen-vl-utils' frame sampling and frame size
    (restated in tests/video/video_clips.py) on the frames PyAV decodes, cross-checked against transformers'
    Qwen3VLVideoProcessor.sample_frames and its video smart_resize (with `cap_pixels_per_frame`, qwen-vl-utils'
    per-frame cap) or, for Qwen2-VL / Qwen2.5-VL, Qwen2VLVideoProcessor's smart_resize bounds; each sampled frame
    resized with PIL bicubic (transformers' PIL backend; qwen-vl-utils' torchvision resize is measured against it
    in tests/video) and normalized + patchified by the family's image processor; the processor's time encoding:
    Qwen2.5-VL's second_per_grid_ts = temporal_patch_size / sampled fps, Qwen3-VL's per-pair timestamps
    (Qwen3VLProcessor._calculate_timestamps) and its replace_video_token text. `max_tokens`: the loader's cap on a
    video's merged tokens (qwen-vl-utils' total_pixels = max_tokens x factor^2); `min_pixels` / `max_pixels`: a
    frame's bounds (None: 128 and 768 merged tokens, qwen-vl-utils' and the video processors' defaults)."""
    import types

    import av
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as qwen2vl_smart_resize
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3vl_video_smart_resize
    from transformers.video_utils import VideoMetadata

    from data.media.vision import family_vision
    from tests.video.video_clips import qwen_fetch_video_plan

    v = family_vision(family)
    p, f, T = v.patch_size, v.factor, v.temporal_patch_size
    with av.open(io.BytesIO(data)) as c:
        video_fps = float(c.streams.video[0].average_rate)
        decoded = [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
    total, (H, W) = len(decoded), decoded[0].shape[:2]
    total_pixels = max_tokens * f * f
    lo = 128 * f * f if min_pixels is None else min_pixels
    hi = 768 * f * f if max_pixels is None else max_pixels
    ele = {"fps": 2.0, "total_pixels": total_pixels, "min_pixels": lo, "max_pixels": hi}
    idx, (h, w), sample_fps = qwen_fetch_video_plan(ele, total, video_fps, H, W, image_patch_size=p)
    if family == "qwen3_vl":
        ns = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
        hf_idx = Qwen3VLVideoProcessor.sample_frames(ns, VideoMetadata(total_num_frames=total, fps=video_fps), fps=2)
        assert hf_idx.tolist() == idx, (hf_idx.tolist(), idx)
        # Qwen3VLVideoProcessor.resize with cap_pixels_per_frame: per-frame pixels capped as qwen-vl-utils caps them
        # (size.longest_edge counts pixels over frames: twice qwen-vl-utils' total_pixels, which counts frame pairs).
        shortest, longest, frame_cap = lo, 2 * total_pixels, hi  # frame_cap: max_video_tokens x factor^2
        per_frame = max(min(frame_cap, longest // len(idx)), int(shortest * 1.05))
        hf_hw = qwen3vl_video_smart_resize(len(idx), H, W, temporal_factor=T, factor=f, min_pixels=shortest,
                                           max_pixels=per_frame * len(idx))
    else:
        # Qwen2VLVideoProcessor.size (its module imports torchvision): default 128 .. 768 merged tokens per frame.
        hf_hw = qwen2vl_smart_resize(H, W, factor=f, min_pixels=lo, max_pixels=hi)
    assert tuple(hf_hw) == (h, w), (hf_hw, (h, w))
    frames = [np.asarray(Image.fromarray(decoded[i]).resize((w, h), Image.Resampling.BICUBIC)) for i in idx]
    ip = hf_image_processor(family, do_resize=False)
    per_frame_rows = [ip(images=[fr], return_tensors="np")["pixel_values"].reshape(-1, 3, T, p, p) for fr in frames]
    frames_padded = per_frame_rows + [per_frame_rows[-1]] * (-len(idx) % T)
    pairs = []
    for k in range(len(frames_padded) // T):  # frame pair k: temporal slot j holds frame T*k + j
        pairs.append(np.stack([frames_padded[T * k + j][:, :, j] for j in range(T)], axis=2))
    rows = np.concatenate(pairs).reshape(-1, 3 * T * p * p)
    grid = (len(frames_padded) // T, h // p, w // p)
    frame_seqlen = grid[1] * grid[2] // v.merge_size**2
    out = {"indices": idx, "hw": (h, w), "grid": grid, "rows": torch.from_numpy(rows), "video_fps": video_fps,
           "second_per_grid_ts": None, "placeholder": "<|video_pad|>" * (grid[0] * frame_seqlen)}
    if family == "qwen2_5_vl":
        out["second_per_grid_ts"] = T / sample_fps  # Qwen2_5_VLProcessor: temporal_patch_size / fps
    if family == "qwen3_vl":  # Qwen3VLProcessor.replace_video_token
        times = Qwen3VLProcessor._calculate_timestamps(None, list(idx), video_fps, T)
        out["placeholder"] = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * frame_seqlen
                                     + "<|vision_end|>" for t in times[: grid[0]])
    return out


def hf_video_chat(proc, family: str, messages: list[dict], media: dict[str, bytes], ref_video: dict) -> dict:
    """transformers' processing of a chat with images and one video, the video's part re-done from its pure functions
    (ref_video: video_reference): the template's text, image pads replaced as the processor replaces them, the
    video's pad as replace_video_token does (Qwen3-VL: per frame pair a timestamp and a block of its own); input_ids,
    grids and the family's get_rope_index position ids."""
    import torch

    text = proc.apply_chat_template(messages, tokenize=False)
    refs = [it["image"] for m in messages if isinstance(m["content"], list) for it in m["content"]
            if it.get("type") == "image"]
    images = [Image.open(io.BytesIO(media[r])) for r in refs]
    grids = proc.image_processor(images=images, return_tensors="pt")["image_grid_thw"] if images else None
    for g in (grids if grids is not None else []):
        text = text.replace("<|image_pad|>", "<|placeholder|>" * int(g.prod() // 4), 1)
    text = text.replace("<|placeholder|>", "<|image_pad|>").replace("<|video_pad|>", ref_video["placeholder"], 1)
    ids = torch.tensor(proc.tokenizer(text)["input_ids"])
    vgrid = torch.tensor([ref_video["grid"]])
    spt = None if ref_video["second_per_grid_ts"] is None else [ref_video["second_per_grid_ts"]]
    return {"input_ids": ids, "image_grid_thw": grids, "video_grid_thw": vgrid,
            "position_ids": hf_position_ids(family, ids, grids, vgrid, spt)}
