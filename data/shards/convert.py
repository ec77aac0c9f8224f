"""Other tools' dataset formats -> our sample format (`python -m data.shards make --format FORMAT`).

One function per format turns one source record into our sample dict (docs/data.md, "Sample format") or raises
SkipSample naming the reason; `read_records` reads a source file (a JSON list or JSONL) record by record with
line numbers. Media references stay as the source wrote them: data/shards/make.py resolves, checks and embeds
them (one code path for every format).

Each converter follows the way its tool renders the format for Qwen2-VL, so that our ChatML rendering of the
converted sample gives the tool's token ids (tests/data/test_convert.py checks each against the tool's
documented examples and template, with the real Qwen2 tokenizer). The sample a converter writes is the same for
every model family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): rendering is the loader's, for the family of the run (its
default system turn, vision blocks, video timestamps: data/chatml.py), so `make --family` changes no sample, only
the index's token estimates. Text a converter writes stays text for every family (ms-swift's boxes: Qwen2-VL's
0-1000 grounding text with box tokens).

- `llava` (LLaVA-Instruct / LLaVA-Pretrain / LLaVA-Video style: `conversations` of `from: human|gpt` + `value`,
  `image`(s) / `video`(s) as a path or a list of paths): haotian-liu/LLaVA docs/Finetune_Custom_Data.md and
  QwenLM/Qwen3-VL qwen-vl-finetune/README.md (the same layout, Qwen's fine-tuning format) for the format;
  rendered as Qwen's fine-tuning code renders it for Qwen2-VL (QwenLM/Qwen2.5-VL
  qwen-vl-finetune/qwenvl/data/data_processor.py `_build_messages`): a human turn is split at `<image>` /
  `<video>`, its text pieces stripped of surrounding whitespace (empty ones dropped), a gpt turn is its text as
  is, then Qwen2-VL's chat template (default system turn). A record with videos and no images may use
  `<image>` as the video placeholder (LLaVA-NeXT's video data does).
- `sharegpt` and `llamafactory`: hiyouga/LlamaFactory data/README.md (sharegpt format, multimodal image/video
  datasets, `dataset_info.json` columns and tags; defaults from src/llamafactory/data/parser.py `DatasetAttr`),
  read as src/llamafactory/data/converter.py `SharegptDatasetConverter` reads them (a first message with the
  system tag is the system prompt, else the `system` column; user/assistant must alternate and pair up, else
  the record is skipped) and rendered as its `qwen2_vl` template does (data/template.py: ChatML slots, default
  system "You are a helpful assistant."; data/mm_plugin.py `Qwen2VLPlugin.process_messages`: each `<image>` /
  `<video>` is replaced in place by the vision block, no whitespace is touched; `_validate_messages`: the
  number of tags must equal the number of images / videos). `sharegpt` defaults to the README's columns
  (`conversations`, `from`/`value`, `human`/`gpt`, `system`, `images`, `videos`), `llamafactory` to those of its
  `mllm_demo` / `mllm_video_demo` entries (`messages`, `role`/`content`, `user`/`assistant`, `images`,
  `videos`); `--dataset-info dataset_info.json [--dataset NAME]` takes them from an entry instead.
- `swift`: modelscope/ms-swift docs/source_en/Customization/Custom-dataset.md (`messages` with role/content,
  `images`/`image`, `videos`/`video`, `objects` {ref, bbox, bbox_type, image_id} for grounding) rendered as
  its qwen2_vl template does (swift/template/templates/qwen.py `Qwen2VLTemplate`: `<image>` ->
  `<|vision_start|><|image_pad|><|vision_end|>`, `<ref-object>` -> `<|object_ref_start|>ref<|object_ref_end|>`,
  `<bbox>` -> `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`; swift/template/base.py `normalize_bbox`:
  `int(round(v / size * 1000))` with the original image size, `norm1` boxes `int(round(v * 1000))`, boxes of
  image `image_id`, default 0; `_get_bbox_str`: a 2-value bbox is a point). Refs and boxes become text with
  those control tokens, as swift writes them. A record that is one assistant message is a pretraining sample
  (swift's pre-training format). swift's template ends the last turn with `<|im_end|>` alone where Qwen2-VL's
  chat template (and ours) writes `<|im_end|>\\n`: the one token of difference.

Not converted (a counted skip with the reason): tool/function turns and tool lists, audio, videos given as
lists of frames, and placeholder counts that differ from the media lists (LLaMA-Factory and Qwen's code refuse
those; ms-swift would prepend missing `<image>` tags to the first message, which we do not guess).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

from data.chatml import SkipSample

FORMATS = ("ours", "llava", "sharegpt", "llamafactory", "swift")
DEFAULT_FORMAT = "ours"
# (width, height) of an image reference, for converters that need it (ms-swift's pixel boxes).
ImageSize = Callable[[str], tuple[int, int]]
Converter = Callable[[dict, ImageSize | None], dict]

_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape keeps them


# ------------------------------------------------------------------------------------------------ reading
def read_records(path: str) -> Iterator[tuple[int, object]]:
    """(line number, record) for each record of a JSON list or a JSONL file; the record is a SkipSample when the
    record cannot be read (not UTF-8, malformed JSON). A JSON list with a syntax error is a ValueError: nothing
    after it can be located."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from _read_json_list(path)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, SkipSample("bad_encoding", f"not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                                                         f"{e.start + 1}); re-encode the file as UTF-8")
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, SkipSample("malformed_json", f"malformed JSON ({e})")


