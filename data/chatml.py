"""Sample JSON -> ChatML token ids and supervision mask, identical to the family's chat template + processor.

Sample formats (docs/data.md has the user-facing description):

    chat:      {"messages": [{"role": "system|user|assistant", "content": "text" | [item, ...]}, ...]}
    pretrain:  {"content": "text" | [item, ...]}
    items:     {"type": "text", "text": "..."}
               {"type": "image", "image": "<member name | path | s3:// | oss:// URL>"}
               {"type": "video", "video": "..."}
               {"type": "box", "box": [x1, y1, x2, y2] | [[x1, y1, x2, y2], ...], "ref": "phrase"?, "image": i?}

Rendering (the Qwen-VL Instruct chat templates, written out in docs/design ARCHITECTURE.md; the families differ
only where said):
- a default system turn `<|im_start|>system\\n{prompt}<|im_end|>\\n` when the first message is not a system
  message: Qwen2-VL's and Qwen2.5-VL's templates write "You are a helpful assistant.", Qwen3-VL's none
  (data.config.DataConfig.default_system);
- each message `<|im_start|>{role}\\n` + content + `<|im_end|>\\n`; text items verbatim, nothing between items;
- an image item `<|vision_start|>` + `<|image_pad|>` * (t*h*w/4) + `<|vision_end|>`; a video item the same with
  `<|video_pad|>`, except for Qwen3-VL, whose processor writes each frame pair behind its time as text (VisionInfo
  frame_times): `<|vision_start|>` + per pair (`<{t:.1f} seconds>` `<|vision_start|>` pads `<|vision_end|>`) +
  `<|vision_end|>`, the timestamps unsupervised text tokenized on their own (they sit between special tokens);
- a box item `<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, pixel
  coordinates of the referenced image (default: the latest image before the box) scaled to [0, 1000).
Pretraining samples are the items alone, followed by `<|endoftext|>` (configurable).

Text that spells a control token (docs/data.md, "Control tokens in text"): the tokenizer turns `<|box_start|>`,
`<|endoftext|>` & co. into their control tokens, as transformers, LLaMA-Factory and ms-swift do by default. Two
kinds would contradict the structure this module builds itself, and such a sample is a counted skip
(`control_token_in_text`, naming the token and the message): vision tokens anywhere (only the loader places them,
around the pixels it inserts; a stray pad had no pixels and crashed position-id building), and turn markers
(`<|im_start|>`, `<|im_end|>`) inside a chat message (double-templated data: the turns and the supervision would
be silently wrong). A pretraining text may carry turn markers (pre-rendered conversations trained on as text).

Supervision (which tokens are targets): chat samples train on each assistant turn's content and its
`<|im_end|>` (not the `<|im_start|>assistant\\n` header, not the `\\n` after `<|im_end|>`); pretraining samples on
all text; `all` on every text token. Vision tokens (start, pads, end) never.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from data.tokenizer import SpecialIds, Tokenizer

ROLES = ("system", "user", "assistant")
TEXT, SPECIAL, VISION, PADS = 0, 1, 2, 3


# Control tokens a sample's text must not spell (see the module docstring): where they are refused.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TURN_TOKENS = ("<|im_start|>", "<|im_end|>")


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the metrics key (skipped/<reason>)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Item:
    type: str  # text | image | video | box
    value: object  # text: str; image/video: the media reference; box: list of [x1, y1, x2, y2]
    ref: str | None = None  # box: the phrase
    image: int | None = None  # box: index of the image the coordinates refer to


@dataclass
class ParsedSample:
    kind: str  # chat | pretrain
    turns: list[tuple[str, list[Item]]] = field(default_factory=list)  # chat: (role, items); pretrain: one turn
    media: list[tuple[str, str]] = field(default_factory=list)  # (type, reference) in placeholder order


def _check_text(text: str, where: str, chat: bool) -> str:
    """`text` unless it spells a control token the loader must place itself (module docstring)."""
    if "<|" in text:  # the common case costs one substring search
        for tok in VISION_TOKENS + (TURN_TOKENS if chat else ()):
            if tok in text:
                i = text.index(tok)
                raise SkipSample("control_token_in_text", f"{where} spells the control token {tok!r} (at character "
                                 f"{i}: {text[max(0, i - 30):i + len(tok) + 10]!r}); only the loader writes "
                                 f"{'vision' if tok in VISION_TOKENS else 'turn'} tokens (docs/data.md)")
    return text


def _items(content: object, where: str, chat: bool = True) -> list[Item]:
    if isinstance(content, str):
        return [Item("text", _check_text(content, where, chat))]
    if not isinstance(content, list):
        raise SkipSample(
            "bad_format", f"{where}: content must be a string or a list of items, got {type(content).__name__}"
        )
    out = []
    for i, it in enumerate(content):
        if isinstance(it, str):
            out.append(Item("text", _check_text(it, f"{where}[{i}]", chat)))
            continue
        if not isinstance(it, dict):
            raise SkipSample("bad_format", f"{where}[{i}]: an item must be an object, got {type(it).__name__}")
        # As the chat template: an item is an image/video when typed so or when it carries the key.
        t = it.get("type")
        if t is None:
            t = next((k for k in ("image", "video", "text", "box") if k in it), None)
        if t == "image_url":
            t, it = "image", {"image": it.get("image_url")}
        if t == "text":
            if not isinstance(it.get("text"), str):
                raise SkipSample("bad_format", f"{where}[{i}]: text item without a string 'text'")
            out.append(Item("text", _check_text(it["text"], f"{where}[{i}]", chat)))
        elif t in ("image", "video"):
            ref = it.get(t)
            if isinstance(ref, dict):  # {"url": ...} as some OpenAI-style exports write it
                ref = ref.get("url")
            if not isinstance(ref, str) or not ref:
                raise SkipSample("bad_format", f"{where}[{i}]: {t} item without a reference string")
            out.append(Item(t, ref))
        elif t == "box":
            out.append(_box_item(it, f"{where}[{i}]", chat))
        else:
            raise SkipSample("unknown_content_type", f"{where}[{i}]: type {t!r} (known: text, image, video, box)")
    return out


def _box_item(it: dict, where: str, chat: bool) -> Item:
    boxes = it.get("box")
    if isinstance(boxes, list) and boxes and all(isinstance(v, (int, float)) for v in boxes):
        boxes = [boxes]
    ok = isinstance(boxes, list) and boxes and all(
        isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in b)
        for b in boxes
    )
    if not ok:
        raise SkipSample("bad_box", f"{where}: 'box' must be [x1, y1, x2, y2] or a list of them, got {boxes!r}")
    for b in boxes:
        if b[2] < b[0] or b[3] < b[1]:
            raise SkipSample("bad_box", f"{where}: box {b} has x2 < x1 or y2 < y1")
    ref = it.get("ref", it.get("text"))
    if ref is not None and not isinstance(ref, str):
        raise SkipSample("bad_box", f"{where}: 'ref' must be a string")
    if ref is not None:
        _check_text(ref, f"{where}.ref", chat)
    img = it.get("image")
    if img is not None and (not isinstance(img, int) or isinstance(img, bool) or img < 0):
        raise SkipSample("bad_box", f"{where}: 'image' must be the 0-based index of an image of the sample")
    return Item("box", boxes, ref, img)


def parse_sample(obj: object, kind: str = "auto") -> ParsedSample:
    """Validate and normalize a sample's JSON. Raises SkipSample naming what is wrong."""
    if not isinstance(obj, dict):
        raise SkipSample("bad_format", f"sample JSON must be an object, got {type(obj).__name__}")
    if kind == "auto":
        kind = "chat" if "messages" in obj else "pretrain" if "content" in obj else ""
        if not kind:
            raise SkipSample("bad_format", "sample has neither 'messages' (chat) nor 'content' (pretraining)")
    if kind == "chat":
        msgs = obj.get("messages")
        if msgs is None and "content" in obj:
            raise SkipSample("bad_format", "this looks like a pretraining sample ('content' without 'messages'); "
                                           "use kind: pretrain or auto for its dataset")
        if not isinstance(msgs, list):
            raise SkipSample("bad_format", "'messages' must be a list" if "messages" in obj else
                             "chat sample without 'messages' (a list of {'role', 'content'} turns)")
        if not msgs:
            raise SkipSample("empty_conversation", "'messages' is empty")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
                raise SkipSample("bad_format", f"messages[{i}] must be {{'role': one of {ROLES}, 'content': ...}}")
            turns.append((m["role"], _items(m["content"], f"messages[{i}].content")))
    elif kind == "pretrain":
        if "content" not in obj:
            raise SkipSample("bad_format", "pretraining sample without 'content'")
        turns = [("", _items(obj["content"], "content", chat=False))]
        if not turns[0][1]:
            raise SkipSample("empty_conversation", "'content' is empty")
    else:
        raise SkipSample("bad_format", f"unknown sample kind {kind!r}")
    media = [(it.type, it.value) for _, items in turns for it in items if it.type in ("image", "video")]
    return ParsedSample(kind, turns, media)


