"""Long videos and the microbatch budgets (issues 12 and 13), each reproduced first: a video.max_tokens that cannot
fit is a config error naming what to raise; by default a video is capped to what the budgets hold; a sample whose
videos cannot fit is skipped from the containers' metadata, never decoded, and not opened again next epoch; a
20-minute clip trains through a shipped recipe's data settings (a video sample travels alone in a larger
microbatch)."""

from __future__ import annotations

import pytest
from datahelpers import encode_video, js, text_chat, write_dataset

import data.media.video as video_mod
import data.media.video_cache as cache_mod
from core.config import ConfigError
from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from train.config import load_config

QA = [{"role": "user", "content": [{"type": "video", "video": "vid0.mp4"},
                                   {"type": "text", "text": "What happens in this video?"}]},
      {"role": "assistant", "content": "The astronaut drifts to the right, slowly, for twenty minutes."}]


@pytest.fixture(scope="module")
def long_clip() -> bytes:
    """A 20-minute clip (2400 frames at 2 fps, 64x48), encoded now with PyAV."""
    return encode_video(64, 48, 2400, fps=2)


def _counting(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_video_max_tokens_beyond_the_budgets_is_a_config_error():
    """Before: accepted; every long video was then decoded and skipped for too many patches, epoch after epoch."""
    d = {"datasets": [{"path": "/data/x"}], "tokenizer": "/tok", "max_tokens": 8192, "max_patches": 16384,
         "video": {"max_tokens": 16384}}
    with pytest.raises(ConfigError, match=r"data\.video\.max_tokens=16384 cannot fit.*16386 LLM tokens > "
                                          r"data\.max_tokens=8192 and 65536 ViT patch rows > data\.max_patches=16384"
                                          r".*Raise data\.max_video_sample_tokens.*or lower data\.video\.max_tokens "
                                          r"to <= 4096"):
        DataConfig.from_dict(d)
    with pytest.raises(ConfigError, match=r"65536 ViT patch rows > data\.max_video_sample_patches=32768"):
        load_config("recipes/qwen2vl_2b/stage2.yaml", ["data.tokenizer=/tok", "data.max_video_sample_patches=32768"])
    ok = DataConfig.from_dict({**d, "max_video_sample_tokens": 20480, "max_video_sample_patches": 65536})
    assert ok.resolved_video().max_tokens == 16384
    auto = DataConfig.from_dict({k: v for k, v in d.items() if k != "video"})
    assert auto.resolved_video().max_tokens == 4096  # 0 (automatic): a quarter of the patch rows


@pytest.mark.timeout(120)
def test_long_clip_is_capped_to_the_budgets_and_decoded_once(tok_dir, tmp_path, long_clip, monkeypatch):
    """The issue's case: 2 samples, one with a 20-minute clip, max_tokens 8192 / max_patches 16384. Before: the
    clip was decoded (0.72 s) and skipped for too many patches, again and again (180 s to the first microbatch)."""
    root = write_dataset(tmp_path / "two", [("vid", {"json": js({"messages": QA}), "vid0.mp4": long_clip}),
                                            ("txt", {"json": js(text_chat(1, 20))})])
    decodes = _counting(monkeypatch, cache_mod, "decode_frames")
    cfg = DataConfig(datasets=[DatasetSpec(root)], tokenizer=tok_dir, max_tokens=8192, max_patches=16384,
                     num_workers=0, epochs=1)
    loader = build_loader(cfg, 0, 1)
    batches = list(loader)
    assert loader.metrics()["skipped"] == 0 and len(decodes) == 1
    grids = [g for b in batches for g in b.video_grid_thw.tolist()]
    assert len(grids) == 1
    t, h, w = grids[0]
    assert 2048 < t * h * w // 4 <= 4096 and t * h * w <= 16384


@pytest.mark.timeout(120)
def test_sample_that_cannot_fit_is_skipped_from_metadata_and_remembered(tok_dir, tmp_path, long_clip, monkeypatch):
    """Two long clips in one sample, budgets that hold one: skipped from the containers' metadata (demuxed, never
    decoded), and the next epochs do not open the videos again. Before: both decoded, then skipped, every epoch."""
    two = [{"role": "user", "content": [{"type": "video", "video": "vid0.mp4"}, {"type": "video", "video": "vid1.mp4"},
                                        {"type": "text", "text": "Same clip twice?"}]},
           {"role": "assistant", "content": "Yes."}]
    root = write_dataset(tmp_path / "pair", [
        ("pair", {"json": js({"messages": two}), "vid0.mp4": long_clip, "vid1.mp4": long_clip}),
        ("txt", {"json": js(text_chat(2, 20))})])
    decodes = _counting(monkeypatch, cache_mod, "decode_frames")
    probes = _counting(monkeypatch, video_mod, "_probe")
    cfg = DataConfig(datasets=[DatasetSpec(root)], tokenizer=tok_dir, max_tokens=2048, max_patches=8192,
                     num_workers=0, epochs=3, shuffle_buffer=0)
    loader = build_loader(cfg, 0, 1)
    keys = [k for b in loader for k in b.sample_keys]
    m = loader.metrics()
    assert keys == ["pair/shard-000000.tar/txt"] * 3
    assert m["skipped/too_many_patches"] == 3 and m["skipped"] == 3  # the same verdict every epoch ...
    assert decodes == [] and len(probes) == 2  # ... from one look at each container, in the first epoch only


@pytest.mark.timeout(180)
def test_twenty_minute_clip_trains_with_a_shipped_recipe(tok_dir, tmp_path, long_clip):
    """Before (issue 13): the stage-2/3 recipes' max_tokens 8192 / max_patches 16384 skipped every such video."""
    samples = [("long", {"json": js({"messages": QA}), "vid0.mp4": long_clip})]
    samples += [(f"t{i}", {"json": js(text_chat(i, 200))}) for i in range(40)]
    root = write_dataset(tmp_path / "lv", samples)
    job = load_config("recipes/qwen2vl_2b/stage3.yaml", [f"data.tokenizer={tok_dir}", "data.num_workers=0",
                                                         f"data.datasets=[{{path: {root}, kind: chat}}]",
                                                         "data.epochs=1"])
    d = job.data
    loader = build_loader(d, 0, 1)
    batches = list(loader)
    assert loader.metrics()["skipped"] == 0
    video = [b for b in batches if b.video_grid_thw.shape[0]]
    assert len(video) == 1 and video[0].sample_keys == ["lv/shard-000000.tar/long"]  # alone in its microbatch
    b = video[0]
    b.validate()
    t, h, w = b.video_grid_thw[0].tolist()
    assert 8192 < t * h * w // 4 <= d.video.max_tokens == 16384  # more than the old budget allowed
    assert d.max_tokens < b.num_tokens <= d.max_video_sample_tokens and b.num_patches <= d.max_video_sample_patches
    assert all(x.num_tokens <= d.max_tokens and x.num_patches <= d.patch_budget for x in batches if x is not b)


@pytest.mark.timeout(180)
def test_qwen3_vl_timestamps_count_in_the_budget_before_decoding(tok_dir, tmp_path, long_clip, monkeypatch):
    """Qwen3-VL writes each frame pair's time as text: a sample whose video tokens fit the budget but whose
    timestamps do not is skipped as overlong from the container's metadata (the exact rendered length, timestamps
    included; never decoded). The same data and budget under Qwen2-VL (no timestamps) trains."""
    from data.media.vision import family_vision

    root = write_dataset(tmp_path / "ts", [("vid", {"json": js({"messages": QA}), "vid0.mp4": long_clip}),
                                           ("txt", {"json": js(text_chat(1, 20))})])
    decodes = _counting(monkeypatch, cache_mod, "decode_frames")
    probes = _counting(monkeypatch, video_mod, "_probe")
    cfg = DataConfig(datasets=[DatasetSpec(root)], tokenizer=tok_dir, max_tokens=3200, max_patches=16384,
                     num_workers=0, epochs=1, shuffle_buffer=0, video={"max_tokens": 3150})
    loader = build_loader(cfg, 0, 1, vision=family_vision("qwen3_vl"))
    keys = [k for b in loader for k in b.sample_keys]
    assert keys == ["ts/shard-000000.tar/txt"] and loader.metrics()["skipped/overlong"] == 1
    assert decodes == [] and len(probes) == 1
    loader = build_loader(cfg, 0, 1, vision=family_vision("qwen2_vl"))
    batches = list(loader)
    assert loader.metrics()["skipped"] == 0 and len(decodes) == 1
    t, h, w = next(b for b in batches if b.video_grid_thw.shape[0]).video_grid_thw[0].tolist()
    assert t * h * w // 4 <= 3150
