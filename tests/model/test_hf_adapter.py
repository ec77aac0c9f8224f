"""HF checkpoint adapter, for every family: both key layouts, single file and sharded, bit-exact round trips,
transformers loading what we write, and clear errors on mismatching checkpoints and unsupported families."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.family import config_from_hf_dict, get_family, hf_config_dict
from model.hf_adapter import (
    CheckpointMismatchError,
    from_hf_state_dict,
    load_hf_checkpoint,
    load_hf_model,
    read_hf_tensors,
    save_hf_checkpoint,
    save_hf_model,
)
from model.parity import hf_class, make_tiny_checkpoint
from model.vlm import VLModel
from tests.model.conftest import small_cfg

SHARD = 1_500_000  # bytes: the tiny model (~40 MB) splits into many shards


def _assert_bit_exact(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _key(raw: dict, suffix: str) -> str:
    """The checkpoint's own name for a tensor, whichever key layout it uses."""
    return next(k for k in raw if k.endswith(suffix))


PREFIXES = {"hub": ("visual.", "model.layers.", "model.embed_tokens", "model.norm", "lm_head"),
            "transformers5": ("model.visual.", "model.language_model.", "lm_head")}


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
@pytest.mark.parametrize("sharded", [False, True])
def test_load_save_load_bit_exact(tmp_path, family, layout, sharded):
    src = make_tiny_checkpoint(tmp_path / "src", small_cfg(family), seed=2, layout=layout,
                               max_shard_bytes=SHARD if sharded else None)
    assert (src / "model.safetensors.index.json").exists() == sharded
    cfg, sd = load_hf_checkpoint(src)
    assert cfg.family == family and cfg.text.num_layers == 3 and cfg.vision.depth == small_cfg(family).vision.depth
    # Every tensor of the source file arrives (qkv as its three row blocks).
    raw = read_hf_tensors(src)
    qkv = next(k for k in raw if k.endswith("blocks.1.attn.qkv.weight"))
    torch.testing.assert_close(torch.cat([sd[f"visual.blocks.1.attn.{p}_proj.weight"] for p in "qkv"]), raw[qkv],
                               rtol=0, atol=0)
    out = tmp_path / "out"
    files = save_hf_checkpoint(sd, cfg, out, max_shard_bytes=SHARD if sharded else 2**40)
    assert all(f.exists() for f in files)
    # Written in the layout of the family's released checkpoints, whatever the source layout was.
    keys = read_hf_tensors(out).keys()
    assert all(k.startswith(PREFIXES[get_family(family).hf_write_layout]) for k in keys), sorted(keys)[:5]
    cfg2, sd2 = load_hf_checkpoint(out)
    assert cfg2 == cfg
    _assert_bit_exact(sd, sd2)
    # Re-saving into the same directory with the other sharding leaves no stale files behind.
    save_hf_checkpoint(sd2, cfg2, out, max_shard_bytes=2**40 if sharded else SHARD)
    _assert_bit_exact(sd, load_hf_checkpoint(out)[1])
    assert len(list(out.glob("*.safetensors"))) == (1 if sharded else len(list(out.glob("model-*"))))


