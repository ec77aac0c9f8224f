"""Repository hygiene that keeps docs and code honest: every test file and every test a docstring, comment or
document cites exists (a renamed test must not leave claims pointing at nothing)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_CITED = re.compile(r"\btests/[A-Za-z0-9_/]+\.py\b")
# A test named in prose or as a node id (FILE.py::NAME): `test_` + a name that is neither part of a longer word or
# path nor a test file's name; a `def test_...` is a definition, not a citation.
_CITED_TEST = re.compile(r"(?:(\btests/[A-Za-z0-9_/]+\.py)::)?(?<![\w/.])(test_\w+)(?![\w.])")
_DEFINED_TEST = re.compile(r"^\s*(?:async\s+)?def\s+(test_\w+)", re.M)


def _sources() -> list[Path]:
    out = []
    for folder in ("core", "model", "data", "parallel", "train", "tools", "demo", "benchmarks", "docs", "tests",
                   "launch"):
        out += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".sh", ".sbatch")]
    return out + [REPO / "README.md"]


def test_every_cited_test_file_exists():
    missing = sorted({(str(p.relative_to(REPO)), m) for p in _sources() for m in _CITED.findall(p.read_text())
                      if not (REPO / m).is_file()})
    assert not missing, "cited test files that do not exist: " + "; ".join(f"{src} cites {m}" for src, m in missing)


def test_every_cited_test_name_exists():
    defined = {p: set(_DEFINED_TEST.findall(p.read_text())) for p in (REPO / "tests").rglob("test_*.py")}
    everywhere = set().union(*defined.values())
    file_stems = {p.stem for p in defined}
    missing = set()
    for src in _sources():
        text = src.read_text()
        for m in _CITED_TEST.finditer(text):
            file, name = m.group(1), m.group(2)
            if name in file_stems or text[max(0, m.start() - 4) : m.start()].endswith("def "):
                continue
            known = defined.get(REPO / file, set()) if file else everywhere
            if name not in known:
                missing.add((str(src.relative_to(REPO)), f"{file}::{name}" if file else name))
    assert not missing, "cited tests that do not exist: " + "; ".join(f"{s} cites {n}" for s, n in sorted(missing))
