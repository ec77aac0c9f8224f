"""Converters from other tools' dataset formats (data/shards/convert.py, `python -m data.shards make --format`).

For each format, records from the tool's own documentation are converted, rendered through our ChatML and
tokenized with the real Qwen2 tokenizer; the ids must equal the source rendered the way its tool renders it for
Qwen2-VL. The oracles (written here from the tools' documented templates, never from our converter):

- llava: the typed messages Qwen's qwen-vl-finetune `_build_messages` makes of the record (written out by hand
  per example) through transformers' Qwen2VLProcessor chat template (Qwen2-VL-Instruct's);
- sharegpt / llamafactory: LLaMA-Factory's `qwen2_vl` template (its ChatML slots, default system, each element
  tokenized on its own as `Template._convert_elements_to_ids` does) after its `Qwen2VLPlugin.process_messages`
  (each tag replaced in place by the vision block);
- swift: ms-swift's qwen2_vl template (ChatmlTemplateMeta slots, `replace_tag` / `replace_ref` /
  `replace_bbox`, `normalize_bbox`), checked for grounding against the docs' own Qwen2-VL rendering of the
  same records.

Pads: the i-th image renders as 3 + i `<|image_pad|>`, the i-th video as 5 + i `<|video_pad|>` in both.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest
from datahelpers import encode, encode_video, skimage_rgb, small_image

from data.chatml import SkipSample, VisionInfo, parse_sample, render, tokenize
from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.shards import INDEX_SUFFIX, MANIFEST
from data.shards.convert import llamafactory, llava, read_records, sharegpt, swift
from data.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMG_PAD, VID_PAD = "<|image_pad|>", "<|video_pad|>"
IMG_BLOCK, VID_BLOCK = f"<|vision_start|>{IMG_PAD}<|vision_end|>", f"<|vision_start|>{VID_PAD}<|vision_end|>"


def _img_n(i: int) -> int:
    return 3 + i


def _vid_n(i: int) -> int:
    return 5 + i


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(hf_proc_factory):
    return hf_proc_factory(4 * 28 * 28, 16384 * 28 * 28).tokenizer


def ours_ids(sample: dict, tok: Tokenizer, sizes: dict[str, tuple[int, int]] | None = None) -> list[int]:
    """Our ChatML rendering of a converted sample: the i-th image gets 3 + i pads, the i-th video 5 + i."""
    parsed = parse_sample(json.loads(json.dumps(sample)))
    vision, n_img, n_vid = [], 0, 0
    for kind, ref in parsed.media:
        if kind == "image":
            vision.append(VisionInfo("image", _img_n(n_img), (sizes or {}).get(ref)))
            n_img += 1
        else:
            vision.append(VisionInfo("video", _vid_n(n_vid), None))
            n_vid += 1
    ids, _ = tokenize(render(parsed, vision, tok.special), vision, tok)
    return ids.tolist()


def expand_pads(text: str) -> str:
    """The processor's step: each image / video block gets its pads (3 + i, 5 + i)."""
    count = {"image": 0, "video": 0}

    def sub(m: re.Match) -> str:
        kind = "image" if m.group(1) == IMG_PAD else "video"
        n = (_img_n if kind == "image" else _vid_n)(count[kind])
        count[kind] += 1
        return "<|vision_start|>" + m.group(1) * n + "<|vision_end|>"

    return re.sub(r"<\|vision_start\|>(<\|image_pad\|>|<\|video_pad\|>)<\|vision_end\|>", sub, text)