BOX_TOLERANCE = 0.01
"""A box may overshoot its image by this fraction of a side (rounding, a border drawn on the edge) before its
clamping is counted (metrics `clamped_boxes`)."""


def fit_box(box: list[float], width: int, height: int) -> tuple[list[float], bool]:
    """The box clamped to its (width x height) image, and whether it overshot by more than BOX_TOLERANCE of a side.
    A box wholly outside its image (a box in another scale, e.g. normalized to 0-1000) is a counted skip: clamped,
    it would train on `(999,999),(999,999)`."""
    x1, y1, x2, y2 = box
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        raise SkipSample("box_outside_image", f"box {box} lies wholly outside its image ({width}x{height}): are its "
                                              "coordinates in another scale (normalized to 0-1000 or 0-1)? Boxes are "
                                              "pixel coordinates of the original image")
    over_x = max(-x1, x2 - width, 0.0)
    over_y = max(-y1, y2 - height, 0.0)
    clamped = over_x > BOX_TOLERANCE * width or over_y > BOX_TOLERANCE * height
    return [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))], clamped


def box_text(box: list[float], width: int, height: int) -> str:
    """'(x1,y1),(x2,y2)' with pixel coordinates scaled to integers in [0, 1000) (Qwen2-VL paper, 2.2.1)."""

    def norm(v: float, size: int) -> int:
        x = v * 1000 / size  # may be +-inf for a huge finite coordinate: compare before converting to int
        return 999 if x >= 999 else 0 if x <= 0 else math.floor(x)

    x1, y1, x2, y2 = box
    return f"({norm(x1, width)},{norm(y1, height)}),({norm(x2, width)},{norm(y2, height)})"


