"""Helpers for the data tests: real images, shard writing, and the transformers oracle (processor + template)."""

from __future__ import annotations

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
# Qwen2-VL-Instruct's chat template, written from its published semantics (the tokenizer files we have carry a
# newer template): default system turn, `<|im_start|>role\n` + content + `<|im_end|>\n`, images/videos as
# vision_start + pad + vision_end, text items verbatim.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
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
QWEN2VL_MASK_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}" + _CONTENT + "<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}" + _CONTENT + "<|im_end|>\n{% endif %}{% endfor %}"
)


def hf_processor(min_pixels: int, max_pixels: int):
    """transformers' Qwen2VLProcessor assembled offline: Qwen2TokenizerFast (real files) + the PIL image
    processor; no video processor (transformers' needs torchvision, which is not installed)."""
    from transformers import Qwen2TokenizerFast, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # ProcessorMixin takes its sub-processors from __init__'s parameters: leaving out video_processor
        # builds the processor without it.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    tok = Qwen2TokenizerFast.from_pretrained(tokenizer_dir())
    ip = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN2VL_TEMPLATE)


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
