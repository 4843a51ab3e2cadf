"""The README and docs/ stay true: every key and flag is documented (by a page generated from the
config classes, and kept current), the README's Python API examples run, its set-up commands are the
ones CI runs, every page is reachable from the index, and no docstring quotes a measurement.

Files are found from this file's path, so the tests pass from any working directory."""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from matryoshka.config import EvaluateConfig, HarvestConfig, SyntheticConfig, TrainConfig, opt

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
REFERENCE = (DOCS / "configuration.md").read_text()


def _generator():
    """docs/config_reference.py, the script that writes docs/configuration.md (not a package module)."""
    spec = importlib.util.spec_from_file_location("config_reference", DOCS / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short():
    assert len(README.splitlines()) <= 300


def test_every_key_and_flag_is_documented():
    """Each section's key with its flag (``--context-size`` for ``context_size``), in the reference."""
    for cls, yaml_only in ((HarvestConfig, ()), (TrainConfig, ("runs",)), (EvaluateConfig, ("run",))):
        for name in cls.model_fields:
            row = f"| `{name}` | " + ("" if name in yaml_only else f"`--{name.replace('_', '-')}")
            assert row in REFERENCE, (cls.__name__, name)


def test_every_synthetic_setting_is_documented_with_its_default():
    for name, f in SyntheticConfig.model_fields.items():
        assert f"| `{name}` | `{f.default}` |" in REFERENCE, name


def test_configuration_reference_is_generated_from_the_current_configs():
    assert _generator().render() == REFERENCE, "docs/configuration.md is stale: run python docs/config_reference.py"


def test_reference_rows_come_from_help_texts_defaults_and_the_real_flags():
    """A known answer for the generator: a field's help text (RST code marks turned into Markdown's, ``<``
    escaped outside code), its default as YAML writes it, and the flags typer really declares."""
    class Toy(BaseModel):
        alpha_beta: int = opt(3, "An ``alpha`` for runs/<name>/, not `<this>`.")
        switch: bool = opt(False, "A | switch.")

    gen = _generator()
    assert gen.table(Toy, None) == ["| key | default | meaning |", "|---|---|---|",
                                    "| `alpha_beta` | `3` | An `alpha` for runs/&lt;name>/, not `<this>`. |",
                                    "| `switch` | `false` | A \\| switch. |"]
    flags = gen.cli_flags("evaluate")
    assert (flags["lm"], flags["lm_tokens"], flags["run"]) == ("--lm/--no-lm", "--lm-tokens", "RUN")
    assert "config" not in flags and "quiet" not in flags


def test_setup_commands_are_the_ones_ci_and_the_default_pipeline_use():
    main, tests = (line.split("#")[0].strip() for line in re.search(r"```bash\n(.*?)```", README, re.S).group(1)
                   .splitlines()[:2])
    assert main == "pip install -e . && pipeline run"  # `pipeline run` reads ./pipeline.yaml
    assert (ROOT / "pipeline.yaml").is_file()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert tests == ci[-1]  # .ci/run runs exactly the README's test command
    assert any(re.search(r"\bmkdocs build --strict\b", line) for line in ci)  # and fails on a broken doc link


def test_every_page_is_in_the_index_and_the_nav():
    pages = {p.name for p in DOCS.glob("*.md")}
    index = (DOCS / "index.md").read_text()
    assert pages - {"index.md"} <= set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    assert pages == {file for entry in nav for file in entry.values()}


def test_readme_links_point_at_files_that_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links
    for link in links:
        if "://" not in link:
            assert (ROOT / link).exists(), link


def _api_section() -> str:
    section = README[README.index("## Python API\n"):]
    return section[:section.index("\n## ", 1)]


def _api_examples() -> str:
    """Every Python block of the README's Python API section, in order: one script."""
    return "\n".join(re.findall(r"```python\n(.*?)```", _api_section(), re.S))


def test_the_docs_site_shows_the_readme_python_api():
    """docs/python-api.md includes the section between the snippet markers, so the site shows the
    examples this file runs."""
    section = _api_section()
    assert "--8<-- [start:api]" in section and "--8<-- [end:api]" in section
    inner = section[section.index("[start:api]"):section.index("[end:api]")]
    assert inner.count("```python") == _api_section().count("```python") > 0
    assert '--8<-- "README.md:api"' in (DOCS / "python-api.md").read_text()


_MEASURED = re.compile(r"\bmeasured\b|\btook \d|tok/s|[GM]B/s|\b\d+(\.\d+)?x (faster|slower)\b"
                       r"|\b\d+(\.\d+)? ?(ms|us)\b")


def test_no_docstring_quotes_a_measurement():
    """Measured numbers go stale in docstrings; they live in docs/benchmarks.md with their command."""
    found = []
    for path in sorted((ROOT / "matryoshka").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                found += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in _MEASURED.finditer(doc)]
    assert not found, found


@pytest.mark.slow
def test_python_examples_run(gpt2_dir, corpus, tmp_path, monkeypatch):
    code = _api_examples()
    for old, new in (('model="gpt2"', f'model="{gpt2_dir}"'), ('dataset="corpus.txt"', f'dataset="{corpus}"'),
                     ("layers=8", "layers=1"), ('"8.', '"1.'), ('tokens="1M"', 'tokens="16K"'),
                     ("batch_size=4096", "batch_size=256"), ("4096)", "512)"), ('"tokens": "1M"', '"tokens": "2K"')):
        assert old in code, old  # the example still says what this test shrinks
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["x"].shape == (512, 64)
    assert scope["heldout"][0] == 0 and scope["stats"].count > 0
    assert [p.name for p in scope["run_dirs"]] == ["transcoder", "sae"]
    tc, sae = scope["tc"], scope["sae"]
    assert tc.transcoder and tc.width == 1024 and tc.group_sizes == [64, 128, 256, 576]  # 16x the tiny 64
    assert not sae.transcoder and sae.group_sizes == tc.group_sizes and scope["prefix"] == 64
    assert scope["acts"].shape == (512, 1024) and scope["y_hat"].shape == scope["x_hat"].shape == (512, 64)
    assert {r["run"] for r in scope["results"]} == {"transcoder", "sae"}
    assert all((p / "eval.json").is_file() for p in scope["run_dirs"])
