"""M-RoPE position ids against Qwen's reference algorithms (Qwen2-VL, Qwen2.5-VL's time-scaled video ids) and
transformers' get_rope_index (Qwen3-VL, where the two agree), with a pin on transformers 5.x's departure from the
reference for Qwen2-VL and Qwen2.5-VL videos.

`reference_rope_index` re-implements, independently of model/position_ids.py, the published reference:
`Qwen2VLForConditionalGeneration.get_rope_index` of the Qwen2-VL release (transformers 4.45). It scans the
`<|vision_start|>` tokens, decides image vs video by the token after each, takes the next image/video pad
position from the current cursor, gives the text before the block st_idx + arange (st_idx = previous max
+ 1), the block (t, h/2, w/2) grid offsets + text_len + st_idx, and the trailing text again previous max + 1.
`reference_rope_index_25` is the same scan with Qwen2.5-VL's video time (qwen-vl-finetune's get_rope_index_25 and
transformers 4.49-4.5x): a video's temporal offsets are long(index x second_per_grid_t x tokens_per_second).
"""

from __future__ import annotations

import pytest
import torch

from model.config import IMAGE_PAD_ID, VIDEO_PAD_ID, VISION_END_ID, VISION_START_ID
from model.position_ids import mrope_position_ids, packed_mrope_position_ids

MERGE = 2


def reference_rope_index(input_ids: torch.Tensor, image_grid_thw, video_grid_thw, second_per_grid_ts=None,
                         tokens_per_second: float = 2.0) -> torch.Tensor:
    """Qwen2-VL release get_rope_index for one unpadded sample (with second_per_grid_ts: Qwen2.5-VL's
    get_rope_index_25); returns (3, L)."""
    tokens = input_ids.tolist()
    starts = [i for i, t in enumerate(tokens) if t == VISION_START_ID]
    after = [tokens[i + 1] for i in starts]
    image_nums, video_nums = after.count(IMAGE_PAD_ID), after.count(VIDEO_PAD_ID)
    remain_images, remain_videos = image_nums, video_nums
    image_index = video_index = 0
    st = 0
    llm_pos_ids_list: list[torch.Tensor] = []
    for _ in range(image_nums + video_nums):
        ed_image = tokens.index(IMAGE_PAD_ID, st) if IMAGE_PAD_ID in tokens and remain_images > 0 else len(tokens) + 1
        ed_video = tokens.index(VIDEO_PAD_ID, st) if VIDEO_PAD_ID in tokens and remain_videos > 0 else len(tokens) + 1
        if ed_image < ed_video:
            t, h, w = image_grid_thw[image_index].tolist()
            seconds = None
            image_index += 1
            remain_images -= 1
            ed = ed_image
        else:
            t, h, w = video_grid_thw[video_index].tolist()
            seconds = None if second_per_grid_ts is None else second_per_grid_ts[video_index]
            video_index += 1
            remain_videos -= 1
            ed = ed_video
        llm_grid_t, llm_grid_h, llm_grid_w = t, h // MERGE, w // MERGE
        text_len = ed - st
        st_idx = int(llm_pos_ids_list[-1].max()) + 1 if llm_pos_ids_list else 0
        llm_pos_ids_list.append(torch.arange(text_len).view(1, -1).expand(3, -1) + st_idx)
        t_range = torch.arange(llm_grid_t).view(-1, 1).expand(-1, llm_grid_h * llm_grid_w)
        if seconds is not None:
            t_range = (t_range * torch.tensor(seconds, dtype=torch.float32) * tokens_per_second).long()
        t_index = t_range.flatten()
        h_index = torch.arange(llm_grid_h).view(1, -1, 1).expand(llm_grid_t, -1, llm_grid_w).flatten()
        w_index = torch.arange(llm_grid_w).view(1, 1, -1).expand(llm_grid_t, llm_grid_h, -1).flatten()
        llm_pos_ids_list.append(torch.stack([t_index, h_index, w_index]) + text_len + st_idx)
        st = ed + llm_grid_t * llm_grid_h * llm_grid_w
    if st < len(tokens):
        st_idx = int(llm_pos_ids_list[-1].max()) + 1 if llm_pos_ids_list else 0
        llm_pos_ids_list.append(torch.arange(len(tokens) - st).view(1, -1).expand(3, -1) + st_idx)
    return torch.cat(llm_pos_ids_list, dim=1)


