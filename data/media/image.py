"""Image decoding and Qwen-VL's naive dynamic resolution, at the family's resize factor.

Shape legend: H/W = resized height/width, C = 3 channels, N = patch rows, P = 3 * 2 * p * p (p: patch size).

Pipeline per image, the same steps as transformers' Qwen2VLImageProcessorPil (and qwen-vl-utils), which every
family's image processor is with its own patch size and mean / std: bytes -> PIL decode -> RGB (transparency
composited onto white) -> smart_resize(h, w, factor) -> PIL BICUBIC resize -> uint8 (H, W, C).
One deliberate difference: a 16-bit grayscale image is scaled to 8 bits (to_8bit), where PIL's conversion, and so
transformers', saturates every value above 255 to white. The packing buffer keeps this uint8 image;
`data.media.vision.image_rows_raw` patchifies it into raw uint8 rows (one frame per row) when the microbatch is
assembled, and the model rescales, normalizes (the family's mean / std) and adds the temporal copy on the device
(model.vision.normalize_pixel_rows): the float32 rows transformers' processor returns would be 8x the bytes through
worker queues and host-to-device copies.

NOTE: no EXIF orientation is applied, as in transformers and qwen-vl-utils (the released models were trained
that way); rotate photos when building shards if needed.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data.media.vision import AspectRatioError, smart_resize, vision_or_default
from model.processing import VisionProcessing

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageDecodeError(ValueError):
    """Corrupt, truncated or unsupported image bytes (a counted skip in the loader)."""


@dataclass
class LoadedImage:
    """A resized image ready for patchify."""

    pixels_HWC: np.ndarray
    """uint8 RGB, sides multiples of the resize factor (patch x merge: 28 or 32)."""
    grid_thw: tuple[int, int, int]
    """(1, H/p, W/p)."""
    orig_size: tuple[int, int]
    """(width, height) before resizing: grounding boxes are normalized against it."""
    merge_size: int = 2

    @property
    def num_patches(self) -> int:
        return self.grid_thw[0] * self.grid_thw[1] * self.grid_thw[2]

    @property
    def num_tokens(self) -> int:
        return self.num_patches // (self.merge_size * self.merge_size)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (what transformers and qwen-vl-utils do)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (PIL modes I;16*, and mode I as PNG decodes 16-bit on older Pillow) scaled to 8 bits,
    v -> round(v / 257), so 65535 is white; PIL's own conversion clips every value above 255 to white (and so does
    transformers' processor, which converts with PIL). Other modes are left to to_rgb."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        a = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((np.clip(a, 0, 65535) + 128) // 257).astype(np.uint8), mode="L")
    return img


def decode_image(data: bytes, name: str | None = None) -> Image.Image:
    """Fully decoded RGB PIL image; ImageDecodeError for anything PIL cannot decode completely. `name` (the
    member or path) is what the error message calls the image."""
    what = repr(name) if name else "image"
    if not data:
        raise ImageDecodeError(f"{what}: zero-length image")
    buf = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning becomes an error: a 100+ MP "image" is not training data.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(buf)
            img.load()  # decode now, so truncated files fail here and not later in a resize
            return to_rgb(to_8bit(img))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL names the stream it was given (`<_io.BytesIO object at 0x...>`): name the image instead.
        detail = str(e).replace(repr(buf), what)
        head = data[:16]
        raise ImageDecodeError(f"cannot decode {what} ({len(data)} bytes, starting {head!r}): {detail}") from e


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header only, or None when it cannot be read (used by the shard indexer)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:
        return None


def load_image(data: bytes, min_pixels: int | None = None, max_pixels: int | None = None, name: str | None = None,
               vision: VisionProcessing | None = None) -> LoadedImage:
    """Decode, convert to RGB and resize with smart_resize at the family's factor + PIL BICUBIC (transformers' PIL
    backend). `min_pixels` / `max_pixels` None: the family's defaults (4 and 16384 merged tokens); `vision` None:
    Qwen2-VL's facts.

    Raises ImageDecodeError (bad bytes; the message calls the image `name`) or AspectRatioError (aspect ratio >
    200); both are counted skips.
    """
    v = vision_or_default(vision)
    img = decode_image(data, name)
    w, h = img.size
    # transformers' arithmetic (the parity target); differs from qwen-vl-utils only for sides < factor / 2.
    rh, rw = smart_resize(h, w, v.factor, min_pixels, max_pixels, clamp_to_factor=False)
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ImageDecodeError(f"decoded image has shape {pixels.shape}, expected (H, W, 3)")
    return LoadedImage(pixels, (1, rh // v.patch_size, rw // v.patch_size), (w, h), v.merge_size)


__all__ = ["AspectRatioError", "ImageDecodeError", "LoadedImage", "decode_image", "image_size", "load_image"]