def qwen2vl_template_ids(messages: list[dict], proc) -> list[int]:
    """transformers' Qwen2VLProcessor chat template (Qwen2-VL-Instruct's), pads expanded, real tokenizer."""
    text = proc.apply_chat_template(messages, tokenize=False)
    return proc.tokenizer(expand_pads(text), add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------- llava
# (record, the messages Qwen's qwen-vl-finetune `_build_messages` makes of it: a human turn split at the tags,
# its text pieces stripped, a gpt turn as is)
LLAVA_CASES = [
    # haotian-liu/LLaVA docs/Finetune_Custom_Data.md
    ({"id": "997bb945-628d-4724-b370-b84de974a19f",
      "image": "part-000001/997bb945-628d-4724-b370-b84de974a19f.jpg",
      "conversations": [
          {"from": "human", "value": "<image>\nWrite a prompt for Stable Diffusion to generate this image."},
          {"from": "gpt", "value": "a beautiful painting of chernobyl by nekro, pascal blanche, john harris, greg "
                                   "rutkowski, sin jong hun, moebius, simon stalenhag. in style of cg art. ray "
                                   "tracing. cel shading. hyper detailed. realistic. ue 5. maya. octane render. "}]},
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Write a prompt for Stable Diffusion "
                                                                           "to generate this image."}]},
      {"role": "assistant", "content": [{"type": "text", "text": "a beautiful painting of chernobyl by nekro, pascal "
       "blanche, john harris, greg rutkowski, sin jong hun, moebius, simon stalenhag. in style of cg art. ray "
       "tracing. cel shading. hyper detailed. realistic. ue 5. maya. octane render. "}]}]),
    # LLaVA-Instruct-150K, its first record (multi-turn)
    ({"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                        {"from": "gpt", "value": "The bus in the image is white and red."},
                        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
     [{"role": "user", "content": [{"type": "image"},
                                   {"type": "text", "text": "What are the colors of the bus in the image?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "The bus in the image is white and red."}]},
      {"role": "user", "content": [{"type": "text", "text": "What feature can be seen on the back of the bus?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "The back of the bus features an advertisement."}]}]),
    # LLaVA-Pretrain (blip_laion_cc_sbu_558k): the tag after the prompt
    ({"id": "004539375", "image": "00453/004539375.jpg",
      "conversations": [{"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
     [{"role": "user", "content": [{"type": "text", "text": "Render a clear and concise summary of the photo."},
                                   {"type": "image"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "select luxury furniture 3 - inch gel memory foam "
                                                                 "mattress topper"}]}]),
    # QwenLM qwen-vl-finetune/README.md: multi-image, video
    ({"images": ["cats/001.jpg", "cats/002.jpg"],
      "conversations": [{"from": "human",
                         "value": "<image>\n<image>\nWhat are the differences between these two cats?"},
                        {"from": "gpt", "value": "The first cat is an orange tabby with short fur and green eyes, "
                                                 "while the second is a gray Siamese with blue eyes."}]},
     [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What are the "
                                   "differences between these two cats?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "The first cat is an orange tabby with short fur and "
                                                                 "green eyes, while the second is a gray Siamese with "
                                                                 "blue eyes."}]}]),
    ({"video": "videos/005.mp4",
      "conversations": [{"from": "human", "value": "<video>\nWhat caused the blue object to move?\nOptions:\n(A) "
                                                   "Gravity\n(B) Collision\n(C) Magnetic force"},
                        {"from": "gpt", "value": "Answer: (B) Collision"}]},
     [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What caused the blue object to move?"
                                   "\nOptions:\n(A) Gravity\n(B) Collision\n(C) Magnetic force"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "Answer: (B) Collision"}]}]),
    # LLaVA-Video style: a `video` record whose placeholder is <image> (LLaVA-NeXT's convention)
    ({"id": "v_7bUu05RIksU", "video": "academic_source/activitynet/v_7bUu05RIksU.mp4",
      "conversations": [{"from": "human", "value": "<image>\nWhat is the man doing after he picks up the brush?"},
                        {"from": "gpt", "value": "He paints the fence."}]},
     [{"role": "user", "content": [{"type": "video"},
                                   {"type": "text", "text": "What is the man doing after he picks up the brush?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "He paints the fence."}]}]),
]


@pytest.mark.parametrize("record,messages", LLAVA_CASES, ids=["llava_docs", "llava_instruct", "llava_pretrain",
                                                             "qwen_multi_image", "qwen_video", "llava_video"])
def test_llava_matches_qwen_finetune_rendering(record, messages, tok, hf_proc_factory):
    proc = hf_proc_factory(4 * 28 * 28, 16384 * 28 * 28)
    sample = llava(json.loads(json.dumps(record)))
    assert ours_ids(sample, tok) == qwen2vl_template_ids(messages, proc)
    refs = [r for k in ("image", "images", "video") for r in ([record[k]] if isinstance(record.get(k), str)
                                                             else record.get(k) or [])]
    assert [ref for _, ref in parse_sample(sample).media] == refs


# ------------------------------------------------------------------------------------------------- LLaMA-Factory
LF_SYSTEM = "<|im_start|>system\n{{content}}<|im_end|>\n"
LF_USER = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"
LF_ASSISTANT = "{{content}}<|im_end|>\n"
LF_DEFAULT_SYSTEM = "You are a helpful assistant."


def llamafactory_ids(system: str, turns: list[tuple[str, str]], hf_tok) -> list[int]:
    """LLaMA-Factory's qwen2_vl template (data/template.py) after Qwen2VLPlugin.process_messages (mm_plugin.py)."""
    n = {"image": 0, "video": 0}
    ids: list[int] = []
    for i, (role, content) in enumerate(turns):
        while "<image>" in content:  # process_messages: in place, in order
            block = "<|vision_start|>" + IMG_PAD * _img_n(n["image"]) + "<|vision_end|>"
            content = content.replace("<image>", block, 1)
            n["image"] += 1
        while "<video>" in content:
            block = "<|vision_start|>" + VID_PAD * _vid_n(n["video"]) + "<|vision_end|>"
            content = content.replace("<video>", block, 1)
            n["video"] += 1
        elements = []
        if i == 0:
            elements.append(LF_SYSTEM.replace("{{content}}", system or LF_DEFAULT_SYSTEM))
        elements.append((LF_USER if role == "user" else LF_ASSISTANT).replace("{{content}}", content))
        for e in elements:  # Template._convert_elements_to_ids: each element encoded on its own
            ids += hf_tok.encode(e, add_special_tokens=False)
    return ids


# LLaMA-Factory data/mllm_demo.json (records 1-3) and data/mllm_video_demo.json (records 1-2), its `messages`
# layout; and its data/README.md sharegpt examples (`conversations` / from / value, `system`).
MLLM_DEMO = [
    {"messages": [{"content": "<image>Who are they?", "role": "user"},
                  {"content": "They're Kane and Gretzka from Bayern Munich.", "role": "assistant"},
                  {"content": "What are they doing?<image>", "role": "user"},
                  {"content": "They are celebrating on the soccer field.", "role": "assistant"}],
     "images": ["mllm_demo_data/1.jpg", "mllm_demo_data/1.jpg"]},
    {"messages": [{"content": "<image>Who is he?", "role": "user"},
                  {"content": "He's Thomas Muller from Bayern Munich.", "role": "assistant"},
                  {"content": "Why is he on the ground?", "role": "user"},
                  {"content": "Because he's sliding on his knees to celebrate.", "role": "assistant"}],
     "images": ["mllm_demo_data/2.jpg"]},
    {"messages": [{"content": "<image>Please describe this image", "role": "user"},
                  {"content": "Chinese astronaut Gui Haichao is giving a speech.", "role": "assistant"},
                  {"content": "What has he accomplished?", "role": "user"},
                  {"content": "He was appointed to be a payload specialist on Shenzhou 16 mission in June 2022, thus "
                              "becoming the first Chinese civilian of Group 3 in space on 30 May 2023. He is "
                              "responsible for the on-orbit operation of space science experimental payloads.",
                   "role": "assistant"}],
     "images": ["mllm_demo_data/3.jpg"]},
]
MLLM_VIDEO_DEMO = [
    {"messages": [{"content": "<video>Why is this video funny?", "role": "user"},
                  {"content": "Because a baby is reading, and he is so cute!", "role": "assistant"}],
     "videos": ["mllm_demo_data/1.mp4"]},
    {"messages": [{"content": "<video>What is she doing?", "role": "user"},
                  {"content": "She is cooking.", "role": "assistant"}],
     "videos": ["mllm_demo_data/2.avi"]},
]
SHAREGPT_DEMO = [
    {"conversations": [{"from": "human", "value": "<image>user instruction"},
                       {"from": "gpt", "value": "model response"}],
     "images": ["image path (required)"]},
    {"conversations": [{"from": "human", "value": "<video>user instruction"},
                       {"from": "gpt", "value": "model response"}],
     "videos": ["video path (required)"]},
    {"conversations": [{"from": "human", "value": "user instruction"}, {"from": "gpt", "value": "model response"}],
     "system": "system prompt (optional)"},
    # the system tag as the first message, whitespace around a tag (kept: process_messages replaces in place)
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Look:\n<image> \nand?"},
                       {"from": "gpt", "value": " A cat.\n"}], "images": ["a.jpg"]},
]


def _lf_turns(rec: dict, key: str, role: str, content: str, user: str) -> tuple[str, list[tuple[str, str]]]:
    msgs = rec[key]
    system = rec.get("system", "")
    if msgs[0][role] == "system":
        system, msgs = msgs[0][content], msgs[1:]
    return system, [("user" if m[role] == user else "assistant", m[content]) for m in msgs]


@pytest.mark.parametrize("record", MLLM_DEMO + MLLM_VIDEO_DEMO)
def test_llamafactory_matches_its_qwen2_vl_template(record, tok, hf_tok):
    system, turns = _lf_turns(record, "messages", "role", "content", "user")
    assert ours_ids(llamafactory(json.loads(json.dumps(record))), tok) == llamafactory_ids(system, turns, hf_tok)


@pytest.mark.parametrize("record", SHAREGPT_DEMO)
def test_sharegpt_matches_llamafactory_qwen2_vl_template(record, tok, hf_tok):
    system, turns = _lf_turns(record, "conversations", "from", "value", "human")
    assert ours_ids(sharegpt(json.loads(json.dumps(record))), tok) == llamafactory_ids(system, turns, hf_tok)


@pytest.mark.parametrize("record,reason", [
    # data/README.md's sharegpt SFT example: tool turns
    ({"conversations": [{"from": "human", "value": "user instruction"}, {"from": "function_call", "value": "args"},
                        {"from": "observation", "value": "tool result"}, {"from": "gpt", "value": "model response"}],
      "system": "system prompt (optional)", "tools": "tool description (optional)"}, "unsupported_tools"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "args"}]},
     "unsupported_role"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}, "bad_turns"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "bad_turns"),
    ({"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
     "media_count_mismatch"),
    ({"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}],
      "images": ["1.jpg", "2.jpg"]}, "media_count_mismatch"),
    ({"conversations": [{"from": "human", "value": "<video>q"}, {"from": "gpt", "value": "a"}],
      "videos": [["f0.jpg", "f1.jpg"]]}, "unsupported_media"),
])
def test_sharegpt_records_llamafactory_refuses_are_skips(record, reason):
    with pytest.raises(SkipSample) as e:
        sharegpt(record)
    assert e.value.reason == reason


# ------------------------------------------------------------------------------------------------- ms-swift
SW_SYSTEM = "<|im_start|>system\n{{SYSTEM}}<|im_end|>\n"
SW_PROMPT = "<|im_start|>user\n{{QUERY}}<|im_end|>\n<|im_start|>assistant\n"
SW_CHAT_SEP, SW_SUFFIX = "<|im_end|>\n", "<|im_end|>"


def swift_ids(system: str | None, turns: list[tuple[str, str]], hf_tok,
              objects: dict | None = None, sizes: list[tuple[int, int]] | None = None) -> list[int]:
    """ms-swift's qwen2_vl template: ChatmlTemplateMeta slots (default system 'You are a helpful assistant.'),
    Qwen2VLTemplate.replace_tag / replace_ref / replace_bbox, Template.normalize_bbox (norm1000), each context
    encoded on its own."""
    refs = list((objects or {}).get("ref") or [])
    boxes = [list(b) for b in (objects or {}).get("bbox") or []]
    image_ids = list((objects or {}).get("image_id") or []) + [0] * len(boxes)
    for b, i in zip(boxes, image_ids):  # normalize_bbox, bbox_type 'real'
        w, h = sizes[i]
        for j in range(0, len(b), 2):
            b[j], b[j + 1] = int(round(b[j] / w * 1000)), int(round(b[j + 1] / h * 1000))
    n = {"<image>": 0, "<video>": 0, "<ref-object>": 0, "<bbox>": 0}

    def tag(m: re.Match) -> str:  # _pre_tokenize: each tag takes the next entry of its kind
        t = m.group(0)
        k, n[t] = n[t], n[t] + 1
        if t == "<image>":
            return "<|vision_start|>" + IMG_PAD * _img_n(k) + "<|vision_end|>"
        if t == "<video>":
            return "<|vision_start|>" + VID_PAD * _vid_n(k) + "<|vision_end|>"
        if t == "<ref-object>":
            return f"<|object_ref_start|>{refs[k]}<|object_ref_end|>"
        return "<|box_start|>" + ",".join(f"({x},{y})" for x, y in zip(boxes[k][::2], boxes[k][1::2])) + "<|box_end|>"

    def fill(text: str) -> str:
        return re.sub("<image>|<video>|<ref-object>|<bbox>", tag, text)

    parts = [SW_SYSTEM.replace("{{SYSTEM}}", "You are a helpful assistant." if system is None else system)]
    pairs = list(zip(turns[::2], turns[1::2]))
    for k, ((_, q), (_, a)) in enumerate(pairs):
        parts += [SW_PROMPT.replace("{{QUERY}}", fill(q)), fill(a), SW_CHAT_SEP if k < len(pairs) - 1 else SW_SUFFIX]
    return [t for p in parts for t in hf_tok.encode(p, add_special_tokens=False)]


# docs/source_en/Customization/Custom-dataset.md, "Supervised Fine-tuning" and "Multimodal"
SWIFT_SFT = [
    {"messages": [{"role": "system", "content": "You are a useful and harmless math calculator"},
                  {"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "It equals 2"},
                  {"role": "user", "content": "What about adding 1?"},
                  {"role": "assistant", "content": "It equals 3"}]},
    {"messages": [{"role": "user", "content": "Where is the capital of Zhejiang?"},
                  {"role": "assistant", "content": "The capital of Zhejiang is Hangzhou."}]},
    {"messages": [{"role": "user", "content": "<image><image>What is the difference between the two images?"},
                  {"role": "assistant", "content": "The first one is a kitten, and the second one is a puppy."}],
     "images": ["/xxx/x.jpg", "/xxx/x.png"]},
    {"messages": [{"role": "system", "content": "You are a helpful and harmless assistant."},
                  {"role": "user", "content": "<image>What is in the image, <video>What is in the video?"},
                  {"role": "assistant", "content": "The image shows an elephant, and the video shows a puppy running "
                                                   "on the grass."}],
     "images": ["/xxx/x.jpg"], "videos": ["/xxx/x.mp4"]},
]


def _swift_turns(rec: dict) -> tuple[str | None, list[tuple[str, str]]]:
    msgs = rec["messages"]
    if msgs[0]["role"] == "system":
        return msgs[0]["content"], [(m["role"], m["content"]) for m in msgs[1:]]
    return None, [(m["role"], m["content"]) for m in msgs]


@pytest.mark.parametrize("record", SWIFT_SFT)
def test_swift_matches_its_qwen2_vl_template(record, tok, hf_tok):
    ours = ours_ids(swift(json.loads(json.dumps(record))), tok)
    ref = swift_ids(*_swift_turns(record), hf_tok)
    # swift's template ends the last turn with `<|im_end|>` (its suffix); Qwen2-VL's chat template and ours with
    # `<|im_end|>\n`: that one token is the whole difference.
    assert ours[:-1] == ref and ours[-1] == hf_tok.encode("\n", add_special_tokens=False)[0]


# Grounding, the docs' ms-swift format (option 2) and its own Qwen2-VL rendering of the same records (option 1).
# The images are the sizes at which the two agree: 1500x1800, 900x800, 2500x2000 (e.g. 331.5 / 1500 -> 221).
SWIFT_GROUNDING = [
    ({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "<image>Describe the image."},
                   {"role": "assistant", "content": "<ref-object><bbox> and <ref-object><bbox> are playing on the "
                                                    "beach"}],
      "images": ["/xxx/x.jpg"], "objects": {"ref": ["a dog", "a woman"], "bbox": [[331.5, 761.4, 853.5, 1594.8],
                                                                                  [676.5, 685.8, 1099.5, 1427.4]]}},
     (1500, 1800), "<image>Describe the image.",
     "<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(221,423),(569,886)<|box_end|> and "
     "<|object_ref_start|>a woman<|object_ref_end|><|box_start|>(451,381),(733,793)<|box_end|> are playing on the "
     "beach"),
    ({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "<image>Find the <ref-object> in the image"},
                   {"role": "assistant", "content": "<bbox><bbox>"}],
      "images": ["/xxx/x.jpg"], "objects": {"ref": ["sheep"], "bbox": [[90.9, 160.8, 135, 212.8],
                                                                      [360.9, 480.8, 495, 532.8]]}},
     (900, 800), "<image>Find the <|object_ref_start|>sheep<|object_ref_end|> in the image",
     "<|box_start|>(101,201),(150,266)<|box_end|><|box_start|>(401,601),(550,666)<|box_end|>"),
    ({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "<image>Help me open Google Chrome"},
                   {"role": "assistant", "content": "Action: click(start_box='<bbox>')"}],
      "images": ["/xxx/x.jpg"], "objects": {"ref": [], "bbox": [[615, 226]]}},
     (2500, 2000), "<image>Help me open Google Chrome", "Action: click(start_box='<|box_start|>(246,113)<|box_end|>')"),
]


