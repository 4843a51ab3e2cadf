"""The README stays true: every harvest key is documented, and its Python example runs."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from matryoshka.config import HarvestConfig

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_harvest_key_and_flag_is_documented():
    for f in dataclasses.fields(HarvestConfig):
        assert f"| `{f.name}` | `--{f.name.replace('_', '-')}` |" in README, f.name


def test_python_example_runs(gpt2_dir, corpus, tmp_path, monkeypatch):
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README, re.S).group(1)
    code = (code.replace('model="gpt2"', f'model="{gpt2_dir}"').replace('dataset="corpus.txt"', f'dataset="{corpus}"')
            .replace("layers=8", "layers=1").replace('"8.', '"1.').replace('tokens="1M"', 'tokens="16K"')
            .replace("4096)", "512)"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["x"].shape == (512, 64)
    assert scope["heldout"][0] == 0 and scope["stats"].count > 0
