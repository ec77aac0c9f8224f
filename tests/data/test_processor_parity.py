"""Parity with transformers' Qwen2-VL processor: images (grids exact, pixels < 1e-5), input_ids and labels.

The oracle is transformers 5.x: Qwen2VLImageProcessorPil (PIL bicubic resize, as our loader) and Qwen2VLProcessor
with the real Qwen2 tokenizer files and Qwen2-VL's chat template; supervised positions come from transformers'
`return_assistant_tokens_mask` with a {% generation %} variant of the same template.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datahelpers import QWEN2VL_MASK_TEMPLATE, encode, js, skimage_rgb, small_image
from PIL import Image

from data.chatml import box_text
from data.config import DataConfig
from data.media.image import load_image
from data.media.vision import AspectRatioError, image_rows_u8
from data.sample import RawSample, SampleProcessor

MIN_DEFAULT, MAX_DEFAULT = 4 * 28 * 28, 16384 * 28 * 28
PIXEL_SETTINGS = [(MIN_DEFAULT, MAX_DEFAULT), (100 * 28 * 28, 16384 * 28 * 28), (MIN_DEFAULT, 256 * 28 * 28)]


def _test_images() -> dict[str, bytes]:
    astro = skimage_rgb("astronaut")
    imgs = {
        "astronaut.jpg": encode(astro, "JPEG", quality=90),
        "coffee.png": encode(skimage_rgb("coffee"), "PNG"),
        "chelsea.webp": encode(skimage_rgb("chelsea"), "WEBP"),
        "camera_gray.png": encode(skimage_rgb("camera"), "PNG"),  # L mode
        "page_gray.jpg": encode(skimage_rgb("page"), "JPEG"),  # document-like, 191x384
        "logo_rgba.png": encode(skimage_rgb("logo"), "PNG"),  # alpha -> composited on white
        "hubble.jpg": encode(skimage_rgb("hubble_deep_field"), "JPEG"),  # 872x1000
        "strip_wide.png": encode(astro[200:220, :], "PNG"),  # 20x512 (aspect 25.6)
        "strip_tall.png": encode(np.ascontiguousarray(astro[:, 100:103]), "PNG"),  # 512x3 (aspect 170)
        "tiny.png": encode(astro[:9, :7], "PNG"),
    }
    pal = Image.fromarray(skimage_rgb("chelsea")).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    imgs["palette_transparent.png"] = buf.getvalue()
    return imgs


IMAGES = _test_images()


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_SETTINGS)
def test_image_parity_with_transformers(hf_proc_factory, min_pixels, max_pixels):
    ip = hf_proc_factory(min_pixels, max_pixels).image_processor
    for name, data in IMAGES.items():
        ours = load_image(data, min_pixels, max_pixels)
        rows = image_rows_u8(ours.pixels_HWC)
        ref = ip(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        assert tuple(ref["image_grid_thw"][0]) == ours.grid_thw, name
        assert rows.shape == ref["pixel_values"].shape, name
        diff = float(np.abs(rows.numpy() - ref["pixel_values"]).max())
        assert diff < 1e-5, f"{name}: max |diff| = {diff}"


def test_extreme_aspect_ratio_is_rejected_like_transformers(hf_proc_factory):
    data = encode(skimage_rgb("astronaut")[:2, :500], "PNG")  # 2 x 500: aspect ratio 250
    with pytest.raises(AspectRatioError):
        load_image(data, MIN_DEFAULT, MAX_DEFAULT)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_proc_factory(MIN_DEFAULT, MAX_DEFAULT).image_processor(images=[Image.open(io.BytesIO(data))])


# --------------------------------------------------------------------------------------------- token ids
def _conversations() -> list[tuple[list[dict], dict[str, bytes]]]:
    img_a, img_b, img_c = small_image(0, 120, 90), small_image(1, 60, 200, "JPEG"), small_image(2, 300, 280)
    return [
        ([{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                       {"type": "text", "text": "What is in the image?"}]},
          {"role": "assistant", "content": "An astronaut in a white suit."}], {"img0.png": img_a}),
        ([{"role": "system", "content": "You answer briefly.\n"},
          {"role": "user", "content": "  Leading spaces,\n\ntrailing newlines\n\n"},
          {"role": "assistant", "content": [{"type": "text", "text": "\n Sure."}, {"type": "text", "text": " Done"}]},
          {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
          {"role": "assistant", "content": "Nothing  more. "}], {}),
        ([{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": "img0.png"},
                                       {"type": "text", "text": " with "}, {"type": "image", "image": "img1.jpg"},
                                       {"type": "image", "image": "img2.png"}]},
          {"role": "assistant", "content": "The first is taller; 第二张更宽。 🚀"},
          {"role": "user", "content": [{"type": "image", "image": "img0.png"}, {"type": "text", "text": "Again?"}]},
          {"role": "assistant", "content": "Yes."}], {"img0.png": img_a, "img1.jpg": img_b, "img2.png": img_c}),
        ([{"role": "user", "content": "Code:\n```python\nprint('hi')\n```\n\t tabs"},
          {"role": "assistant", "content": "It prints `hi`.\n\n"}], {}),
    ]


def _hf_images(messages: list[dict], members: dict[str, bytes]) -> list[Image.Image]:
    refs = [it["image"] for m in messages if isinstance(m["content"], list) for it in m["content"]
            if it.get("type") == "image"]
    return [Image.open(io.BytesIO(members[r])) for r in refs]


def _collapse(ids: np.ndarray, mask: np.ndarray, pad: int) -> tuple[list[int], list[int]]:
    """Keep the first pad of each run of image pads (the template's unexpanded form)."""
    keep = np.ones(len(ids), dtype=bool)
    keep[1:] &= ~((ids[1:] == pad) & (ids[:-1] == pad))
    return ids[keep].tolist(), mask[keep].astype(int).tolist()


@pytest.mark.parametrize("conv", range(4))
def test_chat_ids_and_labels_match_transformers(hf_proc_factory, tok_dir, conv):
    messages, media = _conversations()[conv]
    proc = hf_proc_factory(MIN_DEFAULT, 1024 * 28 * 28)
    cfg = DataConfig(tokenizer=tok_dir, min_pixels=MIN_DEFAULT, max_pixels=1024 * 28 * 28, max_tokens=32768)
    ours = SampleProcessor(cfg).process(RawSample("ds/shard/k", {"json": js({"messages": messages}), **media}))

    text = proc.apply_chat_template(messages, tokenize=False)
    images = _hf_images(messages, media)
    ref = proc(text=[text], images=images or None, return_tensors="np")
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    if images:
        assert [list(g) for g in ours.image_grids] == ref["image_grid_thw"].tolist()
        rows = torch.cat([image_rows_u8(im) for im in ours.images]).numpy()
        assert float(np.abs(rows - ref["pixel_values"]).max()) < 1e-5

    # Labels: shifted targets; transformers' assistant mask marks the supervised tokens.
    tok = proc.tokenizer
    mask_out = tok.apply_chat_template(messages, chat_template=QWEN2VL_MASK_TEMPLATE, tokenize=True,
                                       return_dict=True, return_assistant_tokens_mask=True)
    ids = ours.input_ids.numpy()
    targets = np.zeros(len(ids), dtype=bool)
    targets[1:] = ours.labels.numpy()[:-1] != -100
    assert (ours.labels.numpy()[:-1][targets[1:]] == ids[1:][targets[1:]]).all()
    assert ours.labels[-1] == -100
    got_ids, got_mask = _collapse(ids, targets, tok.convert_tokens_to_ids("<|image_pad|>"))
    assert got_ids == list(mask_out["input_ids"])
    assert got_mask == list(mask_out["assistant_masks"])
    assert sum(got_mask) > 0


def test_pretrain_ids_match_transformers(hf_proc_factory, tok_dir):
    media = {"img0.png": small_image(3, 200, 150), "img1.png": small_image(0, 64, 64)}
    content = [{"type": "text", "text": "A photo of a rocket. "}, {"type": "image", "image": "img0.png"},
               {"type": "text", "text": "\nAnd an astronaut:"}, {"type": "image", "image": "img1.png"}]
    cfg = DataConfig(tokenizer=tok_dir, max_tokens=8192)
    ours = SampleProcessor(cfg).process(RawSample("ds/shard/k", {"json": js({"content": content}), **media}))
    proc = hf_proc_factory(cfg.min_pixels, cfg.max_pixels)
    text = ("A photo of a rocket. <|vision_start|><|image_pad|><|vision_end|>\nAnd an astronaut:"
            "<|vision_start|><|image_pad|><|vision_end|><|endoftext|>")
    ref = proc(text=[text], images=[Image.open(io.BytesIO(media[k])) for k in ("img0.png", "img1.png")],
               return_tensors="np")
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    # Pretraining supervises every text token (incl. <|endoftext|>), never a vision token.
    ids = ours.input_ids.numpy()
    targets = np.zeros(len(ids), dtype=bool)
    targets[1:] = ours.labels.numpy()[:-1] != -100
    vision = np.isin(ids, [proc.tokenizer.convert_tokens_to_ids(t) for t in
                           ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")])
    assert (targets[1:] == ~vision[1:]).all()


def test_grounding_boxes(hf_proc_factory, tok_dir):
    img = small_image(1, 300, 400)  # 400 wide, 300 high
    box = [100, 75, 399.9, 300]
    assert box_text(box, 400, 300) == "(250,250),(999,999)"
    assert box_text([0, 0, 1, 1], 400, 300) == "(0,0),(2,3)"
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                     {"type": "text", "text": "Where is the cup?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here: "},
                                          {"type": "box", "ref": "the cup", "box": box},
                                          {"type": "box", "box": [[0, 0, 200, 150], [200, 150, 400, 300]]}]},
    ]
    cfg = DataConfig(tokenizer=tok_dir, max_tokens=8192)
    ours = SampleProcessor(cfg).process(RawSample("d/s/k", {"json": js({"messages": messages}), "img0.png": img}))
    rendered = ("Here: <|object_ref_start|>the cup<|object_ref_end|><|box_start|>(250,250),(999,999)<|box_end|>"
                "<|box_start|>(0,0),(500,500)<|box_end|><|box_start|>(500,500),(999,999)<|box_end|>")
    ref_messages = [messages[0], {"role": "assistant", "content": rendered}]
    proc = hf_proc_factory(cfg.min_pixels, cfg.max_pixels)
    text = proc.apply_chat_template(ref_messages, tokenize=False)
    ref = proc(text=[text], images=[Image.open(io.BytesIO(img))], return_tensors="np")
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    # The boxes are part of the assistant's answer: supervised.
    box_start = proc.tokenizer.convert_tokens_to_ids("<|box_start|>")
    assert (ours.labels == box_start).sum() == 3
