"""Recipe config: strict keys with suggestions, types, precedence, env expansion, base recipes, docs in sync."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, field_docs, iter_fields
from train.config import JobConfig, load_config
from train.config_doc import BEGIN, DOC, END, config_reference

REPO = Path(__file__).resolve().parents[2]
DATA = ["data.tokenizer=/tok", "data.datasets=[{path: /d}]"]
RECIPES = REPO / "recipes"


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_key_names_key_suggestion_and_valid_keys(tmp_path):
    r = write(tmp_path, "optim:\n  lr_vison: 1.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(r, DATA)
    msg = str(e.value)
    assert "optim.lr_vison" in msg and "did you mean 'lr_vision'" in msg
    assert "lr_merger" in msg and "weight_decay" in msg  # the valid keys are listed


def test_unknown_section_and_nested_engine_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimizer'.*did you mean 'optim'"):
        load_config(write(tmp_path, "optimizer: {lr: 1}\n"), DATA)
    # Sections owned by the loader and the engine get the same treatment (their dataclasses, our checker).
    with pytest.raises(ConfigError, match=r"parallel.pipline_parallel|did you mean"):
        load_config(write(tmp_path, "parallel: {pipline_parallel: 2}\n"), DATA)
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].wieght.*did you mean 'weight'"):
        load_config(None, ["data.tokenizer=/t", "data.datasets=[{path: /d, wieght: 2}]"])


def test_wrong_types_and_literals(tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps: expected int, got 'ten'"):
        load_config(None, [*DATA, "train.steps=ten"])
    with pytest.raises(ConfigError, match=r"train.stage: must be one of 1 \| 2 \| 3, got 4"):
        load_config(None, [*DATA, "train.stage=4"])
    with pytest.raises(ConfigError, match=r"optim.betas: expected 2 values"):
        load_config(None, [*DATA, "optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"checkpoint.async_save: expected bool"):
        load_config(None, [*DATA, "checkpoint.async_save=1"])
    with pytest.raises(ConfigError, match=r"parallel.*tp=0"):
        load_config(None, [*DATA, "parallel.tp=0"])  # the engine's own validation, prefixed with the section


def test_override_typo_is_reported_at_the_override():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stpes'.*did you mean 'steps'"):
        load_config(None, [*DATA, "train.stpes=5"])
    with pytest.raises(ConfigError, match=r"dotted.key=value"):
        load_config(None, [*DATA, "train.steps"])


def test_precedence_cli_over_file_over_base_over_defaults(tmp_path):
    write(tmp_path, "optim: {lr: 0.5, eps: 1.0e-6}\ntrain: {steps: 7}\n", "base.yaml")
    r = write(tmp_path, "base: base.yaml\noptim: {lr: 3e-4}\n")  # 3e-4 without a dot must be a float
    cfg = load_config(r, [*DATA, "train.steps=9"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.eps == pytest.approx(1e-6)  # from the base
    assert cfg.train.steps == 9  # CLI wins over the base
    assert cfg.optim.weight_decay == JobConfig().optim.weight_decay  # default


def test_env_expansion(tmp_path, monkeypatch):
    r = write(tmp_path, "run_dir: ${RUNS_ROOT:-/default}/x\ndata: {tokenizer: '${TOK_DIR}', datasets: [{path: /d}]}\n")
    monkeypatch.setenv("TOK_DIR", "/my/tok")
    cfg = load_config(r)
    assert cfg.run_dir == "/default/x" and cfg.data.tokenizer == "/my/tok"
    monkeypatch.delenv("TOK_DIR")
    with pytest.raises(ConfigError, match="TOK_DIR is not set"):
        load_config(r)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="freezes every group"):
        load_config(None, [*DATA, "train.freeze=[vision, merger, llm]"])
    with pytest.raises(ConfigError, match="unknown group 'vit'"):
        load_config(None, [*DATA, "train.freeze=[vit]"])
    with pytest.raises(ConfigError, match="warmup_steps=-1"):
        load_config(None, [*DATA, "optim.warmup_steps=-1"])


def test_shortened_run_clamps_the_warmup():
    """train.steps=3 on a recipe with a 10-step warm-up (issue 23): the warm-up is clamped to the run, said once, and
    the LR still climbs to its peak at the last step."""
    from train.optim import lr_multiplier

    cfg = load_config(RECIPES / "learn" / "stage1.yaml", ["train.steps=3"])
    assert load_config(RECIPES / "learn" / "stage1.yaml").optim.warmup_steps == 10
    assert cfg.optim.warmup_steps == 3
    assert cfg.notes == ["optim.warmup_steps=10 is longer than train.steps=3: the warm-up is clamped to 3 steps"]
    assert [lr_multiplier(s, cfg) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert load_config(None, [*DATA, "train.steps=10", "optim.warmup_steps=10"]).notes == []


def test_stage_defaults_and_group_lrs():
    cfg = load_config(None, [*DATA, "train.stage=3", "optim.lr=1e-4", "optim.lr_merger=1e-3"])
    assert cfg.frozen_groups == ("vision",)
    assert cfg.group_lr("merger") == pytest.approx(1e-3) and cfg.group_lr("llm") == pytest.approx(1e-4)
    assert load_config(None, [*DATA, "train.stage=1"]).frozen_groups == ("llm",)
    assert load_config(None, [*DATA, "train.stage=2"]).frozen_groups == ()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, [*DATA, "optim.lr=2e-5", "parallel.tp=2", "model.overrides={text.num_layers: 2}"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_every_field_is_documented():
    missing = [key for key, _, _, doc, _ in iter_fields(JobConfig) if not doc.strip()]
    assert not missing, f"fields without a docstring: {missing}"
    assert "Peak learning rate" in field_docs(type(JobConfig().optim))["lr"]


def _sections(md: str) -> dict[str, str]:
    out, name = {}, None
    for line in md.strip().splitlines():
        if line.startswith("### "):
            name = line[4:].strip("`")
            out[name] = ""
        elif name is not None:
            out[name] += line + "\n"
    return out


def test_docs_reference_is_current():
    """The sections train/ owns must match their dataclass docstrings (data/ and parallel/ sections are
    regenerated by the same command, but their docstrings belong to other modules)."""
    text = DOC.read_text()
    doc = _sections(text.split(BEGIN, 1)[1].split(END, 1)[0])
    gen = _sections(config_reference())
    for name in ("top level", "model", "optim", "train", "checkpoint", "metrics"):
        assert doc.get(name) == gen[name], f"docs/train.md section {name} is stale: python -m train.config_doc --write"
    assert set(doc) == set(gen)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    r = write(tmp_path, "trian: {steps: 3}\n")
    res = subprocess.run([sys.executable, "-m", "train", str(r)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert "config error: unknown config key 'trian'" in res.stderr and "did you mean 'train'" in res.stderr
    assert "Traceback" not in res.stderr


def test_all_shipped_recipes_parse(monkeypatch):
    monkeypatch.setenv("DEMO_DIR", "/nonexistent")
    recipes = sorted((REPO / "recipes").rglob("stage*.yaml"))
    assert len(recipes) >= 12  # tiny + 2b + 7b + 72b, three stages each
    for r in recipes:
        cfg = load_config(r)
        assert cfg.train.stage in (1, 2, 3), r
        assert yaml.safe_load(cfg.to_yaml())["train"]["stage"] == cfg.train.stage


def test_each_recipe_family_has_its_own_run_dirs(monkeypatch):
    """Before: the tiny recipes defaulted to runs/demo/stageN, where the demo keeps its checkpoints of another model
    (recipes/learn), so `python -m train recipes/tiny/stage1.yaml` after the demo resumed a stranger's checkpoint
    (issue 23). Every family's stages default to a directory of their own, and each stage starts from its own
    family's previous stage."""
    for var in ("DEMO_DIR", "LEARN_DIR", "QWEN2VL_RUNS"):
        monkeypatch.delenv(var, raising=False)
    owner: dict[Path, str] = {}
    for family in sorted(p.name for p in RECIPES.iterdir() if (p / "stage1.yaml").is_file() and p.name != "common"):
        dirs = [Path(load_config(RECIPES / family / f"stage{n}.yaml").run_dir) for n in (1, 2, 3)]
        assert [d.name for d in dirs] == ["stage1", "stage2", "stage3"] and len({d.parent for d in dirs}) == 1
        assert dirs[0].parent.name == family, dirs  # runs/<family>/stageN
        assert owner.setdefault(dirs[0].parent, family) == family, (family, owner)
        assert Path("runs/demo") not in dirs[0].parents and dirs[0].parent != Path("runs/demo")  # python -m demo's
        for n in (2, 3):
            assert Path(load_config(RECIPES / family / f"stage{n}.yaml").model.init_from) == dirs[n - 2]
