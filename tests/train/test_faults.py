"""Faults that must never cost a run or data (issue 12), each reproduced first: damaged checkpoints are found by
their checksums and passed over, a run directory of damaged checkpoints is an error, a full disk says so and keeps
the previous checkpoint, a diverging run saves nothing and names the last good checkpoint, a crafted checkpoint
runs no code, secrets from the environment never reach config.yaml, and config mistakes are caught at parse time
with the key named."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from train_helpers import RECIPES, REPO, demo_config, env_for, step_records

from core.config import ConfigError
from parallel import ParallelConfig, init_distributed
from train.checkpoint import (
    CheckpointManager,
    CheckpointSaveError,
    Layout,
    file_digest,
    list_complete,
    verify_checkpoint,
)
from train.config import load_config
from train.trainer import Trainer, TrainingStopped, run


def cfg_for(demo_dir: Path, run_dir: Path, *extra: str):
    return demo_config(demo_dir, RECIPES / "stage3.yaml", [f"run_dir={run_dir}", "model.init_from=null",
                                                          "optim.warmup_steps=1", "data.max_tokens=160",
                                                          "data.num_workers=0", *extra])


def ckpts(run_dir: Path) -> list[str]:
    return [p.name for p in list_complete(run_dir / "checkpoints")]


@pytest.fixture(scope="module")
def three_checkpoints(demo_dir, tmp_path_factory) -> Path:
    """A run with complete, checksummed checkpoints at steps 1, 2 and 3."""
    run_dir = tmp_path_factory.mktemp("ck") / "run"
    run(cfg_for(demo_dir, run_dir, "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=0"))
    assert ckpts(run_dir) == ["step_00000001", "step_00000002", "step_00000003"]
    return run_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ checksums
def test_every_file_is_checksummed_and_verifies(three_checkpoints):
    step3 = three_checkpoints / "checkpoints" / "step_00000003"
    files = json.loads((step3 / "meta.json").read_text())["files"]
    on_disk = {p.name for p in step3.iterdir() if p.name != "meta.json"}
    assert set(files) == on_disk and ".metadata" in files and any(n.endswith(".distcp") for n in files)
    assert verify_checkpoint(step3) == []


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "flip":  # 4 KB of flipped bits in the middle: same size, different content
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 4096]) + data[mid + 4096 :])
    elif how == "garbage":
        path.write_text("{not json")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target,how", [("distcp", "flip"), ("distcp", "truncate"), ("distcp", "zero"),
                                        (".metadata", "truncate"), ("meta.json", "garbage")])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(demo_dir, three_checkpoints, tmp_path, target,
                                                                 how, caplog):
    """Before: a 4 KB bit flip resumed silently (loss 145622); a truncated file failed in DCP without a path.
    Now resume=auto passes over the damaged step 3 with a warning naming the file and resumes from step 2."""
    run_dir = _copy(three_checkpoints, tmp_path / "run")
    step3 = run_dir / "checkpoints" / "step_00000003"
    victim = next(step3.glob("*.distcp")) if target == "distcp" else step3 / target
    _damage(victim, how)
    caplog.set_level("WARNING")
    trainer = Trainer(cfg_for(demo_dir, run_dir, "train.steps=4", "checkpoint.every=0"))
    try:
        assert trainer.resume_path.name == "step_00000002" and trainer.step == 2
        if target != "meta.json":
            assert victim.name in caplog.text and "passed over" in caplog.text
        else:
            assert "meta.json is unreadable" in caplog.text
    finally:
        trainer.close()
    # An explicit resume path is never second-guessed: it is an error naming the file.
    named = victim.name if target != "meta.json" else "meta.json"
    with pytest.raises(ConfigError, match=rf"step_00000003 is damaged: .*{named}"):
        Trainer(cfg_for(demo_dir, run_dir, "train.steps=4", f"checkpoint.resume={step3}"))


@pytest.mark.timeout(300)
def test_no_complete_checkpoint_is_an_error_not_a_silent_restart(demo_dir, three_checkpoints, tmp_path):
    """Before: deleting meta.json from every checkpoint restarted from init_from and lost the steps."""
    run_dir = _copy(three_checkpoints, tmp_path / "run")
    for p in (run_dir / "checkpoints").glob("step_*"):
        (p / "meta.json").unlink()
    with pytest.raises(ConfigError, match=r"holds step directories .* none is a complete, verified checkpoint.*"
                                          r"checkpoint.resume=never"):
        Trainer(cfg_for(demo_dir, run_dir, "train.steps=4"))
    trainer = Trainer(cfg_for(demo_dir, run_dir, "train.steps=4", "checkpoint.resume=never"))  # the user's choice
    assert trainer.step == 0
    trainer.close()


# ------------------------------------------------------------------------------------------ disk full
@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("the disk-full test mounts a tmpfs and needs root (CI runs as root)")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_says_so_and_keeps_the_previous_checkpoint(tmp_path):
    """Before: `[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598`."""
    init_distributed(ParallelConfig())
    with small_filesystem(tmp_path / "small", "1m") as fs:
        m = CheckpointManager(fs / "ckpt", Layout(), keep_last=0)
        m.save(1, {"model.w": torch.zeros(16, 16)}, "")
        with pytest.raises(CheckpointSaveError, match=r"no space left on device .*step_00000001 stays the latest"):
            m.save(2, {"model.w": torch.zeros(1024, 1024)}, "")  # 4 MB into a 1 MB filesystem
        assert m.latest().name == "step_00000001" and verify_checkpoint(m.latest()) == []


# ------------------------------------------------------------------------------------------ divergence
@pytest.mark.timeout(300)
def test_diverging_run_saves_nothing_and_names_the_last_good_checkpoint(demo_dir, tmp_path):
    """Before: checkpoints kept being saved while steps were skipped, keep_last pruned the good ones and the stop
    message pointed at post-divergence weights."""
    run_dir = tmp_path / "div"
    cfg = cfg_for(demo_dir, run_dir, "train.steps=8", "checkpoint.every=1", "checkpoint.keep_last=1",
                  "train.max_consecutive_skips=2")
    trainer = Trainer(cfg)
    trainer.engine.module.norm.register_forward_hook(
        lambda m, i, out: out * float("nan") if trainer.step + 1 in (4, 5) else out)
    with pytest.raises(TrainingStopped, match=r"stopping at step 5.*saved before the skips began, .*step_00000003"):
        try:
            trainer.train()
        finally:
            trainer.close()
    assert ckpts(run_dir) == ["step_00000003"]  # nothing saved at the skipped steps 4 and 5


# ------------------------------------------------------------------------------------------ security
class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_runs_no_code(demo_dir, three_checkpoints, tmp_path):
    """Before: a crafted .metadata given as model.init_from ran os.system. The attacker here also rewrites
    meta.json's checksum, so the file passes verification and reaches the (restricted) unpickler."""
    crafted = _copy(three_checkpoints / "checkpoints" / "step_00000003", tmp_path / "crafted" / "step_00000003")
    marker = tmp_path / "pwned"
    (crafted / ".metadata").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    meta = json.loads((crafted / "meta.json").read_text())
    meta["files"][".metadata"] = file_digest(crafted / ".metadata")
    (crafted / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"refers to posix.system.*refusing to load it"):
        Trainer(cfg_for(demo_dir, tmp_path / "run", "train.steps=1", f"model.init_from={crafted}"))
    assert not marker.exists()
    # Unverifiable (the checksum left as saved): rejected before anything is unpickled.
    meta["files"][".metadata"]["sha256"] = "0" * 64
    (crafted / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\.metadata does not match its checksum"):
        Trainer(cfg_for(demo_dir, tmp_path / "run2", "train.steps=1", f"model.init_from={crafted}"))
    assert not marker.exists()


def test_secrets_from_the_environment_never_reach_config_yaml(demo_dir, tmp_path, monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("STEPS", "1")
    run_dir = tmp_path / "sec"
    cfg = cfg_for(demo_dir, run_dir, "train.steps=${STEPS}", "metrics.wandb.name=${AWS_SECRET_ACCESS_KEY}")
    assert cfg.train.steps == 1 and cfg.metrics.wandb.name == secret  # the values are used ...
    run(cfg)
    saved = [run_dir / "config.yaml", *(run_dir / "checkpoints").glob("step_*/config.yaml")]
    assert len(saved) == 2
    for f in saved:
        text = f.read_text()
        assert secret not in text and "${AWS_SECRET_ACCESS_KEY}" in text, f  # ... but only references are stored
        assert str(demo_dir) in text and "${DEMO_DIR" not in text  # paths are saved as resolved


# ------------------------------------------------------------------------------------------ config
DATA = ["data.tokenizer=/tok", "data.datasets=[{path: /d}]"]


@pytest.mark.parametrize("override,match", [
    ("optim.lr=-1", r"optim.lr=-1.0: must be >= 0"),
    ("optim.lr=.nan", r"optim.lr: must be a finite number, got nan"),
    ("optim.grad_clip=.nan", r"optim.grad_clip: must be a finite number"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1: must be >= 0"),
    ("optim.eps=-1e-8", r"optim.eps=-1e-08: must be > 0"),
    ("optim.lr_merger=.inf", r"optim.lr_merger: must be a finite number, got inf"),
])
def test_impossible_values_are_rejected_at_parse_time_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*DATA, override])


def test_duplicate_yaml_keys_and_env_numbers(tmp_path, monkeypatch):
    r = tmp_path / "r.yaml"
    r.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  steps: 5\noptim:\n  eps: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"key 'optim' appears twice in one mapping \(lines 1 and 5"):
        load_config(r, DATA)
    monkeypatch.setenv("STEPS", "7")
    monkeypatch.setenv("LR", "3e-4")
    r.write_text("train: {steps: '${STEPS}'}\noptim: {lr: '${LR}'}\n")
    cfg = load_config(r, DATA)
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)