def _read_json_list(path: str) -> Iterator[tuple[int, object]]:
    # The whole list is one JSON document: decode it in one go (surrogateescape keeps non-UTF-8 bytes as
    # markers, so a bad record is a skip instead of the whole file failing) and walk its elements with
    # raw_decode to know each record's line.
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    line, counted = 1, 0
    pos = ws.match(text, 0).end() + 1  # past '['
    while True:
        pos = ws.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        if pos >= len(text):
            raise ValueError(f"{path} line {line}: the JSON list is not closed with ']' (a truncated file?)")
        if text[pos] == "]":
            return
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {line}: malformed JSON in the list ({e.msg}): a JSON list cannot be read "
                             "past a syntax error; fix it, or write the records as JSONL (one per line) so bad "
                             "lines are skipped") from None
        if _SURROGATE.search(text, pos, end):
            yield line, SkipSample("bad_encoding", "not valid UTF-8; re-encode the file as UTF-8")
        else:
            yield line, obj
        pos = ws.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            line += text.count("\n", counted, pos)
            raise ValueError(f"{path} line {line}: expected ',' or ']' between the records of the JSON list")


# ------------------------------------------------------------------------------------------------ shared
def _media_list(rec: dict, keys: tuple[str, ...], what: str) -> list[str]:
    """Paths/URLs of one media kind: a string or a list of strings under the first key present."""
    val = next((rec[k] for k in keys if rec.get(k) is not None), None)
    if val is None:
        return []
    if isinstance(val, str):
        val = [val]
    if not isinstance(val, list):
        raise SkipSample("bad_format", f"'{keys[0]}' must be a path or a list of paths, got {type(val).__name__}")
    for v in val:
        if isinstance(v, list):
            raise SkipSample("unsupported_media", f"a {what} given as a list of frames; encode the frames as a video")
        if not isinstance(v, str) or not v:
            raise SkipSample("unsupported_media", f"a {what} entry must be a path or URL string, got {v!r:.60}")
    return val


def _no_audio(rec: dict) -> None:
    if rec.get("audios") or rec.get("audio"):
        raise SkipSample("unsupported_media", "audio is not supported by Qwen2-VL")