@pytest.mark.parametrize("record,size,user,answer", SWIFT_GROUNDING)
def test_swift_grounding_matches_the_docs_qwen2vl_rendering(record, size, user, answer, tok, hf_tok):
    sample = swift(json.loads(json.dumps(record)), lambda ref: size)
    ours = ours_ids(sample, tok)
    system, turns = _swift_turns(record)
    assert ours[:-1] == swift_ids(system, turns, hf_tok, record["objects"], [size])
    # option 1 of the docs: the same record already in Qwen2-VL's grounding text
    assert ours[:-1] == swift_ids(system, [("user", user), ("assistant", answer)], hf_tok)


def test_swift_box_rounding_image_id_and_norm1(tok, hf_tok):
    # A coordinate where round() and floor() differ (200 / 300 -> 666.7), boxes on the second image, and
    # bbox_type norm1: swift's normalize_bbox, not our pixel-box item's floor.
    rec = {"messages": [{"role": "user", "content": "<image><image>Where?"},
                        {"role": "assistant", "content": "<bbox> then <bbox>"}],
           "images": ["a.png", "b.png"], "objects": {"bbox": [[200, 100, 250, 149], [10, 20, 30, 41]],
                                                     "image_id": [1, 0]}}
    sizes = {"a.png": (640, 480), "b.png": (300, 300)}
    ours = ours_ids(swift(json.loads(json.dumps(rec)), sizes.__getitem__), tok)
    assert ours[:-1] == swift_ids(None, _swift_turns(rec)[1], hf_tok, rec["objects"], [sizes["a.png"],
                                                                                       sizes["b.png"]])
    text = hf_tok.decode(ours)
    assert "<|box_start|>(667,333),(833,497)<|box_end|> then <|box_start|>(16,42),(47,85)<|box_end|>" in text
    norm = {**rec, "objects": {"bbox": [[0.25, 0.5, 0.7516, 1.0]], "bbox_type": "norm1"},
            "messages": [rec["messages"][0], {"role": "assistant", "content": "<bbox>"}]}
    assert "<|box_start|>(250,500),(752,1000)<|box_end|>" in hf_tok.decode(ours_ids(swift(norm), tok))


