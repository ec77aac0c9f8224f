"""Parity with each family's transformers processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): images (grids exact, pixels
< 1e-5), input_ids, labels and position ids, a real video, and whole packed microbatches of the loader.

The oracles are transformers 5.23's: the family's processor class (Qwen2VLProcessor, Qwen2_5_VLProcessor,
Qwen3VLProcessor) around Qwen2VLImageProcessorPil with the family's patch size and mean / std (PIL bicubic resize,
as our loader), the real Qwen2 tokenizer files and the family's chat template (Qwen3-VL's inserts no default
system prompt); supervised positions come from transformers' `return_assistant_tokens_mask` with a
{% generation %} variant of the same template; position ids from the family's own get_rope_index (its model built
on the meta device). Videos: transformers' video processors need torchvision (absent), so a real H.264 clip goes
through their pure functions (datahelpers.video_reference).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from datahelpers import (
    DEFAULT_SYSTEMS,
    encode,
    encode_video,
    hf_position_ids,
    hf_video_chat,
    js,
    mask_template,
    skimage_rgb,
    small_image,
    video_reference,
    write_dataset,
)
from PIL import Image

from data.chatml import box_text
from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.media.image import load_image
from data.media.vision import AspectRatioError, image_rows_u8
from data.sample import RawSample, SampleProcessor
from model.vision import normalize_pixel_rows

# Image pixel bounds in merged tokens (x the family's factor^2): qwen-vl-utils' defaults, the paper's ablation, small.
PIXEL_TOKENS = [(4, 16384), (100, 16384), (4, 256)]


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


@pytest.mark.parametrize("min_tokens,max_tokens", PIXEL_TOKENS)
def test_image_parity_with_transformers(hf_proc_factory, family, vision, min_tokens, max_tokens):
    f2 = vision.factor ** 2
    ip = hf_proc_factory(min_tokens * f2, max_tokens * f2, family).image_processor
    default = (min_tokens, max_tokens) == PIXEL_TOKENS[0]  # the family's default bounds: leave them unset
    for name, data in IMAGES.items():
        ours = load_image(data, None if default else min_tokens * f2, None if default else max_tokens * f2,
                          vision=vision)
        rows = image_rows_u8(ours.pixels_HWC, vision)
        ref = ip(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        assert tuple(ref["image_grid_thw"][0]) == ours.grid_thw, name
        assert rows.shape == ref["pixel_values"].shape, name
        diff = float(np.abs(rows.numpy() - ref["pixel_values"]).max())
        assert diff < 1e-5, f"{name}: max |diff| = {diff}"


def test_extreme_aspect_ratio_is_rejected_like_transformers(hf_proc_factory, family, vision):
    data = encode(skimage_rgb("astronaut")[:2, :500], "PNG")  # 2 x 500: aspect ratio 250
    with pytest.raises(AspectRatioError):
        load_image(data, vision=vision)
    with pytest.raises(ValueError, match="aspect ratio"):
        hf_proc_factory(vision.min_pixels, vision.max_pixels, family).image_processor(
            images=[Image.open(io.BytesIO(data))])


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


def _targets(labels: torch.Tensor) -> np.ndarray:
    """targets[t]: token t is supervised (labels are shifted: labels[t - 1] predicts it)."""
    t = np.zeros(labels.numel(), dtype=bool)
    t[1:] = labels.numpy()[:-1] != -100
    return t


def _hf_chat(proc, messages: list[dict], media: dict[str, bytes]) -> dict:
    """transformers' processor on a chat of text and images: input_ids, grids, pixel rows."""
    text = proc.apply_chat_template(messages, tokenize=False)
    images = _hf_images(messages, media)
    return proc(text=[text], images=images or None, return_tensors="pt")


