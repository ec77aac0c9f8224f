"""A small held-out chat dataset for the evaluation tests (tests/train/test_eval.py, tests/tools/test_eval_cli.py):
an image question, a video question, a multi-turn chat, and samples that are no question/answer pair (a caption
without roles, a question without an answer)."""

from __future__ import annotations

from pathlib import Path

from data.config import DataConfig, DatasetSpec
from data.media.video import VideoConfig
from tests.data.datahelpers import encode_video, js, small_image, tokenizer_dir, write_dataset

IMG_Q = [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                      {"type": "text", "text": "Which animal is this?"}]},
         {"role": "assistant", "content": "A cat."}]
VID_Q = [{"role": "user", "content": [{"type": "video", "video": "vid0.mp4"},
                                      {"type": "text", "text": "Which way does it move?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "To the "}, {"type": "text", "text": "right."}]}]
MULTI = [{"role": "system", "content": "You answer in one word."},
         {"role": "user", "content": "Two plus two?"},
         {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And three plus three?"},
         {"role": "assistant", "content": "Six."}]
NOREF = [{"role": "user", "content": "A question nobody answered"}]
VIDEO_CFG = VideoConfig(min_pixels=16 * 28 * 28, max_pixels=32 * 28 * 28, max_tokens=256)


def write_qa_dataset(root: Path) -> str:
    """The dataset's shards under root/heldout; returns that path."""
    clip = encode_video(112, 84, 8, fps=8)  # 1 s -> 4 frames at 2 fps -> 2 frame pairs
    samples = [
        ("img", {"json": js({"messages": IMG_Q}), "img0.png": small_image(2, 56, 84)}),
        ("pre", {"json": js({"content": "A caption without roles."})}),
        ("vid", {"json": js({"messages": VID_Q}), "vid0.mp4": clip}),
        ("multi", {"json": js({"messages": MULTI})}),
        ("noref", {"json": js({"messages": NOREF})}),
        ("img2", {"json": js({"messages": IMG_Q}), "img0.png": small_image(0, 84, 56)}),
    ]
    return write_dataset(root / "heldout", samples, per_shard=4)


def data_cfg(root: str, **kw) -> DataConfig:
    return DataConfig(datasets=[DatasetSpec(root)], tokenizer=tokenizer_dir(), max_tokens=2048,
                      max_pixels=64 * 28 * 28, video=VIDEO_CFG, **kw)
