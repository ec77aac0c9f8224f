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


def test_family_options_of_make_and_inspect(made, tok_dir, tmp_path, capsys):
    """`make --family`: the same samples for every family (the loader renders them), image token estimates at the
    family's factor; `inspect --family` renders and resizes for it and says so; a wrong name is a usage error."""
    out, _ = made
    jsonl, media = out.parent / "in.jsonl", out.parent / "media"
    out3 = tmp_path / "shards3"
    assert shards_main(["make", "--input", str(jsonl), "--media", str(media), "--out", str(out3),
                        "--samples-per-shard", "4", "--family", "qwen3_vl"]) == 0
    for shard in ("shard-000000.tar", "shard-000001.tar"):
        with tarfile.open(out / shard) as a, tarfile.open(out3 / shard) as b:
            assert [(m.name, a.extractfile(m).read()) for m in a] == [(m.name, b.extractfile(m).read()) for m in b]
    est = {}
    for root in (out, out3):
        first = json.loads((root / ("shard-000000.tar" + INDEX_SUFFIX)).read_text())["samples"][0]
        est[root] = first["est_tokens"] - first["text_tokens"] if first["text_tokens"] else first["est_tokens"]
    # The 128x128 photo: 5 x 5 merged tokens at Qwen2-VL's factor 28 (140 px), 4 x 4 at Qwen3-VL's 32 (128 px).
    assert est[out] - est[out3] == 25 - 16
    dump = tmp_path / "dump3.pt"
    rc = inspect_main(["--data", str(out3), "--tokenizer", tok_dir, "--steps", "20", "--max-tokens", "256",
                       "--workers", "0", "--show", "1", "--dump", str(dump), "--family", "qwen3_vl", "--epochs", "1"])
    stdout = capsys.readouterr().out
    assert rc == 0 and "family qwen3_vl (Qwen3-VL): resize factor 32, default system prompt None" in stdout
    assert "You are a helpful assistant." not in stdout  # Qwen3-VL's template inserts no system turn
    batches = torch.load(dump)
    assert all(b["pixel_values"].shape[1] == 3 * 16 * 16 for b in batches)  # raw image rows of 16-pixel patches
    assert sum(b["image_grid_thw"].shape[0] for b in batches) == 2
    with pytest.raises(SystemExit) as e:
        inspect_main(["--data", str(out3), "--tokenizer", tok_dir, "--family", "qwen3"])
    assert e.value.code == 2 and "invalid choice: 'qwen3'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ reported bugs
def _vid_bytes(n: int) -> bytes:
    return bytes((i * 37 + 11) % 251 for i in range(n))  # stands in for an mp4: index never decodes it


def _write_shard(path, n: int) -> None:
    from data.shards import ShardWriter

    with ShardWriter(str(path)) as w:
        for i in range(n):
            w.write(f"k{i:03d}", {"json": json.dumps(text_chat(i, 40)).encode(), "vid0.mp4": _vid_bytes(3000 + i)})


@pytest.mark.parametrize("where", ["between_samples", "inside_a_member"])
def test_index_reports_a_truncated_shard(tmp_path, where):
    # Issue: a tar cut on a 512-byte boundary (an interrupted copy) indexed as "239 samples", 49 silently lost.
    root = tmp_path / "ds"
    root.mkdir()
    _write_shard(root / "ok-000000.tar", 5)
    shard = root / "part-000001.tar"
    _write_shard(shard, 12)
    with tarfile.open(shard) as tar:
        members = [m for m in tar]
    if where == "between_samples":
        cut = next(m.offset for m in members if m.name == "k007.json")  # the header of sample 7
    else:
        m = next(m for m in members if m.name == "k007.vid0.mp4")
        cut = m.offset_data + 1024  # mid-data
    assert cut % 512 == 0
    shard.write_bytes(shard.read_bytes()[:cut])
    r = _run("data.shards", "index", str(root))
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    low = err.lower()
    assert "part-000001.tar" in err and "truncated" in low and "re-create" in low and "re-download" in low, err
    assert "indexed" not in r.stdout and not (root / MANIFEST).exists()


def test_index_accepts_shards_written_by_gnu_tar(tmp_path):
    src = tmp_path / "files"
    src.mkdir()
    names = []
    for i in range(9):
        (src / f"s{i}.json").write_text(json.dumps(text_chat(i, 5 + 7 * i)))
        names.append(f"s{i}.json")
    root = tmp_path / "ds"
    root.mkdir()
    subprocess.run(["tar", "-cf", str(root / "a.tar"), "-C", str(src), *names], check=True)
    r = _run("data.shards", "index", str(root))
    assert r.returncode == 0, r.stderr
    assert "indexed 9 samples in 1 shards" in r.stdout


