"""`pipeline models` and the real-model examples: sizes from the model's own config, the seed's table
offline, a clear error for an unknown model, and examples/ that validate without downloading anything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from matryoshka.cli import app
from matryoshka.config import load_pipeline
from matryoshka.suggest import SEED_TABLE, seed_table, suggest

EXAMPLES = Path(__file__).parents[1] / "examples"


def _rows(output: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in output.strip().splitlines()[1:]}


def test_sizes_come_from_the_models_config(gpt2_dir, gemma2_dir):
    out = CliRunner().invoke(app, ["models", str(gpt2_dir), str(gemma2_dir)])
    assert out.exit_code == 0, out.output
    rows = _rows(out.output)
    for d in (gpt2_dir, gemma2_dir):
        # the tiny models: d_model 64, 3 layers -> 1024 latents, groups [64, 128, 256, 576], k 1024 // 200 = 5
        assert rows[str(d)][1:7] == ["config", "64", "3", "1,024", "5", "[64,"], rows
        assert out.output.count("[64, 128, 256, 576]") == 2


def test_no_argument_shows_the_seeds_table_offline():
    out = CliRunner().invoke(app, ["models"])
    assert out.exit_code == 0
    rows = _rows(out.output)
    assert list(rows) == list(SEED_TABLE)
    assert rows["gpt2"][1:7] == ["seed", "table", "768", "12", "12,288", "61"]
    assert rows["gemma-2-2b"][3:7] == ["2304", "26", "36,864", "184"]
    assert "[2304, 4608, 9216, 20736]" in out.output and "[768, 1536, 3072, 6912]" in out.output
    assert all(sum(s.group_sizes) == s.width == 16 * s.d_model for s in seed_table())


def test_an_unknown_or_unsupported_model_is_one_line(tmp_path):
    out = CliRunner().invoke(app, ["models", str(tmp_path / "no-such-model")])
    assert out.exit_code == 2 and out.output.count("\n") == 1
    assert f"model: '{tmp_path / 'no-such-model'}' is a local path that does not exist" in out.output
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = CliRunner().invoke(app, ["models", str(tmp_path / "llama")])
    assert out.exit_code == 2 and "is a 'llama' model; supported: GPT-2 family" in out.output


@pytest.mark.parametrize("name, model, d_model, k", [("gpt2-small", "gpt2", 768, 64),
                                                     ("gemma-2-2b", "gemma-2-2b", 2304, 32)])
def test_examples_validate_without_the_model(name, model, d_model, k):
    cfg = load_pipeline(EXAMPLES / f"{name}.yaml")  # HF_HUB_OFFLINE: nothing may need the network
    assert cfg.harvest.model == model and cfg.harvest.site_list == [(8, "resid_mid"), (8, "mlp_out")]
    runs = {r.name: r.resolve(d_model) for r in cfg.train.runs}
    tc = runs["matryoshka-transcoder"]
    assert (tc.source, tc.target, tc.k) == ("8.resid_mid", "8.mlp_out", k)
    assert tc.group_sizes == suggest(model, d_model, 0, "").group_sizes == [d_model * m for m in (1, 2, 4, 9)]
    assert runs["matryoshka-sae"].group_sizes == tc.group_sizes and runs["batchtopk-sae"].k == k
    assert all(r.width == 16 * d_model for r in runs.values())
    if model == "gemma-2-2b":
        assert cfg.harvest.model_dtype == "bfloat16" and tc.group_sizes == [2304, 4608, 9216, 20736]
