"""No sample can crash a run (issue 22): text that spells control tokens, boxes out of range, 16-bit images, a
text file named .jpg, and any unexpected exception while one sample becomes tokens and pixels are counted skips
(or counted clamps) that name the sample; a dataset where such errors are common stops the run instead of
training on what is left without a word. Each case was a crash (or a silent wrong sample) before."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from datahelpers import js, small_image, take, text_chat, write_dataset
from PIL import Image

import data.sample as sample_mod
from data.chatml import SkipSample, box_text, parse_sample
from data.config import DataConfig, DatasetSpec
from data.loader import TooManySampleErrors, build_loader
from data.media.image import ImageDecodeError, decode_image, load_image
from data.sample import RawSample, SampleProcessor


def _cfg(tok_dir: str, path: str, **kw) -> DataConfig:
    base = dict(datasets=[DatasetSpec(path)], tokenizer=tok_dir, max_tokens=512, shuffle_buffer=4, pack_buffer=4,
                num_workers=0, epochs=1, seed=1)
    base.update(kw)
    return DataConfig(**base)


def _chat(user, assistant) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _image_chat(answer: list | str, name: str = "img0.png") -> dict:
    return _chat([{"type": "image", "image": name}, {"type": "text", "text": "Where is it?"}], answer)


def _keys(batches) -> set[str]:
    return {k.rsplit("/", 1)[-1] for b in batches for k in b.sample_keys}


def _good(n: int) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"g{i:03d}", {"json": js(text_chat(i, 4))}) for i in range(n)]


# ------------------------------------------------------------------------------------------ control tokens
@pytest.mark.parametrize("text,where", [
    ("what does <|image_pad|> mean?", "user"),
    ("<|vision_start|><|video_pad|><|vision_end|>", "user"),
    ("The answer.<|im_end|>\n<|im_start|>user\nmore", "assistant"),
])
def test_text_spelling_structure_tokens_is_a_counted_skip(text, where):
    """Before: `<|image_pad|>` in text became the pad id and position ids raised in the worker (a crash loop)."""
    obj = _chat(text, "fine") if where == "user" else _chat("question", text)
    with pytest.raises(SkipSample, match=r"spells the control token '<\|") as e:
        parse_sample(obj)
    assert e.value.reason == "control_token_in_text"
    assert "messages[" in str(e.value)


def test_grounding_and_eod_tokens_stay_control_tokens_as_in_transformers(tok_dir):
    """Qwen's own grounding text writes `<|box_start|>` & co. literally (ms-swift's converter too), and a pretraining
    text may separate documents with `<|endoftext|>`: those keep their meaning, ids as transformers' tokenizer
    gives them (a rendered pretraining text may also carry turn markers)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    text = "the cat <|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|> end<|endoftext|>x"
    proc = SampleProcessor(DataConfig(datasets=[DatasetSpec("x")], tokenizer=tok_dir))
    out = proc.process(RawSample("d/s/k", {"json": js({"content": text + "<|im_start|>user\nhi<|im_end|>"})}))
    want = hf(text + "<|im_start|>user\nhi<|im_end|>" + "<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert out.input_ids.tolist() == want
    parse_sample(_chat("where?", text))  # accepted in a chat as well


def test_loader_make_and_inspect_treat_control_tokens_alike(tok_dir, tmp_path, capsys):
    """The same rule in `data.shards make` (a counted skip with its line), the loader and `data.inspect`."""
    from data.inspect import main as inspect_main
    from data.shards.make import make

    bad = _chat("what is <|image_pad|>?", "a token")
    records = tmp_path / "in.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in [text_chat(0, 3), bad, text_chat(1, 3)]) + "\n")
    man = make(str(records), str(tmp_path), str(tmp_path / "made"))
    assert man["samples"] == 2 and man["skipped"] == {"control_token_in_text": 1}
    assert "line 2: control_token_in_text" in capsys.readouterr().err

    samples = _good(6)
    samples.insert(2, ("poison", {"json": js(bad)}))
    root = write_dataset(tmp_path / "ds", samples)
    loader = build_loader(_cfg(tok_dir, root), 0, 1)
    assert _keys(loader) == {k for k, _ in samples} - {"poison"}
    assert loader.metrics()["skipped/control_token_in_text"] == 1
    assert inspect_main(["--data", root, "--tokenizer", tok_dir, "--epochs", "1", "--workers", "0"]) == 0
    assert '"skipped/control_token_in_text": 1' in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ any exception
_STAGES = {  # the per-sample path, in order: each name is looked up in data.sample when a sample is processed
    "parse": "parse_sample",
    "media": "media_bytes",
    "image": "load_image",
    "video": "load_video",
    "render": "render",
    "tokenize": "tokenize",
    "positions": "position_ids",
    "labels": "shift_labels",
}


@pytest.fixture(scope="module")
def media_ds(tmp_path_factory) -> str:
    """Text, image and video samples; the ones whose key starts with 'boom' are the ones the stages fail on."""
    from datahelpers import encode_video

    video = encode_video(64, 48, 4)
    out = []
    for i in range(24):
        key = _key(i)
        if i % 3 == 0:
            out.append((key, {"json": js(_image_chat("here")), "img0.png": small_image(i, 56, 56)}))
        elif i % 3 == 1:
            obj = _chat([{"type": "video", "video": "vid0.mp4"}, {"type": "text", "text": "What moves?"}], "It.")
            out.append((key, {"json": js(obj), "vid0.mp4": video}))
        else:
            out.append((key, {"json": js(text_chat(i, 4))}))
    return write_dataset(tmp_path_factory.mktemp("stages") / "mix", out)


def _key(i: int) -> str:
    return f"{'boom' if i % 4 == 1 else 'ok'}{i:03d}"  # boom: 2 text, 2 image, 2 video samples


def _failing(stage: str) -> set[str]:
    """The 'boom' samples that reach `stage` (images and videos only pass through their own stages)."""
    kinds = {"image": (0,), "video": (1,), "media": (0, 1)}.get(stage, (0, 1, 2))
    return {_key(i) for i in range(24) if i % 4 == 1 and i % 3 in kinds}


def _fail_stage(monkeypatch, stage: str) -> None:
    """Make one stage of the per-sample path raise an error nobody anticipated, for the 'boom' samples only."""
    current = {"key": ""}
    process = SampleProcessor.process

    def tracking(self, raw, *a, **k):
        current["key"] = raw.key
        return process(self, raw, *a, **k)

    name = _STAGES[stage]
    real = getattr(sample_mod, name)

    def broken(*a, **k):
        if current["key"].rsplit("/", 1)[-1].startswith("boom"):
            raise RuntimeError(f"unexpected failure in {stage}")
        return real(*a, **k)

    monkeypatch.setattr(SampleProcessor, "process", tracking)
    monkeypatch.setattr(sample_mod, name, broken)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", list(_STAGES))
def test_an_unexpected_error_in_any_stage_is_a_counted_skip_naming_the_sample(tok_dir, media_ds, stage,
                                                                              monkeypatch, caplog):
    """Before: the exception ended the DataLoader worker and the run (and every restart, at the same sample)."""
    _fail_stage(monkeypatch, stage)
    loader = build_loader(_cfg(tok_dir, media_ds, max_tokens=2048, max_error_fraction=0.5), 0, 1)
    with caplog.at_level(logging.DEBUG, logger="data.loader"):
        keys = _keys(loader)
    boom = _failing(stage)
    assert keys == {_key(i) for i in range(24)} - boom
    assert loader.metrics()["skipped/error"] == len(boom) >= 2
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "boom" in r.getMessage()]
    assert warn and all("mix/shard-" in m and f"RuntimeError: unexpected failure in {stage}" in m for m in warn)
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]
    assert debug and "unexpected failure" in str(debug[0].exc_info[1])  # the traceback, at debug level