def test_transformers_loads_what_we_save(tmp_path, hf_tiny, family):
    """Our writer's output (the family's config.json and key layout, sharded) loads in transformers 5.x with
    every weight equal, and gives the same logits as the source model."""
    ours = VLModel(small_cfg(family))
    ours.load_state_dict(from_hf_state_dict(hf_tiny.state_dict(), False), strict=True)
    save_hf_model(ours, tmp_path / "ours", max_shard_bytes=SHARD)
    cfg_json = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg_json["model_type"] == family and cfg_json["torch_dtype"] == "float32"
    back, info = hf_class(family).from_pretrained(
        tmp_path / "ours", dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    _assert_bit_exact(hf_tiny.state_dict(), back.state_dict())
    ids = torch.randint(0, 151643, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf_tiny(input_ids=ids).logits, rtol=0, atol=0)


def test_tied_embeddings_round_trip(tmp_path, family):
    """2B-style tied head: no lm_head.weight on disk; transformers ties it; ours shares one Parameter."""
    src = make_tiny_checkpoint(tmp_path / "src", small_cfg(family, tie=True), seed=4)
    assert "lm_head.weight" not in read_hf_tensors(src)
    cfg, sd = load_hf_checkpoint(src)
    assert cfg.text.tie_word_embeddings and sd["lm_head.weight"] is sd["embed_tokens.weight"]
    model = load_hf_model(src)
    assert model.lm_head.weight is model.embed_tokens.weight
    save_hf_model(model, tmp_path / "out")
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    _assert_bit_exact(sd, load_hf_checkpoint(tmp_path / "out")[1])
    back = hf_class(family).from_pretrained(tmp_path / "out")
    assert back.lm_head.weight.data_ptr() == back.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(back.lm_head.weight, model.embed_tokens.weight)


def test_written_files_are_world_readable_like_save_pretrained(tmp_path, hf_tiny_dir):
    """Before: safetensors wrote 0600 files, which a different user (a serving job) could not read."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        files = save_hf_model(load_hf_model(hf_tiny_dir), tmp_path / "out", max_shard_bytes=SHARD)
    finally:
        os.umask(old)
    assert len(files) > 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in files), [
        (f.name, oct(f.stat().st_mode)) for f in files]


def test_from_hf_matches_state_dict_and_dtype(tmp_path, hf_tiny_dir):
    cfg, sd = load_hf_checkpoint(hf_tiny_dir)
    m = load_hf_model(hf_tiny_dir)
    _assert_bit_exact({k: v for k, v in m.state_dict().items()}, sd)
    mb = load_hf_model(hf_tiny_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in mb.parameters())
    assert mb.rotary.inv_freq.dtype == torch.float32 and not mb.rotary.inv_freq.is_meta
    torch.testing.assert_close(mb.rotary.inv_freq, m.rotary.inv_freq, rtol=0, atol=0)
    # bf16 save writes bf16 tensors and says so in config.json
    save_hf_checkpoint(m.state_dict(), cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())


# ------------------------------------------------------------------------------------------ errors
def _write(tmp_path, tensors: dict, cfg: ModelConfig):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    return d


def test_missing_unexpected_and_shape_errors_name_keys_and_shapes(tmp_path, hf_tiny_dir):
    cfg, _ = load_hf_checkpoint(hf_tiny_dir)
    raw = read_hf_tensors(hf_tiny_dir)
    up2 = _key(raw, "layers.2.mlp.up_proj.weight")

    t = dict(raw)
    del t[up2]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): layers\.2\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(_write(tmp_path, t, cfg))

    t = dict(raw)
    t[up2.replace("layers.2", "layers.3")] = raw[up2].clone()
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): layers\.3\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(_write(tmp_path, t, cfg))

    t = dict(raw)
    kv = cfg.text.num_kv_heads * cfg.text.head_dim
    t[_key(raw, "layers.0.self_attn.k_proj.weight")] = torch.zeros(16, 64)
    with pytest.raises(CheckpointMismatchError,
                       match=rf"layers\.0\.self_attn\.k_proj\.weight .*checkpoint \(16, 64\) vs config \({kv}, 64\)"):
        load_hf_checkpoint(_write(tmp_path, t, cfg))

    t = dict(raw)
    t[_key(raw, "visual.blocks.0.attn.qkv.weight")] = torch.zeros(90, 32)
    with pytest.raises(CheckpointMismatchError, match=r"visual\.blocks\.0\.attn\.qkv\.weight.*\(30, 32\) vs config"):
        load_hf_checkpoint(_write(tmp_path, t, cfg))

    t = dict(raw)
    t["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="something.else"):
        load_hf_checkpoint(_write(tmp_path, t, cfg))

    # Untied config but the head is missing.
    t = {k: v for k, v in raw.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        load_hf_checkpoint(_write(tmp_path, t, cfg))


def test_missing_files_and_broken_index(tmp_path, hf_tiny_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    d = make_tiny_checkpoint(tmp_path / "sh", small_cfg(), layout="transformers5", max_shard_bytes=SHARD)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf_checkpoint(d)


def test_save_rejects_a_state_dict_that_does_not_fit(tmp_path):
    cfg = small_cfg()
    sd = VLModel(cfg).state_dict()
    sd.pop("norm.weight")
    with pytest.raises(CheckpointMismatchError, match="missing keys.*norm.weight"):
        save_hf_checkpoint(sd, cfg, tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_config_round_trip_flat_and_nested(hf_tiny, family):
    cfg = small_cfg(family)
    assert config_from_hf_dict(hf_config_dict(cfg)) == cfg
    # transformers 5.x writes a nested text_config (and its own rope_parameters): read it back too.
    nested = hf_tiny.config.to_dict()
    assert "text_config" in nested
    assert config_from_hf_dict(nested) == cfg


def test_config_refusals_name_the_file_the_key_and_the_families(tmp_path):
    d = hf_config_dict(small_cfg())
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf_dict(d | {"use_sliding_window": True})
    from model.hf_adapter import read_hf_config

    for model_type, why in [("qwen3_vl_moe", "expert parallelism"), ("qwen3_5", "Qwen3.5"),
                            ("llava", "not a supported model family")]:
        (tmp_path / "config.json").write_text(json.dumps(d | {"model_type": model_type}))
        with pytest.raises(ValueError) as e:
            read_hf_config(tmp_path)
        msg = str(e.value)
        assert str(tmp_path / "config.json") in msg and f"model_type={model_type!r}" in msg and why in msg, msg
        assert all(f"'{t}'" in msg for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")), msg
        assert "\n" not in msg
