"""Loader behaviour: the microbatch contract, dp/worker split, epochs, mixing, bad input, budgets, config."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from datahelpers import js, mixed_samples, small_image, text_chat, write_dataset

from data.config import DataConfig, DatasetSpec
from data.indexed import write_indexed
from data.loader import build_loader
from model.family import get_preset
from model.loss import model_loss
from model.vlm import VLModel


@pytest.fixture(scope="module")
def chat_ds(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("chat") / "chat", mixed_samples(40, seed=3), per_shard=7)


def _cfg(tok_dir, paths, **kw) -> DataConfig:
    base = dict(datasets=[DatasetSpec(p) if isinstance(p, str) else p for p in paths], tokenizer=tok_dir,
                max_tokens=320, max_pixels=64 * 28 * 28, shuffle_buffer=8, pack_buffer=6, num_workers=0, epochs=1)
    base.update(kw)
    return DataConfig(**base)


def test_microbatch_contract_and_model_consumes_it(tok_dir, chat_ds, family, vision):
    f2, p2 = vision.factor ** 2, vision.patch_size ** 2
    batches = list(build_loader(_cfg(tok_dir, [chat_ds], max_pixels=64 * f2), 0, 1, vision=vision))
    assert sum(len(b.sample_keys) for b in batches) == 40
    text_only = [b for b in batches if b.image_grid_thw.shape[0] == 0]
    with_img = [b for b in batches if b.image_grid_thw.shape[0] > 0]
    assert with_img
    for b in batches:
        b.validate()
        assert b.num_tokens <= 320
        cu = b.cu_seqlens.tolist()
        assert b.cu_seqlens.dtype == torch.int32 and len(cu) == len(b.sample_keys) + 1
        assert b.max_seqlen == max(e - s for s, e in zip(cu[:-1], cu[1:]))
        # Positions: the family's position ids of the packed sequence; every sample starts at 0.
        ref = vision.packed_position_ids(b.input_ids, b.cu_seqlens, b.image_grid_thw, b.video_grid_thw)
        assert torch.equal(b.position_ids, ref)
        assert all(int(b.position_ids[:, s].abs().sum()) == 0 for s in cu[:-1])
        # Labels are shifted within each sample: the last position of every sample predicts nothing.
        assert all(int(b.labels[e - 1]) == -100 for e in cu[1:])
        sup = b.labels != -100
        assert torch.equal(b.labels[:-1][sup[:-1]], b.input_ids[1:][sup[:-1]])
        # Raw uint8 rows (core/batch.py): one frame per image row, of the family's patch size; the model normalizes
        # them on the device.
        assert b.pixel_values.dtype == torch.uint8 and b.pixel_values.shape[1] == 3 * p2
    # Empty vision input is a valid (0, width) / (0, 3) input.
    if text_only:
        b = text_only[0]
        assert b.pixel_values.shape == (0, 3 * p2) and b.image_grid_thw.shape == (0, 3)
        assert b.pixel_values_videos.shape == (0, 3 * 2 * p2) and b.video_grid_thw.shape == (0, 3)

    # The model consumes the microbatches; packing changes nothing: the packed loss equals the sum of the
    # per-sample losses (no attention across samples, positions restart).
    torch.manual_seed(0)
    model = VLModel(get_preset(family, "tiny")).eval()
    for b in ([with_img[0]] + text_only[:1]):
        with torch.no_grad():
            loss_sum, n = model_loss(model, b.labels, **b.model_inputs())
            parts = 0.0
            cu = b.cu_seqlens.tolist()
            img_rows = (b.image_grid_thw.prod(-1)).tolist()
            row0 = g0 = 0
            for s, e in zip(cu[:-1], cu[1:]):
                ids = b.input_ids[s:e]
                n_img_tok = int((ids == model.cfg.image_token_id).sum())
                grids, acc = [], 0
                while acc < n_img_tok:
                    grids.append(b.image_grid_thw[g0])
                    acc += img_rows[g0] // 4
                    g0 += 1
                rows = sum(int(g.prod()) for g in grids)
                one = model_loss(model, b.labels[s:e], input_ids=ids, position_ids=b.position_ids[:, s:e],
                                 cu_seqlens=torch.tensor([0, e - s], dtype=torch.int32), max_seqlen=e - s,
                                 pixel_values=b.pixel_values[row0 : row0 + rows],
                                 image_grid_thw=torch.stack(grids) if grids else torch.zeros(0, 3, dtype=torch.long))
                parts += float(one[0])
                row0 += rows
        assert int(n) == b.num_supervised
        assert abs(float(loss_sum) - parts) < 1e-3 * max(1.0, abs(parts))


def test_every_sample_once_across_dp_ranks_and_workers(tok_dir, chat_ds):
    keys = []
    for rank in range(2):
        cfg = _cfg(tok_dir, [chat_ds], num_workers=2)
        keys += [k for b in build_loader(cfg, rank, 2) for k in b.sample_keys]
    assert len(keys) == len(set(keys)) == 40


def test_epochs_reshuffle_and_repeat(tok_dir, chat_ds):
    keys = [k for b in build_loader(_cfg(tok_dir, [chat_ds], epochs=2), 0, 1) for k in b.sample_keys]
    assert len(keys) == 80 and all(keys.count(k) == 2 for k in set(keys))
    first, second = keys[:40], keys[40:]
    assert first != second  # a new shard order and shuffle per epoch (the buffer blends the boundary)


def test_weighted_mix(tok_dir, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_indexed(str(tmp_path / name), [rng.integers(0, 1000, size=12) for _ in range(200)])
    cfg = _cfg(tok_dir, [DatasetSpec(str(tmp_path / "a"), weight=3.0, kind="indexed"),
                         DatasetSpec(str(tmp_path / "b"), weight=1.0, kind="indexed")],
               epochs=None, max_tokens=240, shuffle_buffer=4)
    loader = build_loader(cfg, 0, 1)
    keys = []
    for b in loader:
        keys += b.sample_keys
        if len(keys) >= 400:
            break
    frac_a = sum(k.startswith("a/") for k in keys) / len(keys)
    assert abs(frac_a - 0.75) < 0.06, frac_a
    m = loader.metrics()
    assert m["samples"] == len(keys) and m["epoch/a"] >= 1  # 300 of 200 samples: a second epoch of "a"
    # Indexed samples are pre-tokenized text: all tokens supervised (shifted), plain positions.
    b = next(iter(build_loader(cfg, 0, 1)))
    assert b.num_supervised == b.num_tokens - len(b.sample_keys)


def _bad_dataset(root) -> tuple[str, set[str]]:
    good_img = small_image(0, 64, 80)
    img_msg = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                                         {"type": "text", "text": "What?"}]},
                            {"role": "assistant", "content": "A picture."}]}
    samples = [
        ("good0", {"json": js(text_chat(0, 5))}),
        ("corrupt_image", {"json": js(img_msg), "img0.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20}),
        ("good1", {"json": js(img_msg), "img0.png": good_img}),
        ("truncated_image", {"json": js(img_msg), "img0.png": small_image(1, 64, 64, "JPEG")[:300]}),
        ("missing_member", {"json": js(img_msg)}),
        ("malformed_json", {"json": b'{"messages": [ {"role": "user", '}),
        ("good2", {"json": js(text_chat(2, 9))}),
        ("unknown_type", {"json": js({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]},
                                                   {"role": "assistant", "content": "hm"}]})}),
        ("empty_conversation", {"json": js({"messages": []})}),
        ("overlong", {"json": js(text_chat(5, 400))}),
        ("aspect_ratio", {"json": js(img_msg), "img0.png": small_image(2, 2, 500)}),
        ("no_json", {"img0.png": good_img}),
        ("good3", {"json": js(text_chat(3, 20))}),
        ("bad_role", {"json": js({"messages": [{"role": "robot", "content": "beep"}]})}),
        ("good4", {"json": js(img_msg), "img0.png": good_img}),
        ("no_assistant", {"json": js({"messages": [{"role": "user", "content": "hello"}]})}),
    ]
    return write_dataset(root, samples, per_shard=5), {k for k, _ in samples if k.startswith("good")}


EXPECTED_SKIPS = {"bad_image": 2, "missing_media": 1, "malformed_json": 1, "unknown_content_type": 1,
                  "empty_conversation": 1, "overlong": 1, "aspect_ratio": 1, "missing_json": 1, "bad_format": 1,
                  "no_supervised_tokens": 1}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_input_is_counted_logged_and_loses_no_good_sample(tok_dir, tmp_path, caplog, workers):
    root, good = _bad_dataset(tmp_path / "bad")
    caplog.set_level(logging.WARNING, logger="data.loader")
    loader = build_loader(_cfg(tok_dir, [root], max_tokens=600, num_workers=workers), 0, 1)
    keys = [k.rsplit("/", 1)[-1] for b in loader for k in b.sample_keys]
    assert sorted(keys) == sorted(good)
    m = loader.metrics()
    assert {k[len("skipped/"):]: v for k, v in m.items() if k.startswith("skipped/")} == EXPECTED_SKIPS
    assert m["skipped"] == sum(EXPECTED_SKIPS.values()) and m["samples_read"] == 16
    if workers == 0:  # (worker processes log to their own stderr)
        text = caplog.text
        for key in ("corrupt_image", "malformed_json", "no_json", "overlong"):
            assert "bad/shard-00000" in text and key in text, key


def test_overlong_truncate_text_only(tok_dir, tmp_path):
    img_long = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                                          {"type": "text", "text": "x " * 400}]},
                             {"role": "assistant", "content": "ok"}]}
    long_answer = {"messages": [{"role": "user", "content": "Tell a long story."},
                                {"role": "assistant", "content": "and then " * 200}]}
    root = write_dataset(tmp_path / "ds", [("long", {"json": js(long_answer)}),
                                           ("longq", {"json": js(text_chat(1, 400))}),
                                           ("short", {"json": js(text_chat(2, 3))}),
                                           ("longimg", {"json": js(img_long), "img0.png": small_image(0, 56, 56)})])
    loader = build_loader(_cfg(tok_dir, [root], max_tokens=128, overlong="truncate"), 0, 1)
    lens = {k.rsplit("/", 1)[-1]: int(e - s) for b in loader
            for k, s, e in zip(b.sample_keys, b.cu_seqlens[:-1], b.cu_seqlens[1:])}
    assert lens["long"] == 128 and "short" in lens and "longimg" not in lens
    # A chat cut before its answer has nothing left to learn: skipped as such.
    assert "longq" not in lens
    m = loader.metrics()
    assert m["truncated"] == 1 and m["skipped/overlong"] == 1 and m["skipped/no_supervised_tokens"] == 1


def test_patch_budget_and_best_fit(tok_dir, tmp_path):
    samples = []
    for i in range(24):
        side = 28 * (1 + i % 4)  # 4, 16, 36 or 64 patches per image
        msg = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                                         {"type": "text", "text": f"image {i}"}]},
                            {"role": "assistant", "content": "ok"}]}
        samples.append((f"k{i}", {"json": js(msg), "img0.png": small_image(i, side, side)}))
    root = write_dataset(tmp_path / "ds", samples)
    cfg = _cfg(tok_dir, [root], max_tokens=1024, max_patches=96, min_pixels=28 * 28, max_pixels=1024 * 28 * 28)
    batches = list(build_loader(cfg, 0, 1))
    assert sum(len(b.sample_keys) for b in batches) == 24
    assert all(b.num_patches <= 96 for b in batches)
    # The patch budget binds (tokens are far from 1024) and is reached exactly when the buffer allows it.
    assert sum(b.num_patches for b in batches) == 6 * (4 + 16 + 36 + 64)
    assert max(b.num_patches for b in batches) == 96


def test_config_is_strict(tok_dir, chat_ds):
    good = {"datasets": [{"path": chat_ds, "weight": 2}], "tokenizer": tok_dir, "max_tokens": 1024}
    cfg = DataConfig.from_dict(good)
    assert cfg.datasets[0].weight == 2.0 and cfg.video.fps == 2.0
    with pytest.raises(ValueError, match=r"unknown config key 'data.max_token' \(did you mean 'max_tokens'\?\)"):
        DataConfig.from_dict({**good, "max_token": 5})
    with pytest.raises(ValueError, match=r"unknown config key 'data.datasets\[0\].wieght' \(did you mean 'weight'"):
        DataConfig.from_dict({**good, "datasets": [{"path": chat_ds, "wieght": 1}]})
    with pytest.raises(ValueError, match="data.max_tokens: expected int, got 'many'"):
        DataConfig.from_dict({**good, "max_tokens": "many"})
    with pytest.raises(ValueError, match=r"data.supervise: must be one of 'auto' \| 'assistant' \| 'all', got 'every"):
        DataConfig.from_dict({**good, "supervise": "everything"})
    with pytest.raises(ValueError, match=r"unknown config key 'data.video.fsp' \(did you mean 'fps'\?\)"):
        DataConfig.from_dict({**good, "video": {"fsp": 1}})
    with pytest.raises(ValueError, match="datasets is empty"):
        DataConfig.from_dict({"tokenizer": tok_dir})
    with pytest.raises(ValueError, match="tokenizer.json"):
        build_loader(DataConfig(datasets=[DatasetSpec(chat_ds)], tokenizer=str(chat_ds)), 0, 1)
    with pytest.raises(ValueError, match="fewer than dp_size"):
        build_loader(_cfg(tok_dir, [chat_ds], num_workers=8), 0, 8)
    with pytest.raises(ValueError, match="data.shards"):
        build_loader(_cfg(tok_dir, [str(chat_ds) + "_nope"]), 0, 1)


def test_inputs_from_image_bytes_not_decoded_in_main(tok_dir, chat_ds, monkeypatch):
    """The main process decodes no image (the workers do): batches arrive as tensors, and the loader state holds
    sample references only (ints and strings, no bytes, arrays or tensors), so it stays small."""
    import os

    import data.sample as sample_mod

    main_pid, decoded_in_main = os.getpid(), []
    real = sample_mod.load_image

    def counting(*a, **k):
        if os.getpid() == main_pid:
            decoded_in_main.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sample_mod, "load_image", counting)  # forked workers inherit it; only main counts
    loader = build_loader(_cfg(tok_dir, [chat_ds], num_workers=2, epochs=None), 0, 1)
    it = iter(loader)
    batches = [next(it) for _ in range(3)]
    assert all(isinstance(b.pixel_values, torch.Tensor) for b in batches)
    assert sum(b.num_patches for b in batches) > 0  # images were decoded: by the workers
    assert not decoded_in_main
    st = loader.state_dict()

    def plain(x) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (bool, int, float, str))

    assert plain(st)
    buf = io.BytesIO()
    torch.save(st, buf)
    assert buf.tell() < 8_000
    loader.close()


def test_supervise_modes_and_default_system(tok_dir):
    from data.sample import RawSample, SampleProcessor
    from data.tokenizer import Tokenizer

    msg = {"messages": [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                                     {"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": "Hello!"}]}
    raw = RawSample("d/s/k", {"json": js(msg), "img0.png": small_image(0, 56, 56)})
    sp = Tokenizer.load(tok_dir).special
    vision = {sp.vision_start, sp.image_pad, sp.vision_end}

    def targets(**kw):
        p = SampleProcessor(DataConfig(tokenizer=tok_dir, **kw)).process(raw)
        t = [False] + (p.labels[:-1] != -100).tolist()
        return p.input_ids.tolist(), t

    ids, t_all = targets(supervise="all")
    assert all(t == (i not in vision) for i, t in zip(ids[1:], t_all[1:]))
    ids_a, t_a = targets(supervise="assistant")
    assert ids_a == ids and sum(t_a) == len(Tokenizer.load(tok_dir).encode("Hello!")) + 1  # + <|im_end|>
    ids_n, _ = targets(default_system=None)
    assert ids_n[0] == sp.im_start and Tokenizer.load(tok_dir).decode(ids_n[:3]) == "<|im_start|>user\n"
    assert len(ids) - len(ids_n) == len(Tokenizer.load(tok_dir).encode(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"))


def test_pixel_bounds_and_system_prompt_follow_the_family(tok_dir, chat_ds, family, vision):
    """Unset pixel bounds are the family's merged-token defaults (images 4 .. 16384, video frames 128 .. 768 tokens
    of factor x factor pixels), `default_system: auto` its chat template's; checks that need the factor use it."""
    f2 = vision.factor ** 2
    cfg = DataConfig.from_dict({"datasets": [{"path": chat_ds}], "tokenizer": tok_dir})
    assert cfg.min_pixels is None and cfg.max_pixels is None and cfg.default_system == "auto"
    assert cfg.image_pixels(vision) == (4 * f2, 16384 * f2) == (vision.min_pixels, vision.max_pixels)
    video = cfg.resolved_video(vision)
    assert (video.min_pixels, video.max_pixels) == (128 * f2, 768 * f2)
    assert cfg.system_prompt(vision) == vision.default_system
    assert (vision.default_system is None) == (family == "qwen3_vl")
    # min_pixels below one merge window of the family: an error at build time naming the factor (28*28 = 784 is
    # one window for Qwen2-VL and Qwen2.5-VL, less than one of Qwen3-VL's 32 x 32).
    small = _cfg(tok_dir, [chat_ds], min_pixels=28 * 28, max_pixels=None)
    if vision.factor == 28:
        build_loader(small, 0, 1, vision=vision).close()
    else:
        with pytest.raises(ValueError, match=r"data.min_pixels=784 is below one 32x32 merge window"):
            build_loader(small, 0, 1, vision=vision)
    with pytest.raises(ValueError, match=r"data.video.max_tokens=140 is below one frame pair"):
        build_loader(_cfg(tok_dir, [chat_ds], video={"min_pixels": 150 * f2, "max_tokens": 140}), 0, 1, vision=vision)