@pytest.mark.parametrize("conv", range(4))
def test_chat_ids_labels_and_positions_match_transformers(hf_proc_factory, tok_dir, family, vision, conv):
    messages, media = _conversations()[conv]
    max_pixels = 1024 * vision.factor ** 2
    proc = hf_proc_factory(vision.min_pixels, max_pixels, family)
    cfg = DataConfig(tokenizer=tok_dir, max_pixels=max_pixels, max_tokens=32768)
    ours = SampleProcessor(cfg, vision=vision).process(RawSample("ds/shard/k", {"json": js({"messages": messages}),
                                                                                **media}))
    ref = _hf_chat(proc, messages, media)
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    grids = ref.get("image_grid_thw")
    if media:
        assert [list(g) for g in ours.image_grids] == grids.tolist()
        rows = torch.cat([image_rows_u8(im, vision) for im in ours.images])
        assert float((rows - ref["pixel_values"]).abs().max()) < 1e-5
    assert torch.equal(ours.position_ids, hf_position_ids(family, ref["input_ids"][0], grids))

    # Labels: shifted targets; transformers' assistant mask marks the supervised tokens.
    tok = proc.tokenizer
    mask_out = tok.apply_chat_template(messages, chat_template=mask_template(DEFAULT_SYSTEMS[family]), tokenize=True,
                                       return_dict=True, return_assistant_tokens_mask=True)
    ids = ours.input_ids.numpy()
    targets = _targets(ours.labels)
    assert (ours.labels.numpy()[:-1][targets[1:]] == ids[1:][targets[1:]]).all()
    assert ours.labels[-1] == -100
    got_ids, got_mask = _collapse(ids, targets, tok.convert_tokens_to_ids("<|image_pad|>"))
    assert got_ids == list(mask_out["input_ids"])
    assert got_mask == list(mask_out["assistant_masks"])
    assert sum(got_mask) > 0


def test_default_system_prompt_is_the_familys(tok_dir, family, vision):
    """`auto` is the family's chat template's (Qwen3-VL: none); an explicit string or null works for every family."""
    from data.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_dir)
    msg = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}

    def ids(**kw) -> list[int]:
        p = SampleProcessor(DataConfig(tokenizer=tok_dir, **kw), vision=vision)
        return p.process(RawSample("d/s/k", {"json": js(msg)})).input_ids.tolist()

    turn = tok.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    default = DEFAULT_SYSTEMS[family]
    system = [] if default is None else tok.encode(f"<|im_start|>system\n{default}<|im_end|>\n")
    assert ids() == system + turn
    assert ids(default_system=None) == turn
    assert ids(default_system="Be brief.") == tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n") + turn


def test_pretrain_ids_match_transformers(hf_proc_factory, tok_dir, family, vision):
    media = {"img0.png": small_image(3, 200, 150), "img1.png": small_image(0, 64, 64)}
    content = [{"type": "text", "text": "A photo of a rocket. "}, {"type": "image", "image": "img0.png"},
               {"type": "text", "text": "\nAnd an astronaut:"}, {"type": "image", "image": "img1.png"}]
    cfg = DataConfig(tokenizer=tok_dir, max_tokens=8192)
    ours = SampleProcessor(cfg, vision=vision).process(RawSample("ds/shard/k", {"json": js({"content": content}),
                                                                                **media}))
    proc = hf_proc_factory(vision.min_pixels, vision.max_pixels, family)
    text = ("A photo of a rocket. <|vision_start|><|image_pad|><|vision_end|>\nAnd an astronaut:"
            "<|vision_start|><|image_pad|><|vision_end|><|endoftext|>")
    ref = proc(text=[text], images=[Image.open(io.BytesIO(media[k])) for k in ("img0.png", "img1.png")],
               return_tensors="pt")
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(ours.position_ids, hf_position_ids(family, ref["input_ids"][0], ref["image_grid_thw"]))
    # Pretraining supervises every text token (incl. <|endoftext|>), never a vision token.
    ids = ours.input_ids.numpy()
    targets = _targets(ours.labels)
    vision_ids = np.isin(ids, [proc.tokenizer.convert_tokens_to_ids(t) for t in
                               ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")])
    assert (targets[1:] == ~vision_ids[1:]).all()


def test_grounding_boxes(hf_proc_factory, tok_dir, family, vision):
    """Boxes render the same for every family: pixel coordinates of the original image scaled to [0, 1000)."""
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
    ours = SampleProcessor(cfg, vision=vision).process(RawSample("d/s/k", {"json": js({"messages": messages}),
                                                                           "img0.png": img}))
    rendered = ("Here: <|object_ref_start|>the cup<|object_ref_end|><|box_start|>(250,250),(999,999)<|box_end|>"
                "<|box_start|>(0,0),(500,500)<|box_end|><|box_start|>(500,500),(999,999)<|box_end|>")
    ref_messages = [messages[0], {"role": "assistant", "content": rendered}]
    proc = hf_proc_factory(vision.min_pixels, vision.max_pixels, family)
    text = proc.apply_chat_template(ref_messages, tokenize=False)
    ref = proc(text=[text], images=[Image.open(io.BytesIO(img))], return_tensors="np")
    assert ours.input_ids.tolist() == ref["input_ids"][0].tolist()
    # The boxes are part of the assistant's answer: supervised.
    box_start = proc.tokenizer.convert_tokens_to_ids("<|box_start|>")
    assert (ours.labels == box_start).sum() == 3


# --------------------------------------------------------------------------------------------- videos
@pytest.fixture(scope="module")
def clip() -> bytes:
    """A real H.264 clip (the astronaut panning), 1280x720, 25 frames at 8 fps: 6 frames sampled at 2 fps (fps_used
    1.92, so Qwen2.5-VL's seconds per frame pair are 1.0417 and Qwen3-VL's timestamps 0.3 / 1.5 / 2.7 s), each frame
    above 768 merged tokens (the per-frame cap binds)."""
    return encode_video(1280, 720, 25, fps=8)


VIDEO_CHAT = [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                           {"type": "video", "video": "vid0.mp4"},
                                           {"type": "text", "text": "What happens?"}]},
              {"role": "assistant", "content": "The astronaut slides to the right."}]