@dataclass
class VisionInfo:
    """What rendering needs to know about one media item (placeholder order)."""

    type: str  # image | video
    num_tokens: int  # t * h * w / merge^2
    orig_size: tuple[int, int] | None  # (width, height) for images
    frame_times: list[float] | None = None
    """A video whose frame pairs are written behind their times (Qwen3-VL): one time in seconds per pair, each pair
    num_tokens / len(frame_times) pads; None: one block of pads (every image, Qwen2-VL's / Qwen2.5-VL's videos)."""


def frame_time_text(t: float) -> str:
    """A frame pair's timestamp as Qwen3-VL's processor writes it."""
    return f"<{t:.1f} seconds>"


def _expand_vision(pieces: list[tuple[int, object, bool]], vision: list[VisionInfo],
                   sp: SpecialIds) -> list[tuple[int, object, bool]]:
    """VISION pieces -> their tokens' pieces: `<|vision_start|>`, (PADS, (pad id, count)) or per frame pair a
    timestamp and a block of its own, `<|vision_end|>`; never supervised."""
    out: list[tuple[int, object, bool]] = []
    for kind, value, sup in pieces:
        if kind != VISION:
            out.append((kind, value, sup))
            continue
        v = vision[value]  # type: ignore[index]
        pad = sp.image_pad if v.type == "image" else sp.video_pad
        out.append((SPECIAL, sp.vision_start, False))
        if v.frame_times is None:
            out.append((PADS, (pad, v.num_tokens), False))
        else:
            per_pair, rest = divmod(v.num_tokens, max(1, len(v.frame_times)))
            if rest or not v.frame_times:
                raise ValueError(f"{v.num_tokens} video tokens do not split into {len(v.frame_times)} frame pairs")
            for t in v.frame_times:
                out += [(TEXT, frame_time_text(t), False), (SPECIAL, sp.vision_start, False),
                        (PADS, (pad, per_pair), False), (SPECIAL, sp.vision_end, False)]
        out.append((SPECIAL, sp.vision_end, False))
    return out


