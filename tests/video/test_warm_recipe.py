"""`python -m data.shards warm --recipe RECIPE` (issue 23): the video settings, datasets and storage come from the
training recipe, so the loader of that recipe then finds every video in the cache (warming with the default
settings instead leaves it decoding everything); and the summary tells decodes from videos that were in the cache
before (it said "2 already cached" on a new directory: repeats of a video within the same warm)."""

from __future__ import annotations

import dataclasses
import re

import pytest

import data.media.video_cache as vc
from data.loader import build_loader
from data.shards.__main__ import main as shards_main
from data.shards.warm import recipe_data
from tests.train.train_helpers import REPO

RECIPE = REPO / "recipes" / "learn" / "stage2.yaml"


def summary(text: str) -> dict[str, int]:
    m = re.search(r"(\d+) video references to (\d+) distinct videos: (\d+) decoded now, (\d+) were in the cache "
                  r"already, (\d+) failed", text)
    assert m, text
    return dict(zip(("refs", "distinct", "decoded", "before", "failed"), map(int, m.groups())))


def loader_decodes(cache_dir: str, dataset: str) -> dict[str, int]:
    """The recipe's own loader over one dataset once, in this process: the cache's hits and decodes."""
    data, specs = recipe_data(RECIPE)
    spec = next(s for s in specs if s.path == dataset)
    cfg = dataclasses.replace(data, datasets=[spec], epochs=1, shuffle_buffer=0, num_workers=0,
                              video=dataclasses.replace(data.video, cache_dir=cache_dir))
    vc.METRICS.reset()
    loader = build_loader(cfg, 0, 1)
    try:
        n = sum(1 for _ in loader)
    finally:
        loader.close()
    assert n > 0
    return vc.cache_metrics()


@pytest.mark.timeout(300)
def test_warm_from_the_recipe_is_what_its_loader_reads(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEARN_DIR", str(demo_dir))
    heldout = str(demo_dir / "data" / "heldout_videos")
    _, specs = recipe_data(RECIPE)
    assert [s.path for s in specs] == [str(demo_dir / "data" / n) for n in
                                       ("stage2", "heldout_digits", "heldout_videos", "heldout_captions")]

    cache = str(tmp_path / "recipe_cache")
    assert shards_main(["warm", "--recipe", str(RECIPE), "--data", heldout, "--cache-dir", cache,
                        "--workers", "1"]) == 0
    first = summary(capsys.readouterr().out)
    assert first["before"] == 0 and first["decoded"] == first["distinct"] > 0 and first["failed"] == 0
    assert first["refs"] >= first["distinct"]
    assert shards_main(["warm", "--recipe", str(RECIPE), "--data", heldout, "--cache-dir", cache,
                        "--workers", "1"]) == 0
    again = summary(capsys.readouterr().out)
    assert again["decoded"] == 0 and again["before"] == again["distinct"] == first["distinct"]
    m = loader_decodes(cache, heldout)
    assert m["decodes"] == 0 and m["hits"] > 0, m  # training never waits for a decode of these videos

    # The same datasets warmed with the default video settings (no recipe): other keys, so the loader decodes.
    plain = str(tmp_path / "plain_cache")
    assert shards_main(["warm", "--data", heldout, "--cache-dir", plain, "--workers", "1"]) == 0
    m = loader_decodes(plain, heldout)
    assert m["decodes"] == first["distinct"], m  # every distinct video decoded again (repeats are hits)