def _check_counts(texts: list[str], tags: dict[str, int]) -> None:
    """Each tag must occur as often as its list has entries (tag -> number of entries)."""
    for tag, n in tags.items():
        found = sum(t.count(tag) for t in texts)
        if found != n:
            raise SkipSample("media_count_mismatch", f"{found} {tag} tag(s) for {n} entr{'y' if n == 1 else 'ies'}")


def _split(text: str, repl: dict[str, Callable[[], dict | str]], strip: bool = False) -> list:
    """Text -> items: each tag in `repl` is replaced by what its callable returns (an item, or text)."""
    out: list = []
    for seg in re.split("(" + "|".join(re.escape(t) for t in repl) + ")", text) if repl else [text]:
        if seg in repl:
            out.append(repl[seg]())
        else:
            seg = seg.strip() if strip else seg
            if seg:
                out.append(seg)
    items: list = []
    for x in out:  # adjacent texts merge (they render as one run anyway)
        if isinstance(x, str) and items and isinstance(items[-1], str):
            items[-1] += x
        else:
            items.append(x)
    return [{"type": "text", "text": x} if isinstance(x, str) else x for x in items]


def _content(items: list[dict]) -> str | list[dict]:
    """A plain string when the turn is text only (the tidier form of our format)."""
    if all(it["type"] == "text" for it in items):
        return "".join(it["text"] for it in items)
    return items


def _pools(images: list[str], videos: list[str]) -> tuple[Callable[[], dict], Callable[[], dict]]:
    it_img, it_vid = iter(images), iter(videos)
    return (lambda: {"type": "image", "image": next(it_img)}), (lambda: {"type": "video", "video": next(it_vid)})