def build(parts, seed=0):
    """parts: int = text tokens; ('image' | 'video', (t, h, w)) = <|vision_start|> pads <|vision_end|>."""
    g = torch.Generator().manual_seed(seed)
    ids, img, vid = [], [], []
    for p in parts:
        if isinstance(p, int):
            ids.append(torch.randint(0, 151643, (p,), generator=g))
        else:
            kind, (t, h, w) = p
            pad = IMAGE_PAD_ID if kind == "image" else VIDEO_PAD_ID
            ids += [torch.tensor([VISION_START_ID]), torch.full((t * h * w // MERGE**2,), pad),
                    torch.tensor([VISION_END_ID])]
            (img if kind == "image" else vid).append((t, h, w))
    return (torch.cat(ids), torch.tensor(img).reshape(-1, 3) if img else None,
            torch.tensor(vid).reshape(-1, 3) if vid else None)


CASES = {
    "text only": [17],
    "one image": [5, ("image", (1, 8, 12)), 6],
    "image first, no leading text": [("image", (1, 4, 4)), 3],
    "two images of different shapes": [4, ("image", (1, 6, 14)), 2, ("image", (1, 14, 4)), 5],
    "video, frames < spatial": [3, ("video", (2, 8, 8)), 4],
    # 9 frame pairs on a merged 2x3 grid: the block's max id comes from t, not from h or w.
    "video with more frame pairs than its merged spatial size": [3, ("video", (9, 4, 6)), 7],
    "interleaved image, long video, image": [2, ("image", (1, 4, 8)), 3, ("video", (7, 4, 4)), 2,
                                             ("image", (1, 10, 6)), 4],
    "ends with a vision block": [6, ("video", (5, 4, 4))],
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    ids, img, vid = build(CASES[name])
    torch.testing.assert_close(mrope_position_ids(ids, img, vid), reference_rope_index(ids, img, vid), rtol=0, atol=0)


def test_long_video_case_really_exercises_the_temporal_maximum():
    ids, img, vid = build(CASES["video with more frame pairs than its merged spatial size"])
    pos = mrope_position_ids(ids, img, vid)
    block_start = 3 + 1  # 3 text tokens + <|vision_start|>
    end_tok = int(torch.nonzero(ids == VISION_END_ID)[0])
    assert pos[0, end_tok] == pos[0, block_start] + 9  # start + max(t=9, h=2, w=3)


def test_packed_samples_restart_and_match_reference_per_sample():
    samples = [build(CASES[n], seed=i) for i, n in enumerate(
        ["one image", "video with more frame pairs than its merged spatial size", "text only",
         "interleaved image, long video, image", "two images of different shapes"])]
    ids = torch.cat([s[0] for s in samples])
    cu = torch.tensor([0, *torch.tensor([s[0].numel() for s in samples]).cumsum(0).tolist()], dtype=torch.int32)
    imgs = torch.cat([s[1] for s in samples if s[1] is not None])
    vids = torch.cat([s[2] for s in samples if s[2] is not None])
    got = packed_mrope_position_ids(ids, cu, imgs, vids)
    want = torch.cat([reference_rope_index(*s) for s in samples], dim=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[:, cu[:-1].long()] == 0).all()  # every sample restarts at 0


def test_real_tokenizer_chat_matches_reference(tokenizer_dir):
    """Token ids from the real Qwen2 tokenizer (a ChatML turn with an image and a video)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    img, vid = (1, 6, 8), (5, 4, 4)
    text = ("<|im_start|>user\nLook: <|vision_start|>" + "<|image_pad|>" * (6 * 8 // 4) + "<|vision_end|> and "
            "<|vision_start|>" + "<|video_pad|>" * (5 * 4 * 4 // 4) + "<|vision_end|> what moves?<|im_end|>\n"
            "<|im_start|>assistant\nA digit.<|im_end|>\n")
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids)
    assert int((ids == IMAGE_PAD_ID).sum()) == 12 and int((ids == VIDEO_PAD_ID).sum()) == 20
    g_img, g_vid = torch.tensor([img]), torch.tensor([vid])
    torch.testing.assert_close(mrope_position_ids(ids, g_img, g_vid), reference_rope_index(ids, g_img, g_vid),
                               rtol=0, atol=0)


def test_mismatched_grids_raise():
    ids, img, _ = build([3, ("image", (1, 4, 4)), 2])
    with pytest.raises(ValueError, match="placeholders"):
        mrope_position_ids(ids, torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match="image grids"):
        mrope_position_ids(ids, torch.cat([img, img]))


# ------------------------------------------------------------------ transformers 5.x pin
def _transformers_rope_index(hf, ids, img, vid, **kw) -> torch.Tensor:
    mm = (ids == IMAGE_PAD_ID).int() + 2 * (ids == VIDEO_PAD_ID).int()
    pos, _ = hf.model.get_rope_index(ids[None], mm_token_type_ids=mm[None], image_grid_thw=img, video_grid_thw=vid,
                                     **kw)
    return pos[:, 0]


def transformers5_rule(ids, img, vid, seconds=None) -> torch.Tensor:
    """The reference algorithm with transformers 5.x's advance after a vision block: max(h, w) // merge."""
    out, running, i = [], 0, 0
    grids = {"image": iter(img.tolist() if img is not None else []),
             "video": iter(vid.tolist() if vid is not None else [])}
    scales = iter(seconds or [])
    tokens = ids.tolist()
    while i < len(tokens):
        if tokens[i] in (IMAGE_PAD_ID, VIDEO_PAD_ID):
            t, h, w = next(grids["image" if tokens[i] == IMAGE_PAD_ID else "video"])
            lh, lw = h // MERGE, w // MERGE
            t_ids = torch.arange(t)
            if tokens[i] == VIDEO_PAD_ID and seconds:
                t_ids = (t_ids * torch.tensor(2 * next(scales), dtype=torch.float32)).long()
            tt, hh, ww = torch.meshgrid(t_ids, torch.arange(lh), torch.arange(lw), indexing="ij")
            out.append(torch.stack([tt, hh, ww]).reshape(3, -1) + running)
            running += max(lh, lw)
            i += t * lh * lw
        else:
            out.append(torch.full((3, 1), running))
            running += 1
            i += 1
    return torch.cat(out, dim=1)


def build_timestamped(parts, seed=0):
    """Like build(), with Qwen3-VL's video layout: <|vision_start|>, then per frame pair a 4-token text timestamp
    and <|vision_start|> pads <|vision_end|>, then <|vision_end|>."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in parts:
        if isinstance(p, tuple) and p[0] == "video":
            t, h, w = p[1]
            out.append(torch.tensor([VISION_START_ID]))
            for _ in range(t):
                out += [torch.randint(0, 151643, (4,), generator=g), torch.tensor([VISION_START_ID]),
                        torch.full((h * w // MERGE**2,), VIDEO_PAD_ID), torch.tensor([VISION_END_ID])]
            out.append(torch.tensor([VISION_END_ID]))
        else:
            out.append(build([p], seed)[0])
    _, img, vid = build(parts, seed)
    return torch.cat(out), img, vid


SECONDS = [1.0, 0.5, 1.5]  # per video: 2, 1 and 3 temporal ids per frame pair at 2 tokens per second


@pytest.mark.parametrize("name", list(CASES))
def test_qwen2_5_vl_time_scaled_ids_match_its_reference(name):
    from model.family import get_family, get_preset

    cfg = get_preset("qwen2_5_vl", "tiny")
    proc = get_family("qwen2_5_vl").processing(cfg)
    ids, img, vid = build(CASES[name])
    seconds = SECONDS[: 0 if vid is None else vid.shape[0]]
    ref = reference_rope_index(ids, img, vid, seconds, tokens_per_second=cfg.vision.tokens_per_second)
    torch.testing.assert_close(proc.position_ids(ids, img, vid, seconds or None), ref, rtol=0, atol=0)
    if vid is not None and name.startswith("video with more"):
        # 9 pairs x 2 ids per pair: the block's max id comes from the scaled time (16), not from t (9).
        end_tok = int(torch.nonzero(ids == VISION_END_ID)[0])
        assert ref[0, end_tok] == ref[0, 4] + 17


def test_qwen3_vl_ids_match_transformers_get_rope_index():
    """Qwen3-VL: videos are one block per frame pair, behind a text timestamp; here transformers 5.x's own
    get_rope_index is the reference (it agrees with Qwen's), for every case, packing included."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from model.family import get_family, get_preset, hf_config_dict
    from tests.model.conftest import small_cfg

    cfg = small_cfg("qwen3_vl")
    d = hf_config_dict(cfg)
    d.pop("model_type")
    with torch.device("meta"):
        hf = Qwen3VLModel(Qwen3VLConfig(**d))
    proc = get_family("qwen3_vl").processing(get_preset("qwen3_vl", "tiny"))
    samples = []
    for i, name in enumerate(CASES):
        ids, img, vid = build_timestamped(CASES[name], seed=i)
        mm = (ids == IMAGE_PAD_ID).int() + 2 * (ids == VIDEO_PAD_ID).int()
        theirs, _ = hf.get_rope_index(ids[None], mm_token_type_ids=mm[None], image_grid_thw=img,
                                      video_grid_thw=None if vid is None else vid.clone())
        ours = proc.position_ids(ids, img, vid)
        torch.testing.assert_close(ours, theirs[:, 0].cpu(), rtol=0, atol=0, msg=name)
        samples.append((ids, img, vid, ours))
    ids = torch.cat([s[0] for s in samples])
    cu = torch.tensor([0, *torch.tensor([s[0].numel() for s in samples]).cumsum(0).tolist()], dtype=torch.int32)
    imgs = torch.cat([s[1] for s in samples if s[1] is not None])
    vids = torch.cat([s[2] for s in samples if s[2] is not None])
    torch.testing.assert_close(proc.packed_position_ids(ids, cu, imgs, vids),
                               torch.cat([s[3] for s in samples], dim=1), rtol=0, atol=0)


def test_pin_transformers5_rope_index(hf_tiny, family):
    """transformers 5.x advances by max(h, w)//2 after a vision block. This pins that behaviour for Qwen2-VL and
    Qwen2.5-VL: if an upgrade changes it (e.g. back to the reference), this test fails and docs/model.md must be
    revisited. (Qwen3-VL's per-frame blocks agree with it: test above.)"""
    import transformers

    if family == "qwen3_vl":
        return  # covered by test_qwen3_vl_ids_match_transformers_get_rope_index
    time = family == "qwen2_5_vl"

    def seconds(vid):
        return SECONDS[: vid.shape[0]] if time and vid is not None else None

    def extra(vid):
        return {"second_per_grid_ts": torch.tensor(seconds(vid))} if seconds(vid) else {}

    def ours_for(ids, img, vid):
        return reference_rope_index(ids, img, vid, seconds(vid)) if time else mrope_position_ids(ids, img, vid)

    for name in ["one image", "two images of different shapes", "video, frames < spatial"]:
        ids, img, vid = build(CASES[name])
        theirs = _transformers_rope_index(hf_tiny, ids, img, vid, **extra(vid))
        torch.testing.assert_close(theirs, ours_for(ids, img, vid), rtol=0, atol=0,
                                   msg=f"{name}: transformers and the reference should agree here")
    for name in ["video with more frame pairs than its merged spatial size", "interleaved image, long video, image"]:
        ids, img, vid = build(CASES[name])
        theirs = _transformers_rope_index(hf_tiny, ids, img, vid, **extra(vid))
        torch.testing.assert_close(theirs, transformers5_rule(ids, img, vid, seconds(vid)), rtol=0, atol=0,
                                   msg=f"transformers {transformers.__version__} changed its rope index on {name}")
        ours = ours_for(ids, img, vid)
        assert not torch.equal(theirs, ours), f"{name}: expected the 5.x rope index to differ from the reference"
        # Inside the vision block they agree; only the text after it is shifted.
        first_diff = int(torch.nonzero((theirs != ours).any(0))[0])
        assert ids[first_diff - 1] == VISION_END_ID or ids[first_diff] == VISION_END_ID