def test_make_skips_a_line_that_is_not_utf8(tmp_path):
    # Issue: one non-UTF-8 line aborted `make` with a UnicodeDecodeError and no output.
    good = [json.dumps(text_chat(i, 6)).encode() for i in range(3)]
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9 cr\xe8me"}, {"role": "assistant", "content": "ok"}]}'
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([good[0], bad, good[1], good[2]]) + b"\n")
    r = _run("data.shards", "make", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "wrote 3 samples" in r.stdout and "line 2" in r.stderr and "UTF-8" in r.stderr
    man = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert man["samples"] == 3 and man["skipped"] == {"bad_encoding": 1}


def test_make_keeps_media_inside_the_media_folder(tmp_path):
    # Issue: `make` followed '..' and absolute paths (it embedded /etc/passwd and /etc/hostname into shards).
    media, outside = tmp_path / "media", tmp_path / "private"
    (media / "sub").mkdir(parents=True)
    outside.mkdir()
    (media / "ok.png").write_bytes(small_image(0, 40, 40))
    secret = small_image(1, 30, 30) + b"TOPSECRET"
    (outside / "secret.png").write_bytes(secret)
    os.symlink(outside / "secret.png", media / "link.png")
    refs = ["ok.png", "../private/secret.png", str(outside / "secret.png"), "link.png", "sub/../ok.png",
            "s3://bucket/x.png", f"file://{outside / 'secret.png'}"]
    lines = [{"content": [{"type": "image", "image": ref}, {"type": "text", "text": f"sample {i}"}]}
             for i, ref in enumerate(refs)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")

    def make(out: str, *flags: str) -> tuple[subprocess.CompletedProcess, bytes]:
        r = _run("data.shards", "make", "--input", str(tmp_path / "in.jsonl"), "--media", str(media), "--out",
                 str(tmp_path / out), *flags)
        assert r.returncode == 0, r.stderr
        blob = b"".join(p.read_bytes() for p in sorted((tmp_path / out).glob("*.tar")))
        return r, blob

    r, blob = make("strict")
    man = json.loads((tmp_path / "strict" / MANIFEST).read_text())
    assert man["samples"] == 3 and man["skipped"] == {"media_outside_root": 4}, (man, r.stderr)
    assert b"TOPSECRET" not in blob
    for lineno, ref in ((2, "../private/secret.png"), (3, str(outside / "secret.png")), (4, "link.png"),
                        (7, str(outside / "secret.png"))):
        assert any(f"line {lineno}" in ln and ref in ln for ln in r.stderr.splitlines()), (lineno, r.stderr)
    assert "--allow-absolute-media" in r.stderr
    # The flag admits absolute paths only: '..' and symlinks out of --media stay refused.
    r, blob = make("absolute", "--allow-absolute-media")
    man = json.loads((tmp_path / "absolute" / MANIFEST).read_text())
    assert man["samples"] == 5 and man["skipped"] == {"media_outside_root": 2}, (man, r.stderr)
    assert blob.count(b"TOPSECRET") == 2


def _parser_actions():
    import argparse

    from data.shards.__main__ import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items()}


def test_every_option_has_a_help_text():
    subs = _parser_actions()
    assert set(subs) == {"make", "index", "warm"}
    for name, p in subs.items():
        text = p.format_help()
        for a in p._actions:
            if a.dest == "help":
                continue
            words = (a.help or "").split("(default")[0].split()
            assert len(words) >= 3, f"{name} {a.option_strings or a.dest}: help {a.help!r}"
            for opt in a.option_strings:
                assert opt in text


@pytest.mark.parametrize("argv,needle", [
    (["make", "--input", "/nonexistent/in.jsonl", "--out", "OUT"], "/nonexistent/in.jsonl"),
    (["make", "--input", "IN", "--media", "/nonexistent/media", "--out", "OUT"], "/nonexistent/media"),
    (["make", "--input", "IN", "--out", "OUT", "--samples-per-shard", "0"], "--samples-per-shard"),
    (["make", "--input", "IN", "--out", "OUT", "--format", "alpaca"], "--format"),
    (["make", "--out", "OUT"], "--input"),
    (["index", "/nonexistent/shards"], "/nonexistent/shards"),
    (["index", "EMPTY"], "no .tar shards"),
    (["warm", "--data", "/nonexistent/ds", "--cache-dir", "CACHE"], "/nonexistent/ds"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, argv, needle):
    (tmp_path / "in.jsonl").write_text(json.dumps(text_chat(0, 3)) + "\n")
    (tmp_path / "empty").mkdir()
    subst = {"IN": str(tmp_path / "in.jsonl"), "OUT": str(tmp_path / "out"), "EMPTY": str(tmp_path / "empty"),
             "CACHE": str(tmp_path / "cache")}
    r = _run("data.shards", *[subst.get(a, a) for a in argv])
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err, err


def test_debug_env_shows_the_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "QWEN2VL_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "data.shards", "index", str(tmp_path / "nope")], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


# ------------------------------------------------------------------------------------------ nothing written
LLAVA = {"id": "1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                        {"from": "gpt", "value": "A cat."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A cat."}],
            "images": ["a.jpg"]}
SWIFT = {"messages": [{"role": "user", "content": "<image><ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
         "images": ["a.jpg"], "objects": {"ref": ["cat"], "bbox": [[1, 2, 3, 4]]}}
LLAMAFACTORY = {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
                "images": ["a.jpg"]}


@pytest.mark.parametrize("record,fmt", [(LLAVA, "llava"), (SHAREGPT, "sharegpt"), (SWIFT, "swift"),
                                        (LLAMAFACTORY, "llamafactory")])
def test_make_that_writes_nothing_fails_and_suggests_the_format(tmp_path, record, fmt):
    """Before: exit 0 after `wrote 0 samples ...; skipped: {'bad_format': 3}`."""
    (tmp_path / "in.json").write_text(json.dumps([record] * 3))
    (tmp_path / "a.jpg").write_bytes(small_image(0, 40, 40, "JPEG"))
    r = _run("data.shards", "make", "--input", str(tmp_path / "in.json"), "--media", str(tmp_path), "--out",
             str(tmp_path / "out"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "wrote no sample" in last and "bad_format 3" in last and f"--format {fmt}" in last, last
    assert "keys" in last and sorted(record)[0] in last
    ok = _run("data.shards", "make", "--input", str(tmp_path / "in.json"), "--media", str(tmp_path), "--out",
              str(tmp_path / "out2"), "--format", fmt)
    assert ok.returncode == 0 and "wrote 3 samples" in ok.stdout, ok.stderr[-2000:]


def test_make_that_finds_no_media_says_where_it_looked(tmp_path):
    rec = {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/a.jpg"}]},
                        {"role": "assistant", "content": "A cat."}]}
    (tmp_path / "in.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "elsewhere").mkdir()
    r = _run("data.shards", "make", "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"),
             "--media", str(tmp_path / "elsewhere"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "wrote no sample" in last and "missing_media 1" in last, r.stderr
    assert f"--media {tmp_path / 'elsewhere'}" in last and "relative" in last, last


def test_a_missing_relative_data_path_names_the_directory_it_resolved_to(tmp_path, monkeypatch, tok_dir):
    """Before: "dataset 'data/train': no dataset.json and no .tar shards found", with no word of where it looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        build_loader(DataConfig(datasets=[DatasetSpec("data/train")], tokenizer=tok_dir), 0, 1)
    msg = str(e.value)
    assert "data/train" in msg and str(tmp_path / "data" / "train") in msg, msg
    assert "relative to the working directory" in msg and "does not exist" in msg, msg
    (tmp_path / "data" / "train").mkdir(parents=True)  # exists but holds no shards: said so, with the same path
    with pytest.raises(ValueError, match=r"no dataset.json and no \.tar shards found") as e:
        build_loader(DataConfig(datasets=[DatasetSpec("data/train")], tokenizer=tok_dir), 0, 1)
    assert str(tmp_path / "data" / "train") in str(e.value)
    with pytest.raises(ValueError, match=r"no tokenizer.json at 'tok'.*working directory .* to ") as e:
        build_loader(DataConfig(datasets=[DatasetSpec("data/train")], tokenizer="tok"), 0, 1)
    assert str(tmp_path / "tok") in str(e.value)
    with pytest.raises(ValueError, match=r"/abs/nowhere.*does not exist") as e:
        build_loader(DataConfig(datasets=[DatasetSpec("/abs/nowhere")], tokenizer=tok_dir), 0, 1)
    assert "working directory" not in str(e.value)
