"""A run's architecture (model/resolve.py): preset, HF config or the init weights' own, the recipe's overrides
through the strict config checks, and the match against every set of weights the run loads; and the meta-device
model (model/meta.py), built without running weight inits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from core.config import ConfigError
from model.family import get_preset, hf_config_dict
from model.meta import SkipInit, empty_model, meta_model
from model.resolve import checkpoint_config, config_diff, resolve_model_config
from model.vlm import VLModel
from train.config import ModelSection


def tiny():
    return get_preset("qwen2_vl", "tiny")


def test_overrides_are_set_and_checked_like_recipe_keys():
    got = resolve_model_config(ModelSection(overrides={"text.num_layers": 2, "vision.depth": 1,
                                                       "attn_backend": "sdpa", "text.mrope_section": [2, 3, 3]}))
    want = tiny()
    want.text.num_layers, want.vision.depth, want.attn_backend = 2, 1, "sdpa"
    assert got == want and isinstance(got.text.mrope_section, tuple)
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.overrides\.text\.num_layer' \(did you mean "
                                          r"'num_layers'\?\); valid keys in section 'model\.overrides\.text'"):
        resolve_model_config(ModelSection(overrides={"text.num_layer": 2}))
    with pytest.raises(ConfigError, match=r"model\.overrides\.text\.num_layers: expected int, got 'two'"):
        resolve_model_config(ModelSection(overrides={"text.num_layers": "two"}))
    with pytest.raises(ConfigError, match=r"model\.overrides: text\.hidden_size=64 is not divisible by "
                                          r"text\.num_heads=5"):
        resolve_model_config(ModelSection(overrides={"text.num_heads": 5}))
    # The family's own checks too (model.family.check_config): a Qwen2.5-VL window on a Qwen2-VL model.
    with pytest.raises(ConfigError, match=r"model\.overrides: vision\.window_size is not a Qwen2-VL setting"):
        resolve_model_config(ModelSection(overrides={"vision.window_size": 112}))


def test_the_weights_a_run_loads_must_match():
    deeper = dataclasses.replace(tiny(), text=dataclasses.replace(tiny().text, num_layers=6))
    with pytest.raises(ConfigError, match=r"differs from the checkpoint /c: text\.num_layers: 4 vs 6"):
        resolve_model_config(ModelSection(), init=("checkpoint /c", deeper))
    with pytest.raises(ConfigError, match=r"differs from the resumed checkpoint /r: text\.num_layers: 4 vs 6 \(this "
                                          r"run_dir belongs to a different run; pick a new run_dir"):
        resolve_model_config(ModelSection(), resumed=("resumed checkpoint /r", deeper))
    # preset: null takes the weights' architecture; an override of it must still match the weights (it used to
    # edit the weights' config too, so the comparison could not see it).
    assert resolve_model_config(ModelSection(preset=None), init=("checkpoint /c", deeper)) == deeper
    with pytest.raises(ConfigError, match=r"text\.num_layers: 2 vs 6"):
        resolve_model_config(ModelSection(preset=None, overrides={"text.num_layers": 2}),
                             init=("checkpoint /c", deeper))
    assert deeper.text.num_layers == 6
    # The attention kernel is a runtime choice, not an architecture.
    assert config_diff(tiny(), dataclasses.replace(tiny(), attn_backend="sdpa")) == []


def test_where_the_architecture_comes_from_is_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="set either model.preset or model.hf_config, not both"):
        resolve_model_config(ModelSection(hf_config=str(tmp_path)))
    with pytest.raises(ConfigError, match="set model.preset, model.hf_config or model.init_from"):
        resolve_model_config(ModelSection(preset=None))
    with pytest.raises(ConfigError, match="model.preset: unknown Qwen2-VL preset 'huge'; choose one of tiny, "):
        resolve_model_config(ModelSection(preset="huge"))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        resolve_model_config(ModelSection(preset=None, hf_config=str(tmp_path)))
    with pytest.raises(ConfigError, match="/c/meta.json has no model_config"):
        checkpoint_config({"step": 3}, "/c")
    assert checkpoint_config({"model_config": hf_config_dict(tiny())}, "/c") == tiny()


class _RandomInits(TorchDispatchMode):
    """Counts the random-init kernels (uniform_, normal_) that run."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.__name__.split(".")[0] in ("uniform_", "normal_")
        return func(*args, **(kwargs or {}))


def test_meta_model_runs_no_init():
    w, real = torch.empty(3, 3, device="meta"), torch.zeros(3, 3)
    with _RandomInits() as seen, SkipInit():
        nn.init.kaiming_uniform_(w)
        nn.init.normal_(real)  # a real tensor still initializes
    assert seen.n == 1 and real.abs().sum() > 0
    with _RandomInits() as plain, torch.device("meta"):
        VLModel(get_preset("qwen2_vl", "tiny"))
    with _RandomInits() as skipped:
        model = meta_model(get_preset("qwen2_vl", "tiny"))
    assert plain.n > 0 and skipped.n == 0, (plain.n, skipped.n)
    ref = VLModel(get_preset("qwen2_vl", "tiny"))
    assert all(p.is_meta for p in model.parameters())
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    cfg = tiny()
    cfg.text.tie_word_embeddings = True
    tied = empty_model(cfg, "cpu")
    assert tied.lm_head.weight is tied.embed_tokens.weight and tied.rotary.inv_freq.device.type == "cpu"