@pytest.mark.timeout(120)
def test_errors_cross_the_worker_process_boundary_as_skips(tok_dir, media_ds, monkeypatch):
    _fail_stage(monkeypatch, "tokenize")
    loader = build_loader(_cfg(tok_dir, media_ds, max_tokens=2048, num_workers=2, start_method="fork",
                               max_error_fraction=0.5), 0, 1)
    assert _keys(loader) == {_key(i) for i in range(24)} - _failing("tokenize")
    assert loader.metrics()["skipped/error"] == 6


def test_a_systematically_failing_dataset_stops_instead_of_training_on(tok_dir, tmp_path, monkeypatch):
    """max_error_fraction: 1 sample in 4 failing is a bug, not noise: the run stops, naming the dataset."""
    samples = [(f"{'boom' if i % 4 == 0 else 'ok'}{i:03d}", {"json": js(text_chat(i, 4))}) for i in range(400)]
    root = write_dataset(tmp_path / "broken", samples, per_shard=100)
    _fail_stage(monkeypatch, "render")
    with pytest.raises(TooManySampleErrors, match=r"of the \d+ samples .* raised an unexpected error "
                       r".*max_error_fraction=0\.01.*broken/shard-\d+\.tar/boom\d+: error: RuntimeError") as e:
        take(build_loader(_cfg(tok_dir, root, epochs=None), 0, 1), 200)  # bounded: without the stop it runs on
    assert "'broken'" in str(e.value)


# ------------------------------------------------------------------------------------------ boxes
def test_box_coordinates_that_overflow_do_not_crash():
    """Before: 1e308 passed validation and overflowed in the [0, 1000) normalization (OverflowError)."""
    assert box_text([0, 0, 1e308, 1e308], 50, 50) == "(0,0),(999,999)"
    assert box_text([-1e308, 5, 25, 25], 50, 50) == "(0,100),(500,500)"


