"""The development tooling stays wired: tests share helpers without importing conftest, the `slow` marker
that selects the quick subset is registered, CI lints, the zarr internals the writer imports are bounded,
and every benchmark starts from any working directory.

Files are found from this file's path, so the tests pass from any working directory."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_no_test_imports_conftest():
    """conftest.py is pytest's to load; shared plain helpers live in tests/helpers.py."""
    offenders = [p.name for p in sorted((ROOT / "tests").glob("*.py"))
                 if re.search(r"^\s*(from conftest import|import conftest)", p.read_text(), re.M)]
    assert offenders == []


def test_the_slow_marker_is_registered():
    """`pytest -m "not slow"` selects the quick subset; an unregistered marker would only warn."""
    markers = PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.split(":")[0] == "slow" for m in markers)


def test_ci_lints_before_building_the_docs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ruff = next(i for i, line in enumerate(ci) if re.search(r"\bruff check \.", line))
    docs = next(i for i, line in enumerate(ci) if "mkdocs build --strict" in line)
    assert ruff < docs
    assert PYPROJECT["tool"]["ruff"]["line-length"] == 120


def test_zarr_is_bounded_above_while_the_package_imports_its_internals():
    """zarr.core is zarr's internal API: a minor release may move it, so the requirement has an upper bound."""
    uses_internals = any(re.search(r"^\s*(from|import) zarr\.core\b", p.read_text(), re.M)
                         for p in (ROOT / "matryoshka").rglob("*.py"))
    (zarr,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"zarr\b", d)]
    assert uses_internals and "<" in zarr, zarr


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "common.py"))
def test_every_benchmark_starts_from_another_directory(script, tmp_path):
    """Benchmarks import their shared code (common.py, each other) from their own folder, which Python puts
    first on sys.path for a script: `python benchmarks/X.py --help` works from the repository and elsewhere."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: "), r.stdout[:200]
