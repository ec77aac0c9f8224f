"""benchmarks/suite_setup.py: what the GPU suite settles before any alarm (the pinned oracle from a carried
wheel, the process group's smoke test with its fallback) and its watch on dynamo's recompile limit."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import suite_setup as SS  # noqa: E402


def _wheel(folder: Path, name: str, version: str, body: str) -> Path:
    """A minimal pure-Python wheel of package `name` whose __init__ is `body`."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {f"{name}/__init__.py": body,
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_the_oracle_pin_is_read_from_pyproject():
    pin = SS.pinned_version("transformers")
    assert pin and pin.count(".") == 2 and f'"transformers=={pin}"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.timeout(300)
def test_a_carried_wheel_of_the_pinned_version_is_installed_and_imported_first(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    _wheel(tmp_path / "whl", "gs_fake_oracle", "2.0.0", "__version__ = '2.0.0'\n")
    rec = SS.use_pinned_wheel("gs_fake_oracle", "2.0.0", tmp_path / "whl", check="assert True")
    assert rec["installed"] is None and rec["used"] == "2.0.0" and "error" not in rec, rec
    import gs_fake_oracle

    assert gs_fake_oracle.__version__ == "2.0.0" and rec["target"] in sys.path[0]
    assert SS.os.environ["PYTHONPATH"].split(SS.os.pathsep)[0] == rec["target"], "children import it first too"


@pytest.mark.timeout(300)
def test_a_wheel_that_does_not_import_here_is_reported_and_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    path0 = list(sys.path)
    _wheel(tmp_path / "whl", "gs_bad_oracle", "3.1.0", "raise ImportError('needs huggingface-hub>=9')\n")
    rec = SS.use_pinned_wheel("gs_bad_oracle", "3.1.0", tmp_path / "whl")
    assert rec["used"] is None and "needs huggingface-hub>=9" in rec["error"] and "did not import" in rec["mismatch"]
    assert sys.path == path0 and "gs_bad_oracle" not in sys.modules


def test_no_wheel_for_the_pin_is_a_reported_mismatch(tmp_path):
    assert "ruff" not in sys.modules  # installed (the dev extra), never imported
    rec = SS.use_pinned_wheel("ruff", "0.0.1", tmp_path)
    assert rec["used"] == rec["installed"] is not None and "pinned 0.0.1" in rec["mismatch"] and "error" not in rec


@pytest.mark.timeout(120)
def test_a_failing_process_group_falls_back_to_gloo_with_the_error_kept():
    first = SS.ProcessGroupSmoke("no_such_backend", "cpu").result(90)
    assert first["ok"] is False and "no_such_backend" in first["error"]
    backend, rec = SS.choose_backend(first, SS.ProcessGroupSmoke("gloo", "cpu"))
    assert backend == "gloo" and rec["tried"][1]["ok"] and "no_such_backend failed" in rec["fallback"]
    assert rec["tried"][0]["error"] == first["error"]


def test_dynamo_watch_reports_a_recompile_limit_hit():
    import torch
    import torch._dynamo.config as dc

    saved = dc.recompile_limit
    try:
        SS.raise_recompile_limits(limit=1)
        watch = SS.DynamoWatch().start([])
        f = torch.compile(lambda x: x * 2, backend="eager")
        for dt in (torch.float32, torch.float64, torch.int64):  # a new dtype is a recompile
            f(torch.ones(3, dtype=dt))
        got = watch.stop()
        assert got["recompile_limit"] == 1 and got["limit_hits"], got
        assert "recompile_limit" in got["limit_hits"][0]
    finally:
        dc.recompile_limit = saved
        torch._dynamo.reset()