def test_swift_pretraining_record(tok, hf_tok):
    # docs: {"messages": [{"role": "assistant", "content": "<image>is a puppy, <image>is a kitten"}], "images": [...]}
    # `swift pt` uses the generation template (no chat slots, no system) and appends the eos token; Qwen2-VL's base
    # tokenizer's eos is <|endoftext|>, what our pretraining samples end with.
    rec = {"messages": [{"role": "assistant", "content": "<image>is a puppy, <image>is a kitten"}],
           "images": ["/xxx/x.jpg", "/xxx/x.png"]}
    sample = swift(rec)
    assert "content" in sample and "messages" not in sample
    text = expand_pads(f"{IMG_BLOCK}is a puppy, {IMG_BLOCK}is a kitten") + "<|endoftext|>"
    assert ours_ids(sample, tok) == hf_tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("record,reason", [
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]},
     "media_count_mismatch"),
    ({"messages": [{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}],
      "images": ["x.jpg"]}, "media_count_mismatch"),
    ({"messages": [{"role": "user", "content": "<image>find <ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
      "images": ["x.jpg"], "objects": {"ref": ["a", "b"], "bbox": [[1, 2, 3, 4]]}}, "media_count_mismatch"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool_call", "content": "{}"}]}, "unsupported_role"),
    ({"messages": [{"role": "user", "content": "q"}]}, "bad_turns"),
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "<bbox>"}],
      "images": ["x.jpg"], "objects": {"bbox": [[1, 2, 3]]}}, "bad_box"),
    ({"messages": [{"role": "user", "content": "<audio>q"}, {"role": "assistant", "content": "a"}],
      "audios": ["x.wav"]}, "unsupported_media"),
])
def test_swift_records_that_are_skips(record, reason):
    with pytest.raises(SkipSample) as e:
        swift(record, lambda ref: (100, 100))
    assert e.value.reason == reason


