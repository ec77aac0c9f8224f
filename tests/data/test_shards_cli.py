"""Shards and CLIs: `python -m data.shards make/index`, sidecar indexes against the tar bytes, WebDataset
interoperability both ways, stale-index detection, and `python -m data.inspect --dump`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
import webdataset as wds
from datahelpers import encode, skimage_rgb, small_image, text_chat, write_dataset

from data.config import DataConfig, DatasetSpec
from data.inspect import main as inspect_main
from data.loader import build_loader
from data.shards import INDEX_SUFFIX, MANIFEST
from data.shards.__main__ import main as shards_main
from data.storage import StorageConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("make")
    media = root / "media"
    (media / "sub").mkdir(parents=True)
    (media / "astro.jpg").write_bytes(encode(skimage_rgb("astronaut")[::4, ::4], "JPEG"))
    (media / "sub" / "coffee.png").write_bytes(small_image(1, 80, 120))
    lines = [
        {"id": "chat.1", "messages": [{"role": "user", "content": [{"type": "image", "image": "astro.jpg"},
                                                                  {"type": "text", "text": "Who?"}]},
                                      {"role": "assistant", "content": "An astronaut."}]},
        {"content": [{"type": "text", "text": "A cup: "}, {"type": "image", "image": "sub/coffee.png"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.jpg"}]},
                      {"role": "assistant", "content": "?"}]},  # missing media: skipped by make
        "{not json",
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "s3://bucket/remote.jpg"},
                                                   {"type": "text", "text": "remote"}]},
                      {"role": "assistant", "content": "kept as a URL"}]},
    ] + [text_chat(i, 5 + i) for i in range(7)]
    jsonl = root / "in.jsonl"
    jsonl.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = root / "shards"
    r = _run("data.shards", "make", "--input", str(jsonl), "--media", str(media), "--out", str(out),
             "--samples-per-shard", "4")
    assert r.returncode == 0, r.stderr
    return out, r


def test_make_writes_shards_indexes_and_manifest(made):
    out, r = made
    assert "wrote 10 samples in 3 shards" in r.stdout
    assert "nope.jpg" in r.stderr and "malformed JSON" in r.stderr
    man = json.loads((out / MANIFEST).read_text())
    assert [s["samples"] for s in man["shards"]] == [4, 4, 2] and man["skipped"] == {"missing_media": 1,
                                                                                    "malformed_json": 1}
    for s in man["shards"]:
        shard = out / s["name"]
        idx = json.loads((out / (s["name"] + INDEX_SUFFIX)).read_text())
        data = shard.read_bytes()
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for smp in idx["samples"]:
            # The sidecar's byte ranges give exactly the tar members (random access without tar parsing).
            blob = data[smp["offset"] : smp["offset"] + smp["size"]]
            for name, off, size in smp["members"]:
                assert blob[off : off + size] == members[f"{smp['key']}.{name}"]
            assert smp["est_tokens"] and smp["est_tokens"] > 0
    first = json.loads((out / "shard-000000.tar.index.json").read_text())["samples"][0]
    assert first["key"] == "chat_1" and first["media"] == {"img0.jpg": [128, 128]}
    # WebDataset reads our shards.
    got = list(wds.WebDataset([str(out / s["name"]) for s in man["shards"]], shardshuffle=False))
    assert len(got) == 10 and json.loads(got[0]["json"])["messages"][0]["content"][0]["image"] == "img0.jpg"


def test_made_shards_load_and_url_media_is_a_counted_skip(made, tok_dir):
    out, _ = made
    # (no retries: the s3:// media has no server behind it)
    cfg = DataConfig(datasets=[DatasetSpec(str(out))], tokenizer=tok_dir, epochs=1, num_workers=0, max_tokens=512,
                     max_pixels=64 * 28 * 28, storage=StorageConfig(max_retries=0, timeout_s=2.0))
    loader = build_loader(cfg, 0, 1)
    keys = [k for b in loader for k in b.sample_keys]
    assert len(keys) == 9 and "shards/shard-000000.tar/chat_1" in keys
    m = loader.metrics()
    assert m["skipped"] == 1 and m["skipped/media_read_error"] + m.get("skipped/missing_media", 0) == 1


def test_index_shards_written_by_webdataset(tmp_path, tok_dir):
    root = tmp_path / "wds"
    root.mkdir()
    with wds.TarWriter(str(root / "part-0.tar")) as w:
        for i in range(6):
            sample = {"__key__": f"k{i}", "json": json.dumps(text_chat(i, 4)).encode()}
            if i % 2:
                sample["json"] = json.dumps({"messages": [
                    {"role": "user", "content": [{"type": "image", "image": "jpg"}, {"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": "ok"}]}).encode()
                sample["jpg"] = small_image(i, 50, 60, "JPEG")
            w.write(sample)
    assert shards_main(["index", str(root)]) == 0
    cfg = DataConfig(datasets=[DatasetSpec(str(root))], tokenizer=tok_dir, epochs=1, num_workers=0, max_tokens=512)
    batches = list(build_loader(cfg, 0, 1))
    assert sorted(k.rsplit("/", 1)[-1] for b in batches for k in b.sample_keys) == [f"k{i}" for i in range(6)]
    assert sum(b.image_grid_thw.shape[0] for b in batches) == 3


def test_stale_index_is_detected(tmp_path, tok_dir):
    root = write_dataset(tmp_path / "ds", [(f"k{i}", {"json": json.dumps(text_chat(i, 3)).encode()})
                                           for i in range(4)])
    shard = os.path.join(root, "shard-000000.tar")
    # Rewrite the shard with different contents but keep the old index.
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            data = json.dumps(text_chat(i, 300)).encode()
            info = tarfile.TarInfo(f"k{i}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = DataConfig(datasets=[DatasetSpec(root)], tokenizer=tok_dir, epochs=1, num_workers=0, shuffle_buffer=0)
    with pytest.raises(ValueError, match="out of date"):
        list(build_loader(cfg, 0, 1))


def test_inspect_cli_dump(made, tok_dir, tmp_path, capsys):
    out, _ = made
    dump = tmp_path / "dump.pt"
    rc = inspect_main(["--data", f"{out}@1.0", "--tokenizer", tok_dir, "--steps", "2", "--max-tokens", "256",
                       "--max-pixels", str(64 * 28 * 28), "--workers", "0", "--show", "1", "--dump", str(dump)])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "samples/s" in stdout and "packing efficiency" in stdout and "skipped" in stdout
    assert "[[" in stdout  # --show marks supervised text
    batches = torch.load(dump)
    assert isinstance(batches, list) and len(batches) == 2
    need = {"input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw", "video_grid_thw",
            "sample_keys"}
    for b in batches:
        assert need <= set(b) and b["position_ids"].shape == (3, b["input_ids"].numel())
        assert int(b["cu_seqlens"][-1]) == b["input_ids"].numel() <= 256