VIDEO_MAX_TOKENS = 4096  # data.max_tokens of the video tests: the automatic video cap is 3072 tokens


def test_video_sample_matches_transformers(hf_proc_factory, tok_dir, family, vision, clip):
    media = {"img0.png": small_image(0, 56, 84), "vid0.mp4": clip}
    cfg = DataConfig(tokenizer=tok_dir, max_tokens=VIDEO_MAX_TOKENS)
    sp = SampleProcessor(cfg, vision=vision)
    ours = sp.process(RawSample("ds/shard/k", {"json": js({"messages": VIDEO_CHAT}), **media}))
    ref_video = video_reference(family, clip, sp.vcfg.max_tokens)
    ref = hf_video_chat(hf_proc_factory(vision.min_pixels, vision.max_pixels, family), family, VIDEO_CHAT, media,
                       ref_video)
    assert ours.video_grids == [ref_video["grid"]] and ref_video["grid"][0] == 3
    assert ours.input_ids.tolist() == ref["input_ids"].tolist()
    assert torch.equal(ours.position_ids, ref["position_ids"])
    rows = normalize_pixel_rows(ours.video_rows[0], vision)
    assert rows.shape == ref_video["rows"].shape
    assert float((rows - ref_video["rows"]).abs().max()) < 1e-5
    if family != "qwen3_vl":
        # transformers 5.x's own rope index advances by max(h, w) / 2 after a vision block where the reference
        # advances past its largest id (docs/model.md): this clip's temporal ids stay below its merged sides, so the
        # two agree and transformers is the oracle here.
        t, h, w = ref_video["grid"]
        spt = ref_video["second_per_grid_ts"] or 0.5  # Qwen2-VL: temporal id = pair index
        assert int((t - 1) * spt * 2) < min(h, w) // 2
    # Supervised: the assistant's answer and its <|im_end|> (not the turn's header or final newline), nothing of
    # the video (its timestamps included).
    ids, targets = ours.input_ids, _targets(ours.labels)
    answer = int(torch.nonzero(ids == proc_special(tok_dir).im_start)[-1]) + 3  # after <|im_start|>assistant\n
    assert np.nonzero(targets)[0].tolist() == list(range(answer, ids.numel() - 1))


def proc_special(tok_dir: str):
    from data.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir).special