def _sample(rec: dict, body: dict) -> dict:
    """The converted sample, keeping the source's `id` (make takes the shard key from it)."""
    rid = rec.get("id")
    return {"id": rid, **body} if isinstance(rid, (str, int)) and not isinstance(rid, bool) else body


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise SkipSample("bad_format", f"{where} must be a string, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------ formats
def ours(rec: object, image_size: ImageSize | None = None) -> dict:
    """Our own format (docs/data.md): the record is the sample."""
    if not isinstance(rec, dict):
        raise SkipSample("bad_format", f"a sample must be a JSON object, got {type(rec).__name__}")
    return rec


def guess_format(rec: object) -> tuple[str, str] | None:
    """(--format, the tool) that a record's top-level keys point to, or None when nothing but ours fits."""
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    if "conversations" in keys:
        if keys & {"images", "videos"}:
            return "sharegpt", "LLaMA-Factory's sharegpt layout"
        return "llava", "LLaVA's (and Qwen's qwen-vl-finetune) layout"
    msgs = rec.get("messages")
    if isinstance(msgs, list) and keys & {"images", "videos", "image", "video", "objects"} and not any(
            isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs):
        if "objects" in keys or keys & {"image", "video"}:
            return "swift", "ms-swift's layout"
        return "llamafactory", "LLaMA-Factory's messages layout (ms-swift's too: --format swift)"
    return None


def ours_checked(rec: object, image_size: ImageSize | None = None) -> dict:
    """`--format ours`: the record is the sample, unless its keys are another tool's (their media lists are no part
    of our format and would be dropped without a word: the record is a counted skip naming the format)."""
    rec = ours(rec)
    other = guess_format(rec)
    if other is not None:
        raise SkipSample("bad_format", f"top-level keys {sorted(rec)} are {other[1]}, not ours (media go into the "
                                       f"content items): use --format {other[0]}")
    return rec


_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def llava(rec: object, image_size: ImageSize | None = None) -> dict:
    """A LLaVA record -> our chat sample, as Qwen's qwen-vl-finetune renders it for Qwen2-VL (module docstring)."""
    rec = ours(rec)
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SkipSample("bad_format", "'conversations' must be a non-empty list of {from, value}")
    _no_audio(rec)
    images = _media_list(rec, ("image", "images"), "image")
    videos = _media_list(rec, ("video", "videos"), "video")
    turns = []
    for i, t in enumerate(conv):
        src = t.get("from") if isinstance(t, dict) else None
        role = "system" if src == "system" and i == 0 else _LLAVA_ROLES.get(src) if isinstance(src, str) else None
        if role is None:
            raise SkipSample("bad_format", f"conversations[{i}]: 'from' must be human or gpt, got {src!r}")
        turns.append((role, _text(t.get("value"), f"conversations[{i}].value")))
    # LLaVA-NeXT's video records mark the video with <image>; <video> is accepted as well.
    image_tag_is_video = bool(videos) and not images and not any("<video>" in v for _, v in turns)
    user_texts = [v for r, v in turns if r == "user"]
    others = [v for r, v in turns if r != "user"]
    if any(tag in v for v in others for tag in ("<image>", "<video>")):
        raise SkipSample("media_count_mismatch", "a placeholder outside a human turn (only human turns hold media)")
    if image_tag_is_video:
        _check_counts(user_texts, {"<image>": len(videos)})
    else:
        _check_counts(user_texts, {"<image>": len(images), "<video>": len(videos)})
    img, vid = _pools(images, videos)
    repl = {"<image>": vid} if image_tag_is_video else {"<image>": img, "<video>": vid}
    messages = []
    for role, value in turns:
        if role == "user":
            messages.append({"role": role, "content": _split(value, repl, strip=True)})
        else:
            messages.append({"role": role, "content": value})
    return _sample(rec, {"messages": messages})


@dataclass(frozen=True)
class LlamaFactoryColumns:
    """Column and tag names of a LLaMA-Factory sharegpt dataset (its DatasetAttr); None: the column is absent."""

    messages: str | None = "conversations"
    system: str | None = None
    tools: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"


SHAREGPT = LlamaFactoryColumns(system="system", tools="tools", images="images", videos="videos", audios="audios")
LLAMAFACTORY = replace(SHAREGPT, messages="messages", role_tag="role", content_tag="content", user_tag="user",
                       assistant_tag="assistant")
_COLUMNS = ("messages", "system", "tools", "images", "videos", "audios")
_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")


def columns_from_dataset_info(info_path: str, name: str | None, input_path: str | None) -> LlamaFactoryColumns:
    """The columns and tags of one entry of a LLaMA-Factory dataset_info.json (by name, or the one entry whose
    file_name is the input file's name), with LLaMA-Factory's rules: a `columns` / `tags` object replaces every
    column / tag it does not name by None (parser.py DatasetAttr.join)."""
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    if not isinstance(info, dict):
        raise ValueError(f"{info_path}: a dataset_info.json is an object of dataset entries")
    if name is None:
        base = os.path.basename(input_path or "")
        hits = [k for k, v in info.items() if isinstance(v, dict) and os.path.basename(str(v.get("file_name"))) == base]
        if len(hits) != 1:
            raise ValueError(f"{info_path}: {len(hits)} entries have file_name {base!r} ({hits[:5]}); name the entry "
                             "with --dataset NAME")
        name = hits[0]
    entry = info.get(name)
    if not isinstance(entry, dict):
        raise ValueError(f"{info_path}: no dataset entry {name!r} (entries: {sorted(info)[:10]})")
    fmt = entry.get("formatting", "alpaca")
    if fmt != "sharegpt":
        raise ValueError(f"{info_path} entry {name!r}: formatting {fmt!r} is not converted (only 'sharegpt', the "
                         "format of LLaMA-Factory's multimodal datasets)")
    cols, tags = entry.get("columns"), entry.get("tags")
    if entry.get("ranking") or (isinstance(cols, dict) and any(cols.get(k) for k in ("chosen", "rejected", "kto_tag"))):
        raise ValueError(f"{info_path} entry {name!r} is preference data (ranking / chosen / rejected / kto_tag): "
                         "only supervised conversations are converted")
    kw: dict = {}
    if isinstance(cols, dict):
        kw.update({k: cols.get(k) for k in _COLUMNS})
    if isinstance(tags, dict):
        kw.update({k: tags.get(k) for k in _TAGS})
    out = replace(LlamaFactoryColumns(), **kw)
    if not out.messages or not out.role_tag or not out.content_tag:
        raise ValueError(f"{info_path} entry {name!r} names no messages column / role_tag / content_tag")
    return out


def sharegpt(rec: object, image_size: ImageSize | None = None, cols: LlamaFactoryColumns = SHAREGPT) -> dict:
    """A LLaMA-Factory sharegpt record -> our chat sample, as LLaMA-Factory's qwen2_vl template renders it."""
    rec = ours(rec)
    msgs = rec.get(cols.messages) if cols.messages else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise SkipSample("bad_format", f"'{cols.messages}' must be a list of messages")
    if cols.audios and rec.get(cols.audios):
        raise SkipSample("unsupported_media", "audio is not supported by Qwen2-VL")
    if cols.tools and rec.get(cols.tools):
        raise SkipSample("unsupported_tools", "tool descriptions are not converted")
    if cols.system_tag and msgs and msgs[0].get(cols.role_tag) == cols.system_tag:
        system, msgs = msgs[0].get(cols.content_tag), msgs[1:]
    else:
        system = rec.get(cols.system) if cols.system else None
    system = _text(system or "", "the system prompt")
    odd, even = (cols.user_tag, cols.observation_tag), (cols.assistant_tag, cols.function_tag)
    turns = []
    for i, m in enumerate(msgs):
        tag = m.get(cols.role_tag)
        if tag not in (odd, even)[i % 2]:
            raise SkipSample("bad_turns", f"message {i}: role {tag!r}; LLaMA-Factory needs {cols.user_tag!r} and "
                                          f"{cols.assistant_tag!r} turns in alternation")
        if tag in (cols.observation_tag, cols.function_tag):
            raise SkipSample("unsupported_role", f"message {i}: tool turns ({tag!r}) are not converted")
        role = "user" if tag == cols.user_tag else "assistant"
        turns.append((role, _text(m.get(cols.content_tag), f"message {i} '{cols.content_tag}'")))
    if not turns or len(turns) % 2:
        raise SkipSample("bad_turns", f"{len(turns)} messages; LLaMA-Factory needs user/assistant pairs")
    images = _media_list(rec, (cols.images,), "image") if cols.images else []
    videos = _media_list(rec, (cols.videos,), "video") if cols.videos else []
    texts = [v for _, v in turns]
    _check_counts(texts, {"<image>": len(images), "<video>": len(videos)})
    img, vid = _pools(images, videos)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": r, "content": _content(_split(v, {"<image>": img, "<video>": vid}))} for r, v in turns]
    return _sample(rec, {"messages": messages})


def llamafactory(rec: object, image_size: ImageSize | None = None, cols: LlamaFactoryColumns = LLAMAFACTORY) -> dict:
    """A LLaMA-Factory multimodal `messages` record (its mllm_demo layout) -> our chat sample."""
    return sharegpt(rec, image_size, cols)


def _swift_boxes(objects: object, images: list[str], image_size: ImageSize | None) -> tuple[list[str], list[str]]:
    """ms-swift `objects` -> (ref texts, box texts), normalized as swift's normalize_bbox does for Qwen2-VL."""
    if not isinstance(objects, dict):
        raise SkipSample("bad_box", "'objects' must be {ref: [...], bbox: [[...], ...]}")
    refs, boxes = objects.get("ref") or [], objects.get("bbox") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise SkipSample("bad_box", "'objects.ref' must be a list of strings")
    ok = isinstance(boxes, list) and all(
        isinstance(b, list) and len(b) in (2, 4) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in b) for b in boxes)
    if not ok:
        raise SkipSample("bad_box", "'objects.bbox' must be a list of [x, y] points or [x1, y1, x2, y2] boxes")
    kind = objects.get("bbox_type") or "real"
    if kind not in ("real", "norm1"):
        raise SkipSample("bad_box", f"'objects.bbox_type' must be real or norm1, got {kind!r}")
    ids = list(objects.get("image_id") or [])
    ids += [0] * (len(boxes) - len(ids))
    texts = []
    for b, i in zip(boxes, ids):
        if kind == "norm1":
            w = h = 1
        else:
            if not isinstance(i, int) or not 0 <= i < len(images):
                raise SkipSample("bad_box", f"'objects.image_id' {i!r} is not the index of one of {len(images)} images")
            if image_size is None:
                raise SkipSample("bad_box", "pixel boxes need the image's size")
            w, h = image_size(images[i])
        pts = [(int(round(x / w * 1000)), int(round(y / h * 1000))) for x, y in zip(b[::2], b[1::2])]
        texts.append("<|box_start|>" + ",".join(f"({x},{y})" for x, y in pts) + "<|box_end|>")
    return [f"<|object_ref_start|>{r}<|object_ref_end|>" for r in refs], texts