def render(
    parsed: ParsedSample,
    vision: list[VisionInfo],
    sp: SpecialIds,
    supervise: str = "auto",
    default_system: str | None = "You are a helpful assistant.",
    pretrain_eos: bool = True,
    counts: dict[str, int] | None = None,
) -> list[tuple[int, object, bool]]:
    """Pieces (TEXT, str, supervised) | (SPECIAL, id, supervised) | (VISION, index, False), in order.
    `counts` (optional) receives `clamped_boxes`: boxes clamped to their image by more than BOX_TOLERANCE."""
    if supervise not in ("auto", "assistant", "all"):
        raise ValueError(f"supervise must be auto|assistant|all, got {supervise!r}")
    every = supervise == "all" or (parsed.kind == "pretrain")
    pieces: list[tuple[int, object, bool]] = []
    vi = 0
    images_seen: list[int] = []  # vision indices of the images so far (for boxes)

    def emit_items(items: list[Item], sup: bool) -> None:
        nonlocal vi
        for it in items:
            if it.type == "text":
                if it.value:
                    pieces.append((TEXT, it.value, sup))
            elif it.type in ("image", "video"):
                if it.type == "image":
                    images_seen.append(vi)
                pieces.append((VISION, vi, False))
                vi += 1
            else:  # box
                target = images_seen[-1] if it.image is None and images_seen else None
                if it.image is not None:
                    all_images = [j for j, v in enumerate(vision) if v.type == "image"]
                    if it.image >= len(all_images):
                        raise SkipSample("bad_box", f"box refers to image {it.image}, sample has {len(all_images)}")
                    target = all_images[it.image]
                if target is None or vision[target].orig_size is None:
                    raise SkipSample("bad_box", "box before any image: give 'image': <index>")
                w, h = vision[target].orig_size
                if it.ref is not None:
                    pieces.append((SPECIAL, sp.object_ref_start, sup))
                    if it.ref:
                        pieces.append((TEXT, it.ref, sup))
                    pieces.append((SPECIAL, sp.object_ref_end, sup))
                for b in it.value:
                    b, clamped = fit_box(b, w, h)
                    if clamped and counts is not None:
                        counts["clamped_boxes"] = counts.get("clamped_boxes", 0) + 1
                    pieces.append((SPECIAL, sp.box_start, sup))
                    pieces.append((TEXT, box_text(b, w, h), sup))
                    pieces.append((SPECIAL, sp.box_end, sup))

    if parsed.kind == "pretrain":
        emit_items(parsed.turns[0][1], True)
        if pretrain_eos:
            pieces.append((SPECIAL, sp.endoftext, True))
        return pieces

    turns = parsed.turns
    if turns[0][0] != "system" and default_system is not None:
        turns = [("system", [Item("text", default_system)]), *turns]
    for role, items in turns:
        sup = every or role == "assistant"
        pieces.append((SPECIAL, sp.im_start, every))
        pieces.append((TEXT, role + "\n", every))
        emit_items(items, sup)
        pieces.append((SPECIAL, sp.im_end, sup))
        pieces.append((TEXT, "\n", every))
    return pieces


def tokenize(
    pieces: list[tuple[int, object, bool]], vision: list[VisionInfo], tok: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (L,) int64 and targets (L,) bool: whether each token is supervised (to be predicted).

    Adjacent text pieces are joined and tokenized as one run (what the HF tokenizer sees between special
    tokens); a token is supervised when its characters overlap a supervised piece. Vision pieces become their
    blocks (_expand_vision: Qwen3-VL's video timestamps are runs of their own).
    """
    pieces = _expand_vision(pieces, vision, tok.special)
    runs: list[str] = []
    run_spans: list[list[tuple[int, int]]] = []  # supervised character spans per run
    layout: list[tuple[int, int, bool]] = []  # (kind, value, sup) with TEXT value = run index
    cur: list[str] = []
    cur_sup: list[tuple[int, int]] = []
    cur_len = 0

    def flush() -> None:
        nonlocal cur, cur_sup, cur_len
        if cur:
            layout.append((TEXT, len(runs), False))
            runs.append("".join(cur))
            run_spans.append(cur_sup)
        cur, cur_sup, cur_len = [], [], 0

    for kind, value, sup in pieces:
        if kind == TEXT:
            s = value  # type: ignore[assignment]
            if sup:
                if cur_sup and cur_sup[-1][1] == cur_len:
                    cur_sup[-1] = (cur_sup[-1][0], cur_len + len(s))
                else:
                    cur_sup.append((cur_len, cur_len + len(s)))
            cur.append(s)
            cur_len += len(s)
        else:
            flush()
            layout.append((kind, value, sup))  # type: ignore[arg-type]
    flush()

    encoded = tok.encode_runs(runs)
    ids_parts: list[np.ndarray] = []
    tgt_parts: list[np.ndarray] = []
    for kind, value, sup in layout:
        if kind == TEXT:
            enc = encoded[value]
            ids = enc.ids
            ids_parts.append(np.asarray(ids, dtype=np.int64))
            t = np.zeros(len(ids), dtype=bool)
            for a, b in run_spans[value]:
                # Offsets are monotonic: the tokens overlapping [a, b) are one contiguous range, found by two
                # binary searches (cheaper than materializing every token's offsets for long texts).
                lo = _first_token(len(ids), lambda i, e=enc, a=a: _span(e, i)[1] > a)
                hi = _first_token(len(ids), lambda i, e=enc, b=b: _span(e, i)[0] >= b)
                t[lo:hi] = True
            tgt_parts.append(t)
        elif kind == SPECIAL:
            ids_parts.append(np.asarray([value], dtype=np.int64))
            tgt_parts.append(np.asarray([sup], dtype=bool))
        else:  # PADS
            pad, n = value  # type: ignore[misc]
            ids_parts.append(np.full(n, pad, dtype=np.int64))
            tgt_parts.append(np.zeros(n, dtype=bool))
    if not ids_parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(ids_parts), np.concatenate(tgt_parts)


def _span(enc, i: int) -> tuple[int, int]:
    span = enc.token_to_chars(i)
    return span if span is not None else (0, 0)


def _first_token(n: int, pred) -> int:
    """Smallest i in [0, n) with pred(i) true (pred monotonic), or n."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