def test_boxes_are_clamped_with_a_count_and_a_box_outside_its_image_is_skipped(tok_dir):
    proc = SampleProcessor(DataConfig(datasets=[DatasetSpec("x")], tokenizer=tok_dir))
    img = small_image(0, 100, 200)  # width 200, height 100

    def run(boxes):
        obj = _image_chat([{"type": "box", "box": boxes, "ref": "it"}])
        return proc.process(RawSample("ds/shard-0.tar/k", {"json": js(obj), "img0.png": img}))

    assert run([[10, 10, 200, 100]]).clamped_boxes == 0  # on the border: nothing to clamp
    assert run([[10, 10, 200.5, 100]]).clamped_boxes == 0  # within the tolerance
    assert run([[-30, 10, 50, 150], [0, 0, 10, 10]]).clamped_boxes == 1  # partly outside: clamped, counted
    for outside in ([[250, 10, 400, 50]], [[0, 0, 500, 800], [300, 300, 900, 900]]):  # wrong scale (0-1000)
        with pytest.raises(SkipSample, match=r"wholly outside its image \(200x100\).*another scale") as e:
            run(outside)
        assert e.value.reason == "box_outside_image"


def test_the_loader_counts_clamped_boxes(tok_dir, tmp_path):
    samples = _good(4) + [("clamp", {"json": js(_image_chat([{"type": "box", "box": [0, 0, 300, 40]}])),
                                     "img0.png": small_image(0, 56, 56)})]
    loader = build_loader(_cfg(tok_dir, write_dataset(tmp_path / "b", samples)), 0, 1)
    assert "clamp" in _keys(loader) and loader.metrics()["clamped_boxes"] == 1


# ------------------------------------------------------------------------------------------ images
def _png16(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_16bit_grayscale_png_is_scaled_to_8_bits_not_saturated(hf_proc_factory):
    """Before (and in transformers): every value above 255 became 255, a white image."""
    from data.media.vision import image_rows_u8

    ramp = (np.arange(56 * 56, dtype=np.uint32).reshape(56, 56) * 65535 // (56 * 56 - 1)).astype(np.uint16)
    data = _png16(ramp)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    px = load_image(data, 28 * 28, 56 * 56).pixels_HWC
    want = ((ramp.astype(np.uint32) + 128) // 257).astype(np.uint8)
    assert np.array_equal(px[..., 0], want) and np.array_equal(px[..., 1], want) and np.array_equal(px[..., 2], want)
    # transformers' processor (the deliberate difference, docs/data.md): all but the darkest 1/257 saturates
    hf = hf_proc_factory(28 * 28, 56 * 56).image_processor(images=[Image.open(io.BytesIO(data))],
                                                            return_tensors="np")["pixel_values"]
    clipped = np.repeat(np.minimum(ramp, 255).astype(np.uint8)[..., None], 3, axis=2)
    assert np.abs(hf - image_rows_u8(clipped).numpy()).max() < 1e-5
    assert np.abs(hf - image_rows_u8(px).numpy()).max() > 1.0
    dark = np.full((56, 56), 100, dtype=np.uint16)  # an 8-bit-range value in a 16-bit file is dark, as stored
    assert load_image(_png16(dark), 28 * 28, 56 * 56).pixels_HWC.max() == 0


def test_text_file_named_jpg_names_the_member(tok_dir):
    """Before: 'cannot identify image file <_io.BytesIO object at 0x...>'."""
    proc = SampleProcessor(DataConfig(datasets=[DatasetSpec("x")], tokenizer=tok_dir))
    obj = _image_chat("x", "img0.jpg")
    with pytest.raises(SkipSample) as e:
        proc.process(RawSample("ds/shard-0.tar/k", {"json": js(obj), "img0.jpg": b"plain text, not a JPEG\n"}))
    assert e.value.reason == "bad_image" and "BytesIO" not in str(e.value)
    assert "cannot identify image file 'img0.jpg'" in str(e.value) and "b'plain text" in str(e.value)
    with pytest.raises(ImageDecodeError) as e:
        decode_image(b"hello, I am a text file\n", "img0.jpg")
    assert "img0.jpg" in str(e.value) and "BytesIO" not in str(e.value)


def test_pixels_of_normal_images_are_unchanged(tok_dir):
    """The 16-bit path leaves 8-bit images alone (the transformers parity tests cover them in full)."""
    data = small_image(2, 60, 90)
    px = load_image(data, 28 * 28, 60 * 90 * 2).pixels_HWC
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((px.shape[1], px.shape[0]),
                                                                          Image.Resampling.BICUBIC))
    assert torch.equal(torch.from_numpy(px), torch.from_numpy(ref))