def swift(rec: object, image_size: ImageSize | None = None) -> dict:
    """An ms-swift record -> our chat (or pretraining) sample, as swift's qwen2_vl template renders it."""
    rec = ours(rec)
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise SkipSample("bad_format", "'messages' must be a non-empty list of {role, content}")
    _no_audio(rec)
    system = rec.get("system") if isinstance(rec.get("system"), str) else None
    if msgs[0].get("role") == "system":
        system, msgs = _text(msgs[0].get("content"), "the system message's content"), msgs[1:]
    turns = []
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise SkipSample("unsupported_role", f"message {i}: role {role!r} (converted: system, user, assistant)")
        turns.append((role, _text(m.get("content"), f"message {i} 'content'")))
    pretrain = len(turns) == 1 and turns[0][0] == "assistant"
    if not pretrain and (len(turns) % 2 or any(r != ("user", "assistant")[i % 2] for i, (r, _) in enumerate(turns))):
        raise SkipSample("bad_turns", "messages must alternate user/assistant, starting with user and ending with "
                                      "assistant (or be one assistant message: pre-training)")
    images = _media_list(rec, ("images", "image"), "image")
    videos = _media_list(rec, ("videos", "video"), "video")
    texts = [v for _, v in turns]
    _check_counts(texts, {"<image>": len(images), "<video>": len(videos)})
    repl: dict[str, Callable[[], dict | str]] = dict(zip(("<image>", "<video>"), _pools(images, videos)))
    if rec.get("objects"):
        refs, boxes = _swift_boxes(rec["objects"], images, image_size)
        _check_counts(texts, {"<ref-object>": len(refs), "<bbox>": len(boxes)})
        it_ref, it_box = iter(refs), iter(boxes)
        repl.update({"<ref-object>": lambda: next(it_ref), "<bbox>": lambda: next(it_box)})
    if pretrain:
        return _sample(rec, {"content": _split(texts[0], repl)})
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": r, "content": _content(_split(v, repl))} for r, v in turns]
    return _sample(rec, {"messages": messages})


def get_converter(fmt: str, dataset_info: str | None = None, dataset: str | None = None,
                  input_path: str | None = None) -> Converter:
    """The record -> sample function of a format (`dataset_info`/`dataset`: LLaMA-Factory's column mapping)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if (dataset_info or dataset) and fmt not in ("sharegpt", "llamafactory"):
        raise ValueError("--dataset-info / --dataset apply to --format sharegpt or llamafactory only")
    if dataset and not dataset_info:
        raise ValueError("--dataset names an entry of --dataset-info FILE: give the file too")
    if dataset_info:
        return partial(sharegpt, cols=columns_from_dataset_info(dataset_info, dataset, input_path))
    return {"ours": ours_checked, "llava": llava, "sharegpt": sharegpt, "llamafactory": llamafactory,
            "swift": swift}[fmt]