def test_llava_mismatch_is_a_skip():
    for rec in ({"image": "a.jpg", "conversations": [{"from": "human", "value": "no tag"},
                                                     {"from": "gpt", "value": "x"}]},
                {"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
                {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>x"},
                                                     {"from": "gpt", "value": "<image>"}]}):
        with pytest.raises(SkipSample) as e:
            llava(rec)
        assert e.value.reason == "media_count_mismatch"


# ------------------------------------------------------------------------------------------------- reading files
def test_read_records_json_list_line_numbers_and_bad_encoding(tmp_path):
    p = tmp_path / "data.json"
    p.write_bytes(b'\xef\xbb\xbf[\n  {"a": 1},\n  {"b": "caf\xe9"},\n\n  {"c":\n 3}\n]\n')
    got = list(read_records(str(p)))
    assert [ln for ln, _ in got] == [2, 3, 5]
    assert got[0][1] == {"a": 1} and got[2][1] == {"c": 3}
    assert isinstance(got[1][1], SkipSample) and got[1][1].reason == "bad_encoding"
    p.write_text('[\n {"a": 1},\n {"b": 2,,}\n]')
    with pytest.raises(ValueError, match="line 3"):
        list(read_records(str(p)))


# ------------------------------------------------------------------------------------------------- make, end to end
def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def _samples(out) -> list[tuple[dict, dict, set[str]]]:
    """(sample json, media sizes, member names) of every sample of a made dataset."""
    man = json.loads((out / MANIFEST).read_text())
    res = []
    for s in man["shards"]:
        idx = json.loads((out / (s["name"] + INDEX_SUFFIX)).read_text())
        with tarfile.open(out / s["name"]) as tar:
            for smp in idx["samples"]:
                obj = json.loads(tar.extractfile(f"{smp['key']}.json").read())
                res.append((obj, smp["media"], {m[0] for m in smp["members"]}))
    return res


