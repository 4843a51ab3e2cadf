"""Config parsing: counts, sites, held-out split, pipeline.yaml and the CLI flags that mirror it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from matryoshka.cli import _config_from, _flags_from
from matryoshka.config import (
    ConfigError,
    HarvestConfig,
    RunConfig,
    TrainConfig,
    load_pipeline,
    parse_count,
    parse_sites,
)


@pytest.mark.parametrize("text, n", [("4096", 4096), (4096, 4096), ("64K", 64_000), ("200M", 200_000_000),
                                     ("1.5B", 1_500_000_000), ("2g", 2_000_000_000)])
def test_parse_count(text, n):
    assert parse_count(text) == n


@pytest.mark.parametrize("bad", ["0", "-1", "1.5X", "", True, 0])
def test_parse_count_rejects(bad):
    with pytest.raises(ConfigError, match="tokens"):
        parse_count(bad)


@pytest.mark.parametrize("tokens, dead, want", [("10M", 0, 1_000_000), ("20M", "0", 2_000_000), ("1B", 0, 10_000_000),
                                                ("50", 0, 5), ("9", 0, 1), ("10M", "2M", 2_000_000),
                                                ("10M", "50M", 50_000_000)])
def test_dead_tokens_default_to_a_tenth_of_the_run(tokens, dead, want):
    """0 resolves to tokens / 10, capped at 10M, so a latent can die (and be revived) within any run."""
    run = RunConfig(name="r", source="8.resid_mid", tokens=tokens, dead_tokens=dead)
    assert run.resolve(768).dead_tokens == want


def test_parse_sites_layers_and_explicit():
    assert parse_sites("resid_mid,mlp_out", "6,8") == [(6, "resid_mid"), (6, "mlp_out"), (8, "resid_mid"),
                                                       (8, "mlp_out")]
    assert parse_sites("9.mlp_out,8.resid_mid", None) == [(8, "resid_mid"), (9, "mlp_out")]
    assert parse_sites(["resid_pre", "8.resid_post"], 3) == [(3, "resid_pre"), (8, "resid_post")]
    with pytest.raises(ConfigError, match="has no layer"):
        parse_sites("resid_mid", None)
    with pytest.raises(ConfigError, match="unknown site 'mlp'"):
        parse_sites("8.mlp", None)


def test_tokens_round_up_to_whole_contexts_and_holdout():
    cfg = HarvestConfig(tokens=1000, context_size=128, layers=1)
    assert cfg.n_sequences == 8
    assert cfg.holdout_sequences(seqs_per_chunk=2) == 2  # 1 % of 8 sequences -> one whole chunk
    assert HarvestConfig(tokens="100K", context_size=100, layers=1, holdout="2K").holdout_sequences(3) == 21
    # rounded up to whole chunks, from a fraction of a sequence too, and with no float error
    assert HarvestConfig(tokens=128_000, context_size=128, layers=1, holdout="0.45%").holdout_sequences(4) == 8
    assert HarvestConfig(tokens=576 * 100, context_size=576, layers=1, holdout="29%").holdout_sequences(1) == 29
    with pytest.raises(ConfigError, match="leaves no training data"):
        HarvestConfig(tokens=256, context_size=128, layers=1, holdout="60%").holdout_sequences(2)


def test_yaml_round_trip_and_key_paths(tmp_path: Path):
    p = tmp_path / "pipeline.yaml"
    harvest = {"model": "gpt2", "layers": 8, "sites": "resid_mid,mlp_out", "tokens": "1M"}
    p.write_text(yaml.safe_dump({"harvest": harvest}))
    cfg = load_pipeline(p).harvest
    assert cfg.tokens == 1_000_000 and cfg.site_list == [(8, "resid_mid"), (8, "mlp_out")]
    p.write_text(yaml.safe_dump({"harvest": {"modle": "gpt2"}}))
    with pytest.raises(ConfigError, match=r"^harvest\.modle: unknown key; valid keys are .*model"):
        load_pipeline(p)
    p.write_text(yaml.safe_dump({"harvest": {"layers": 8, "context_size": "long"}}))
    with pytest.raises(ConfigError, match=r"^harvest\.context_size: 'long' is a str; expected an integer"):
        load_pipeline(p)
    p.write_text(yaml.safe_dump({"harvst": {}}))
    with pytest.raises(ConfigError, match=r"^harvst: unknown section"):
        load_pipeline(p)


def test_every_config_key_is_a_flag_and_flags_override_yaml(tmp_path: Path):
    flags = {p.name for p in _flags_from(HarvestConfig)}
    assert flags == set(HarvestConfig.model_fields)
    train_flags = {p.name for p in _flags_from(TrainConfig, skip=("runs",))}
    assert train_flags == set(TrainConfig.model_fields) - {"runs"}
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({"harvest": {"layers": 8, "tokens": "1M", "dtype": "float16"}}))
    cfg = _config_from(HarvestConfig, "harvest", p, {"tokens": "2M", "dtype": None})
    assert cfg.tokens == 2_000_000 and cfg.dtype == "float16"


def test_repository_pipeline_yaml_is_valid():
    cfg = load_pipeline(Path(__file__).parents[1] / "pipeline.yaml")
    assert cfg.harvest.site_list


@pytest.mark.parametrize("cls, kw, message", [
    (RunConfig, {"lr": float("nan")}, "lr: nan must be positive"),
    (RunConfig, {"lr": "0.01"}, "lr: '0.01' is a str; expected a number"),
    (RunConfig, {"width": -5}, "width: -5 must be a non-negative integer"),
    (RunConfig, {"decay_fraction": 5.0}, "decay_fraction: 5.0 must be between 0 and 1"),
    (RunConfig, {"grad_clip": -1}, "grad_clip: -1 must be 0 or more"),
    (RunConfig, {"aux_penalty": float("inf")}, "aux_penalty: inf must be 0 or more"),
    (RunConfig, {"warmup_steps": -10}, "warmup_steps: -10 must be a non-negative integer"),
    (RunConfig, {"name": "/tmp/escaped"}, "name: '/tmp/escaped' must be a plain folder name"),
    (HarvestConfig, {"seed": -1}, "seed: -1 must be a non-negative integer"),
    (HarvestConfig, {"chunk_mb": float("inf")}, "chunk_mb: inf must be a finite number"),
    (HarvestConfig, {"source": "synthetic", "model": "google/gemma-2-2b"},
     "model: 'google/gemma-2-2b' means nothing to source: synthetic"),
    (HarvestConfig, {"source": "synthetic", "hub_id": "openai-community/gpt2"},
     "hub_id: 'openai-community/gpt2' means nothing to source: synthetic"),
    (HarvestConfig, {"hub_id": "../models/gpt2"}, "hub_id: '../models/gpt2' is not a Hugging Face Hub id"),
    (HarvestConfig, {"source": "synthetic", "synthetic": {"magnitude_std": float("nan")}},
     "magnitude_std: nan must be a finite number"),
])
def test_impossible_values_are_one_line_errors(cls, kw, message):
    base = {"name": "r", "source": "8.resid_mid"} if cls is RunConfig else {"layers": 0, "sites": "resid_mid"}
    with pytest.raises(ConfigError) as e:
        cls(**{**base, **kw})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_config_that_is_not_a_yaml_file(tmp_path: Path):
    (tmp_path / "bad.yaml").write_bytes(b"harvest:\n  model: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_pipeline(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_pipeline(tmp_path)


def test_a_key_given_twice_is_an_error(tmp_path: Path):
    (tmp_path / "p.yaml").write_text("harvest:\n  layers: 8\n  tokens: 1M\n  tokens: 2M\n")
    with pytest.raises(ConfigError, match=r"config: 'tokens' is given twice in one mapping \(line 4\)"):
        load_pipeline(tmp_path / "p.yaml")


def test_every_user_facing_error_is_one_base_class_with_its_exit_status():
    """The CLI catches MatryoshkaError alone; each error keeps the built-in base it had (callers catch those)."""
    from matryoshka.cache.lock import CacheLockedError
    from matryoshka.cache.store import CacheDamagedError, CacheError
    from matryoshka.cache.writer import ActivationError
    from matryoshka.errors import MatryoshkaError
    from matryoshka.evaluate.errors import NonFiniteMetrics
    from matryoshka.train.stop import Interrupted

    for cls, base, status in ((ConfigError, ValueError, 2), (CacheError, ValueError, 2),
                              (CacheLockedError, RuntimeError, 2), (ActivationError, RuntimeError, 1),
                              (NonFiniteMetrics, RuntimeError, 1)):
        assert issubclass(cls, MatryoshkaError) and issubclass(cls, base) and cls.exit_code == status, cls
    assert CacheDamagedError("c", "gone").exit_code == 2
    stopped = Interrupted(15, "stopped")
    assert isinstance(stopped, MatryoshkaError) and stopped.exit_code == 143 and stopped.prefix == ""


def test_an_integer_given_for_a_number_stays_an_integer():
    """``noise: 0`` goes into a synthetic cache's identity and ``lr: 1`` into a run's config.json as given:
    turned into 0.0 and 1.0 they would change the fingerprint of a cache harvested before."""
    from matryoshka.config import SyntheticConfig

    assert repr(SyntheticConfig(noise=0, parent_rate=1).model_dump()["noise"]) == "0"
    dumped = RunConfig(name="r", source="8.resid_mid", lr=1, grad_clip=0.5).model_dump()
    assert (repr(dumped["lr"]), repr(dumped["grad_clip"])) == ("1", "0.5")
    with pytest.raises(ConfigError, match=r"^lr: True is a bool; expected a number$"):
        RunConfig(name="r", source="8.resid_mid", lr=True)


def test_a_union_names_every_type_it_accepts_and_list_items_their_index(tmp_path: Path):
    p = tmp_path / "pipeline.yaml"
    p.write_text(yaml.safe_dump({"harvest": {"layers": 1.5}}))
    with pytest.raises(ConfigError, match=r"^harvest\.layers: 1\.5 is a float; expected a string or a list or an "
                                          r"integer or null$"):
        load_pipeline(p)
    p.write_text(yaml.safe_dump({"train": {"runs": [{"name": "a", "source": "s", "group_sizes": [1, "x"]}]}}))
    with pytest.raises(ConfigError, match=r"^train\.runs\[0\]\.group_sizes\[1\]: 'x' is a str; expected an integer$"):
        load_pipeline(p)


def test_the_language_model_code_does_not_import_the_config():
    """config reads a model's width through models; models imports only the names both share (no cycle)."""
    import subprocess
    import sys

    code = "import sys, matryoshka.models; print('matryoshka.config' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_runs_folder_is_a_local_path_or_object_storage_never_a_folder_named_after_a_url(tmp_path: Path):
    """`--runs-dir s3://team/runs` once wrote a local folder named 's3:'. Object storage is kept as a URL (runs are
    shared through it, run_folder.py), file:// is a local path, and what cannot be written to is refused."""
    from matryoshka.config import EvaluateConfig

    for cls in (TrainConfig, EvaluateConfig):
        assert cls(runs_dir="s3://team/runs").runs_dir == "s3://team/runs"
        with pytest.raises(ConfigError, match=r"runs_dir: 'https://example.com/runs' is a web address, which cannot "
                                              r"be written to; give a local folder or object storage"):
            cls(runs_dir="https://example.com/runs")
        with pytest.raises(ConfigError, match=r"runs_dir: 'nosuch://team/runs' names storage that cannot be used here "
                                              r"\(Protocol not known: nosuch\)"):
            cls(runs_dir="nosuch://team/runs")
    with pytest.raises(ConfigError, match=r"results_dir: 'https://x/y' is a web address"):
        EvaluateConfig(results_dir="https://x/y")
    assert TrainConfig(runs_dir=f"file://{tmp_path}").runs_dir == str(tmp_path)
    assert not (tmp_path / "s3:").exists()