def test_loader_microbatches_match_transformers(tmp_path, hf_proc_factory, tok_dir, family, vision, clip):
    """Whole packed microbatches of build_loader for the family: every sample's slice of the tokens, position ids
    (restarting at 0), pixel rows and grids equals transformers' processing of that sample alone."""
    convs = _conversations()
    samples = [("video", {"json": js({"messages": VIDEO_CHAT}), "img0.png": small_image(0, 56, 84),
                          "vid0.mp4": clip})]
    samples += [(f"chat{i}", {"json": js({"messages": m}), **media}) for i, (m, media) in enumerate(convs)]
    root = write_dataset(tmp_path / "ds", samples)
    cfg = DataConfig(datasets=[DatasetSpec(root)], tokenizer=tok_dir, max_tokens=VIDEO_MAX_TOKENS, num_workers=0,
                     epochs=1, shuffle_buffer=0, pack_buffer=8)
    loader = build_loader(cfg, 0, 1, vision=vision)
    batches = list(loader)
    assert sum(len(b.sample_keys) for b in batches) == len(samples) and max(len(b.sample_keys) for b in batches) > 1
    proc = hf_proc_factory(vision.min_pixels, vision.max_pixels, family)
    ref_video = video_reference(family, clip, cfg.resolved_video(vision).max_tokens)
    by_key = dict(samples)
    for b in batches:
        b.validate()
        assert b.pixel_values.shape[1] == 3 * vision.patch_size ** 2  # raw rows: one frame per image row
        assert b.pixel_values_videos.shape[1] == 3 * 2 * vision.patch_size ** 2
        cu, img_row, vid_row, g_img, g_vid = b.cu_seqlens.tolist(), 0, 0, 0, 0
        for key, s, e in zip(b.sample_keys, cu[:-1], cu[1:]):
            members = by_key[key.rsplit("/", 1)[-1]]
            messages = _messages(members)
            media = {k: v for k, v in members.items() if k != "json"}
            if "vid0.mp4" in media:
                ref = hf_video_chat(proc, family, messages, media, ref_video)
                ref_rows = ref_video["rows"]
                vrows = b.pixel_values_videos[vid_row: vid_row + ref_rows.shape[0]]
                assert float((normalize_pixel_rows(vrows, vision) - ref_rows).abs().max()) < 1e-5
                assert b.video_grid_thw[g_vid].tolist() == list(ref_video["grid"])
                vid_row, g_vid = vid_row + ref_rows.shape[0], g_vid + 1
            else:
                ref = _hf_chat(proc, messages, media)
                ref["position_ids"] = hf_position_ids(family, ref["input_ids"][0], ref.get("image_grid_thw"))
                ref["input_ids"] = ref["input_ids"][0]
            assert b.input_ids[s:e].tolist() == ref["input_ids"].tolist(), key
            assert torch.equal(b.position_ids[:, s:e], ref["position_ids"]), key
            assert int(b.position_ids[:, s].abs().sum()) == 0  # every sample restarts
            grids = ref.get("image_grid_thw")
            n = 0 if grids is None else grids.shape[0]
            if n:
                assert torch.equal(b.image_grid_thw[g_img: g_img + n], grids), key
                n_rows = int(grids.prod(-1).sum())
                rows = normalize_pixel_rows(b.pixel_values[img_row: img_row + n_rows], vision)
                ref_rows = ref["pixel_values"] if "pixel_values" in ref else proc.image_processor(
                    images=_hf_images(messages, media), return_tensors="pt")["pixel_values"]
                assert float((rows - ref_rows).abs().max()) < 1e-5, key
                img_row, g_img = img_row + n_rows, g_img + n
        assert img_row == b.pixel_values.shape[0] and vid_row == b.pixel_values_videos.shape[0]
        # The packed sequence's ids are the family's packed position ids (one call over the microbatch).
        spt = [ref_video["second_per_grid_ts"]] * b.video_grid_thw.shape[0] if family == "qwen2_5_vl" else None
        assert torch.equal(b.position_ids, vision.packed_position_ids(
            b.input_ids, b.cu_seqlens, b.image_grid_thw, b.video_grid_thw, spt))


def _messages(members: dict[str, bytes]) -> list[dict]:
    import json

    return json.loads(members["json"])["messages"]