def test_make_llamafactory_with_dataset_info(tmp_path, tok, hf_tok):
    # LLaMA-Factory's layout: data/dataset_info.json, data/mllm_demo.json, data/mllm_demo_data/*.jpg
    data = tmp_path / "data"
    (data / "mllm_demo_data").mkdir(parents=True)
    for i in (1, 2, 3):
        (data / "mllm_demo_data" / f"{i}.jpg").write_bytes(small_image(i, 60 + 10 * i, 80, "JPEG"))
    bad = {"messages": [{"content": "<image>Who?", "role": "user"}, {"content": "?", "role": "assistant"}],
           "images": []}
    (data / "mllm_demo.json").write_text(json.dumps(MLLM_DEMO[:2] + [bad] + MLLM_DEMO[2:], indent=2))
    (data / "dataset_info.json").write_text(json.dumps({
        "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    out = tmp_path / "shards"
    r = _run("data.shards", "make", "--format", "llamafactory", "--input", str(data / "mllm_demo.json"), "--media",
             str(data), "--dataset-info", str(data / "dataset_info.json"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / MANIFEST).read_text())
    assert man["samples"] == 3 and man["skipped"] == {"media_count_mismatch": 1}
    starts = [i + 1 for i, ln in enumerate((data / "mllm_demo.json").read_text().splitlines()) if ln == "  {"]
    assert len(starts) == 4 and f"line {starts[2]}: media_count_mismatch" in r.stderr, r.stderr
    made = _samples(out)
    assert [sorted(m) for _, _, m in made] == [["img0.jpg", "json"], ["img0.jpg", "json"], ["img0.jpg", "json"]]
    for (obj, _, _), rec in zip(made, MLLM_DEMO):  # the same image twice is one member
        system, turns = _lf_turns(rec, "messages", "role", "content", "user")
        assert ours_ids(obj, tok) == llamafactory_ids(system, turns, hf_tok)


def test_make_llava_json_list_trains(tmp_path, tok_dir):
    media = tmp_path / "media"
    (media / "coco").mkdir(parents=True)
    (media / "coco" / "bus.jpg").write_bytes(encode(skimage_rgb("astronaut")[::4, ::4], "JPEG"))
    (media / "clip.mp4").write_bytes(encode_video(64, 48, 8))
    recs = [
        {"id": "000000033471", "image": "coco/bus.jpg", "conversations": LLAVA_CASES[1][0]["conversations"]},
        {"id": "v1", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<image>\nWhat moves?"},
                                                            {"from": "gpt", "value": "A face."}]},
        {"id": "bad", "image": "coco/bus.jpg", "conversations": [{"from": "human", "value": "no tag"},
                                                                 {"from": "gpt", "value": "?"}]},
        {"id": "gone", "image": "coco/none.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                                   {"from": "gpt", "value": "?"}]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(recs, indent=1))
    out = tmp_path / "shards"
    r = _run("data.shards", "make", "--format", "llava", "--input", str(tmp_path / "llava.json"), "--media",
             str(media), "--out", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / MANIFEST).read_text())
    assert man["samples"] == 2 and man["skipped"] == {"media_count_mismatch": 1, "missing_media": 1}, man
    made = _samples(out)
    assert [sorted(m) for _, _, m in made] == [["img0.jpg", "json"], ["json", "vid0.mp4"]]
    assert made[0][1] == {"img0.jpg": [128, 128]}
    cfg = DataConfig(datasets=[DatasetSpec(str(out))], tokenizer=tok_dir, epochs=1, num_workers=0, max_tokens=4096,
                     max_pixels=64 * 28 * 28)
    batches = list(build_loader(cfg, 0, 1))
    assert sum(len(b.sample_keys) for b in batches) == 2
    assert sum(b.image_grid_thw.shape[0] for b in batches) == 1 and sum(b.video_grid_thw.shape[0] for b in batches) == 1


def test_make_swift_grounding_uses_the_stored_image_size(tmp_path, tok, hf_tok):
    media = tmp_path / "media"
    media.mkdir()
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.fromarray(skimage_rgb("coffee")).resize((900, 800)))
    (media / "sheep.jpg").write_bytes(encode(img, "JPEG"))
    rec = json.loads(json.dumps(SWIFT_GROUNDING[1][0]))
    rec["images"] = ["sheep.jpg"]
    png = small_image(3, 40, 50)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()  # the docs' base64 form of an image
    plain = {"messages": [{"role": "user", "content": "<image>What is it?"},
                          {"role": "assistant", "content": "A cat."}], "images": [uri]}
    lines = [json.dumps(rec), json.dumps({**rec, "images": ["/etc/hostname"]}), json.dumps({**rec, "images": []}),
             json.dumps(plain)]
    (tmp_path / "swift.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    r = _run("data.shards", "make", "--format", "swift", "--input", str(tmp_path / "swift.jsonl"), "--media",
             str(media), "--out", str(out))
    assert r.returncode == 0, r.stderr
    man = json.loads((out / MANIFEST).read_text())
    assert man["samples"] == 2 and man["skipped"] == {"media_outside_root": 1, "media_count_mismatch": 1}, man
    assert "line 2:" in r.stderr and "/etc/hostname" in r.stderr and "line 3:" in r.stderr
    (obj, sizes, _), (_, sizes2, members2) = _samples(out)
    assert sizes == {"img0.jpg": [900, 800]}
    assert sizes2 == {"img0.png": [50, 40]} and members2 == {"json", "img0.png"}
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.extractfile("000000004.img0.png").read() == png
    system, turns = _swift_turns(SWIFT_GROUNDING[1][0])
    assert ours_ids(obj, tok)[:-1] == swift_ids(system, turns, hf_tok, rec["objects"], [(900, 800)])
