"""The learning check's data split (demo/data.py): no training sample of any stage shows a held-out digit
(index >= HELDOUT_FROM), image or video, and the held-out sets show nothing else."""

from __future__ import annotations

import re
from collections import Counter

from demo.data import DIRECTIONS, HELDOUT_FROM, make_samples

REF = re.compile(r"^(digits/d|videos/[vh]\d{4}_d)(\d{4})\.(png|mp4)$")


def _media_refs(obj) -> list[str]:
    if isinstance(obj, dict):
        out = [obj[k] for k in ("image", "video") if isinstance(obj.get(k), str) and obj.get("type") == k]
        for v in obj.values():
            out += _media_refs(v)
        return out
    if isinstance(obj, list):
        return [r for v in obj for r in _media_refs(v)]
    return []


def test_heldout_digits_never_in_training_samples(tmp_path):
    sets = make_samples(tmp_path, n_digits=40, n_videos=12, n_heldout_videos=12, seed=3)
    seen: dict[str, Counter] = {}
    for name, samples in sets.items():
        idx = Counter()
        for s in samples:
            for ref in _media_refs(s):
                if ref.startswith("photos/"):
                    continue
                m = REF.match(ref)
                assert m, f"{name}: unexpected media ref {ref}"
                idx[int(m.group(2))] += 1
        seen[name] = idx
    for name in ("stage1", "stage2", "stage3"):
        assert seen[name] and max(seen[name]) < 40, (name, max(seen[name]))
    for name in ("heldout_digits", "heldout_videos", "heldout_captions"):
        assert seen[name] and min(seen[name]) >= HELDOUT_FROM, (name, min(seen[name]))
    assert len(sets["heldout_digits"]) == 1797 - HELDOUT_FROM
    # Every stage-3 video question and every held-out one is answered by a direction, drawn from all four.
    answers = [s["messages"][-1]["content"] for s in sets["heldout_videos"]]
    assert set(answers) <= set(DIRECTIONS) and len(set(answers)) >= 3


def test_reuse_keeps_only_a_complete_sample_set(tmp_path):
    from demo.chain import prepare_data

    said: list[str] = []
    data = tmp_path / "data"
    prepare_data(data, reuse=True, n_digits=8, print_fn=said.append)
    assert said[0].startswith("[data] generating")
    prepare_data(data, reuse=True, n_digits=8, print_fn=said.append)
    assert said[-1].startswith("[data] reusing")
    # A generation cut short before its last dataset is made again, not reused.
    (data / "heldout_captions" / "dataset.json").unlink()
    prepare_data(data, reuse=True, n_digits=8, print_fn=said.append)
    assert said[-2].startswith("[data] generating") and (data / "heldout_captions" / "dataset.json").is_file()
