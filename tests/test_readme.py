"""The README stays true: every harvest key is documented, and its Python API examples run."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from matryoshka.config import HarvestConfig

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_harvest_key_and_flag_is_documented():
    for f in dataclasses.fields(HarvestConfig):
        assert f"| `{f.name}` | `--{f.name.replace('_', '-')}` |" in README, f.name


def test_setup_commands_are_the_ones_ci_and_the_default_pipeline_use():
    main, tests = (line.split("#")[0].strip() for line in re.search(r"```bash\n(.*?)```", README, re.S).group(1)
                   .splitlines()[:2])
    assert main == "pip install -e . && pipeline run"  # `pipeline run` reads ./pipeline.yaml
    assert (Path(__file__).parents[1] / "pipeline.yaml").is_file()
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci  # .ci/run runs exactly the README's test command


def _api_examples() -> str:
    """Every Python block of the README's Python API section, in order: one script."""
    section = README[README.index("## Python API\n"):]
    section = section[:section.index("\n## ", 1)]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


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