def _cli(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(300)
def test_setup_mistakes_are_one_line_exit_2(demo_dir, tmp_path):
    env = env_for(demo_dir)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {steps: [1, 2}\n")
    cases = [
        ([str(bad_yaml)], r"config error: .*bad.yaml is not valid YAML"),
        ([str(RECIPES / "stage3.yaml"), f"run_dir={tmp_path / 'a'}", "parallel.tp=2", "model.init_from=null"],
         r"config error: .*(pp\*dp\*tp = 1\*-?\d+\*2|world size 1 is not divisible by pp\*tp)"),
        ([str(RECIPES / "stage3.yaml"), f"run_dir={tmp_path / 'b'}", "model.init_from=/nope/nothing"],
         r"config error: model.init_from='/nope/nothing'"),
        ([str(RECIPES / "stage3.yaml"), f"run_dir={tmp_path / 'c'}", "model.init_from=null",
          "data.datasets=[{path: /nope/shards}]"], r"config error: .*no dataset.json and no .tar shards found"),
    ]
    for args, match in cases:
        res = _cli(args, env)
        assert res.returncode == 2, (args, res.stdout[-2000:], res.stderr[-3000:])
        lines = [x for x in res.stderr.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x]
        assert len(lines) == 1 and "Traceback" not in res.stderr, (args, res.stderr[-3000:])
        import re

        assert re.search(match, lines[0]), (match, lines[0])


@pytest.mark.timeout(300)
def test_data_sources_are_checked_before_the_start_and_the_model(demo_dir, tmp_path):
    """At 72B, building the model and loading its weights takes minutes: a wrong data path (training or eval)
    must fail before. Each recipe here also names init_from weights that do not exist, which the start (the step
    before the model is built) refuses; the error is the data's, so nothing of the start ran."""
    nowhere = "model.init_from=/nope/weights"
    with pytest.raises(ValueError, match="'/nope/shards': no dataset.json and no .tar shards found"):
        Trainer(cfg_for(demo_dir, tmp_path / "a", nowhere, "data.datasets=[{path: /nope/shards}]"))
    with pytest.raises(ValueError, match="'/nope/heldout': no dataset.json and no .tar shards found"):
        Trainer(cfg_for(demo_dir, tmp_path / "b", nowhere, "eval.datasets=[{path: /nope/heldout}]"))
    # The same recipe with its own data: the start's error, so the two failures above came first.
    with pytest.raises(ConfigError, match="model.init_from='/nope/weights': not an HF directory"):
        Trainer(cfg_for(demo_dir, tmp_path / "c", nowhere))


# ------------------------------------------------------------------------------------------ signals + resume
# A signal must reach the run while it computes: one that lands while the loader waits for data (polled between
# samples, and before every microbatch) ends the run at once with nothing to save, which an outside timer cannot
# rule out. So the run signals itself in a forward after a logged step (the stop flag is read at that step's end);
# in the second-Ctrl-C case the save this asks for waits (SAVING is touched first) and the test's Ctrl-C lands there.
_SIGNALLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import torch
    from model.vlm import VLModel
    from train.trainer import Trainer

    sig, saving, metrics = signal.Signals[sys.argv[1]], sys.argv[2], Path(sys.argv[3]) / "metrics.jsonl"
    sent = []

    def first_signal(module, args, out):
        if isinstance(module, VLModel) and not sent and metrics.is_file() and '"loss"' in metrics.read_text():
            sent.append(True)
            os.kill(os.getpid(), sig)

    torch.nn.modules.module.register_module_forward_hook(first_signal)
    if saving != "-":
        save = Trainer.save

        def slow_save(self):
            Path(saving).touch()
            time.sleep(30)  # the second Ctrl-C arrives here: an abort never saves
            save(self)

        Trainer.save = slow_save
    from train.__main__ import main
    sys.exit(main(sys.argv[4:]))
""")


def _signalled_run(demo_dir: Path, tmp_path: Path, sig: signal.Signals,
                   saving: Path | None) -> tuple[Path, subprocess.Popen]:
    """`python -m train` on the tiny stage 3 for 200 steps (far more than it runs), signalling itself as above."""
    run_dir, driver = tmp_path / "run", tmp_path / "driver.py"
    driver.write_text(_SIGNALLED_RUN)
    cmd = [sys.executable, str(driver), sig.name, str(saving or "-"), str(run_dir), str(RECIPES / "stage3.yaml"),
           f"run_dir={run_dir}", "model.init_from=null", "train.steps=200", "checkpoint.every=0",
           "data.max_tokens=160", "data.num_workers=0"]
    return run_dir, subprocess.Popen(cmd, env=env_for(demo_dir), cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_exits_non_zero(demo_dir, tmp_path, sig, code):
    """Before: SIGINT was a KeyboardInterrupt traceback and a signal-stopped run exited 0 like a finished one."""
    run_dir, p = _signalled_run(demo_dir, tmp_path, sig, None)
    out, err = p.communicate(timeout=240)
    assert p.returncode == code, (out[-2000:], err[-3000:])
    assert f"{sig.name} received: saving a checkpoint" in err and "Traceback" not in err, err[-3000:]
    assert ckpts(run_dir) == ["step_00000002"], err[-3000:]  # the step the signal came in (after step 1's record)


@pytest.mark.timeout(300)
def test_second_ctrl_c_aborts_at_once_without_saving(demo_dir, tmp_path):
    """The first Ctrl-C asks for a save at the end of the step (exit 130, as above); a second one aborts: not the
    save-and-130 path (which a lost abort takes) and no checkpoint written."""
    saving = tmp_path / "saving"
    run_dir, p = _signalled_run(demo_dir, tmp_path, signal.SIGINT, saving)
    deadline = time.monotonic() + 200
    while not saving.exists():  # the first Ctrl-C was taken and its save began
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert "SIGINT received: saving a checkpoint" in err and step_records_safe(run_dir), err[-3000:]
    assert p.returncode not in (0, 130), (p.returncode, out[-2000:], err[-3000:])
    assert ckpts(run_dir) == [], err[-3000:]


def step_records_safe(run_dir: Path) -> dict:
    try:
        return step_records(run_dir)
    except (OSError, json.JSONDecodeError):
        return {}


@pytest.mark.timeout(300)
def test_resume_checks_steps_and_warns_on_a_changed_schedule(demo_dir, three_checkpoints, tmp_path, caplog):
    run_dir = _copy(three_checkpoints, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"is at step 3, past this recipe's train.steps=2"):
        Trainer(cfg_for(demo_dir, run_dir, "train.steps=2"))
    caplog.set_level("WARNING")
    trainer = Trainer(cfg_for(demo_dir, run_dir, "train.steps=4", "optim.lr=5e-4"))
    trainer.close()
    assert re_search(r"different optimizer schedule .*lr_llm: 0\.001 -> 0\.0005.*apply from step 4", caplog.text)


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None

