"""SAELens interop, both ways: exports keep their identity in SAELens; any SAELens folder evaluates on a cache.

The tests that need SAELens itself skip without it here; CI runs this file in a second environment with
SAELens installed (``.ci/run``), where they must not skip. The others read and write the folder format
directly, as the pipeline does, and run everywhere.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import harvest_config
from matryoshka.cache import Cache
from matryoshka.config import ConfigError, TrainConfig
from matryoshka.harvest import harvest
from matryoshka.train.saelens import RAW_ACTIVATIONS, read_saelens
from matryoshka.train.trainer import train

pytestmark = pytest.mark.slow  # every test trains five dictionaries first (module fixture)

RUNS = [  # every architecture we export
    {"name": "mat", "source": "1.resid_mid", "width": 128, "k": 4, "group_sizes": [16, 32, 80], "tokens": "4K"},
    {"name": "btk", "source": "1.mlp_in", "width": 128, "k": 4, "arch": "batchtopk", "tokens": "4K"},
    {"name": "topk", "source": "1.resid_mid", "width": 128, "k": 4, "arch": "topk", "tokens": "4K"},
    {"name": "tc", "source": "1.mlp_in", "target": "1.mlp_out", "width": 128, "k": 4, "arch": "batchtopk",
     "tokens": "4K"},
    {"name": "skip", "source": "1.mlp_in", "target": "1.mlp_out", "width": 128, "k": 4, "arch": "batchtopk",
     "tokens": "4K", "skip": True},
]
HOOKS = {"1.resid_mid": "blocks.1.hook_resid_mid", "1.mlp_in": "blocks.1.mlp.hook_in",
         "1.mlp_out": "blocks.1.hook_mlp_out"}
EVAL = ["--no-features", "--contexts", "0", "--lm-tokens", "96", "--lm-batch-size", "2", "--batch-size", "64", "-q"]


@pytest.fixture(scope="module")
def gpt2(gpt2_dir, tmp_path_factory) -> Path:
    """The tiny GPT-2 with the legacy ``n_ctx`` in its config.json, as the Hub's GPT-2 configs have it:
    TransformerLens 3's HookedTransformer reads it (transformers no longer writes it)."""
    out = tmp_path_factory.mktemp("model") / "tiny-gpt2"
    shutil.copytree(gpt2_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "n_ctx": cfg["n_positions"]}))
    return out


@pytest.fixture(scope="module")
def trained(gpt2, corpus, tmp_path_factory):
    """Runs of every exported architecture on a tiny GPT-2 cache: (cache, runs folder, {name: run dir})."""
    tmp = tmp_path_factory.mktemp("saelens")
    path = harvest(harvest_config(gpt2, corpus, tmp / "cache", sites="1.resid_mid,1.mlp_in,1.mlp_out",
                                  layers=None), progress=False)
    dirs = train(TrainConfig(cache=str(path), runs=RUNS, runs_dir=str(tmp / "runs"), batch_size=128,
                             buffer_tokens=1024, checkpoint_every=100), progress=False)
    return Cache(path), tmp / "runs", {d.name: d for d in dirs}


def _cfg(run: Path) -> dict:
    return json.loads((run / "saelens" / "cfg.json").read_text())


def _heldout(cache: Cache, array: str) -> torch.Tensor:
    """The held-out rows evaluation reads: every one but the BOS rows (position 0 of each context)."""
    a, b = cache.split["heldout"]
    rows = np.arange(a, b)
    return torch.from_numpy(cache.read(array, a, b)[rows % cache.manifest["context_size"] != 0])


def _fvu(y_hat: torch.Tensor, y: torch.Tensor, cache: Cache, array: str) -> float:
    mu = torch.as_tensor(cache.stats(array).mean, dtype=torch.float64)
    return float((y_hat.double() - y.double()).pow(2).sum() / (y.double() - mu).pow(2).sum())


def test_exports_carry_what_saelens_needs_to_rebuild_their_metadata(trained, gpt2, corpus):
    cache, _, dirs = trained
    for name, run in dirs.items():
        cfg, spec = _cfg(run), next(r for r in RUNS if r["name"] == name)
        meta = cfg["metadata"]
        assert meta["sae_lens_version"] == "6.0.0" and meta["sae_lens_training_version"] is None
        assert meta["model_name"] == str(gpt2.resolve())  # resolved, not as typed
        assert meta["dataset_path"] == str(Path(corpus).resolve())
        assert (meta["context_size"], meta["prepend_bos"]) == (32, True)
        assert meta["exclude_special_tokens"] == [cache.manifest["bos"]["token_id"]]
        assert meta["model_from_pretrained_kwargs"] == RAW_ACTIVATIONS
        assert meta["model_from_pretrained_kwargs"]["fold_ln"] is False
        assert meta["hook_name"] == HOOKS[spec["source"]]
        assert meta.get("hook_name_out") == (HOOKS[spec["target"]] if "target" in spec else None)
        assert cfg["normalize_activations"] == "none"
        assert cfg["architecture"] == {"mat": "jumprelu", "btk": "jumprelu", "topk": "topk",
                                       "tc": "jumprelu_transcoder",
                                       "skip": "jumprelu_skip_transcoder"}[name]
        if "target" not in spec:  # SAELens's record of how an SAE saved as jumprelu was trained
            trained = {"mat": "matryoshka_batchtopk", "btk": "batchtopk", "topk": "topk"}[name]
            assert meta["training_architecture"] == trained
            assert meta["training_architecture_details"]["k"] == 4
    assert _cfg(dirs["mat"])["metadata"]["training_architecture_details"]["matryoshka_widths"] == [16, 48, 128]
    assert "matryoshka_widths" not in _cfg(dirs["btk"])["metadata"]["training_architecture_details"]


def test_a_saelens_folder_reads_as_the_run_it_was_exported_from(trained):
    import matryoshka

    cache, _, dirs = trained
    for name, run in dirs.items():
        ours, theirs = matryoshka.load(run), read_saelens(run / "saelens")
        x = _heldout(cache, ours.config["source"])
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=0, atol=0, msg=name)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6, msg=name)
        assert theirs.group_sizes == ours.group_sizes


def _evaluate(cache: Cache, runs: Path, *args: str):
    from typer.testing import CliRunner

    from matryoshka.cli import app

    return CliRunner().invoke(app, ["evaluate", "--cache", cache.path, "--runs-dir", str(runs), *EVAL, *args])


def test_evaluate_sae_gives_an_export_the_metrics_of_its_run(trained):
    cache, runs, dirs = trained
    run = dirs["mat"]
    assert _evaluate(cache, runs, str(run)).exit_code == 0
    out = _evaluate(cache, runs, "--sae", str(run / "saelens"), "--sae", str(dirs["skip"] / "saelens"))
    assert out.exit_code == 0, out.output
    assert "mat-saelens" in out.output and "skip-saelens" in out.output
    mine = json.loads((run / "eval.json").read_text())
    folder = runs / cache.fingerprint
    sae = json.loads((folder / "mat-saelens" / "eval.json").read_text())
    assert sae["config"]["sae"] == str((run / "saelens").resolve()) and sae["config"]["arch"] == "jumprelu"
    for key in ("tokens", "l0", "dead", "dense"):
        assert sae[key] == mine[key], key
    for key in ("fvu", "fvu_seed", "mse", "cosine"):
        assert sae[key] == pytest.approx(mine[key], rel=1e-5), key
    assert sae["prefix_fvu"] == pytest.approx(mine["prefix_fvu"], rel=1e-5)  # the Matryoshka groups came along
    for key in ("ce_clean", "ce_spliced", "kl"):
        assert sae["lm"][key] == pytest.approx(mine["lm"][key], rel=1e-4, abs=1e-7), key
    report = (folder / "report.md").read_text()
    assert "| mat |" in report and "| mat-saelens |" in report and "| skip-saelens |" in report


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["metadata"].update(model_name="gpt2"), "is for model 'gpt2', but cache .* holds "),
    (lambda c: c["metadata"].update(hook_name="blocks.0.hook_resid_mid"),
     "its hook_name 'blocks.0.hook_resid_mid' is not in cache .*; it holds blocks.1.hook_resid_mid, "),
    (lambda c: c["metadata"].update(hook_name_out="blocks.1.hook_resid_post"),
     "its hook_name_out 'blocks.1.hook_resid_post'"),
    (lambda c: c.update(architecture="gated"), "architecture 'gated' is not supported; supported: standard, "),
    (lambda c: c.update(normalize_activations="layer_norm"), "normalize_activations 'layer_norm' is not supported"),
    (lambda c: c.update(d_in=32), r"sae_weights.safetensors: W_enc is \(64, 128\), cfg.json implies \(32, 128\)"),
])
def test_a_sae_that_does_not_fit_the_cache_is_one_line_and_writes_nothing(trained, tmp_path, edit, message):
    import re

    cache, runs, dirs = trained
    bad = tmp_path / "bad"
    shutil.copytree(dirs["tc"] / "saelens", bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    edit(cfg)
    (bad / "cfg.json").write_text(json.dumps(cfg))
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(dirs["btk"] / "saelens"), "--sae", str(bad))
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output
    assert re.search(message, out.output), out.output
    assert not (tmp_path / "runs").exists()  # checked before the first one was evaluated


def test_a_sae_of_another_width_than_its_hook_is_one_line(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    cache, _, dirs = trained
    narrow = tmp_path / "narrow"
    shutil.copytree(dirs["tc"] / "saelens", narrow)
    weights = load_file(narrow / "sae_weights.safetensors")
    save_file({**weights, "W_enc": weights["W_enc"][:32].contiguous()}, narrow / "sae_weights.safetensors")
    cfg = json.loads((narrow / "cfg.json").read_text())
    (narrow / "cfg.json").write_text(json.dumps({**cfg, "d_in": 32}))
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(narrow))
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1, out.output
    assert "its width at 'blocks.1.mlp.hook_in' is 32, but the cache's is 64" in out.output
    assert not (tmp_path / "runs").exists()


def test_evaluate_sae_needs_a_cache_and_distinct_names(trained, tmp_path):
    from typer.testing import CliRunner

    from matryoshka.cli import app

    cache, runs, dirs = trained
    out = CliRunner().invoke(app, ["evaluate", "--runs-dir", str(tmp_path), "--sae", str(dirs["tc"] / "saelens")])
    assert out.exit_code == 2 and "--sae needs --cache" in out.output
    twin = tmp_path / "x" / "tc" / "saelens"
    shutil.copytree(dirs["tc"] / "saelens", twin)
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(dirs["tc"] / "saelens"), "--sae", str(twin))
    assert out.exit_code == 2 and "would both be named 'tc-saelens'" in out.output
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(tmp_path))
    assert out.exit_code == 2 and "is not a SAELens folder" in out.output


# -- with SAELens itself (CI: the second environment; skipped where SAELens is not installed) ------------------

def _sae_lens():
    """SAELens, or a skip; a failure where ``MATRYOSHKA_REQUIRE_SAELENS`` is set (CI's SAELens environment)."""
    if os.environ.get("MATRYOSHKA_REQUIRE_SAELENS"):
        import sae_lens

        return sae_lens
    return pytest.importorskip("sae_lens")


PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
              "refactor_factored_attn_matrices")


def _hooked(model_dir: str, kwargs: dict):
    """``HookedSAETransformer.from_pretrained(model_dir, **kwargs)``, step by step: its name check accepts only
    Hub names, while TransformerLens's config and weight loaders below it accept a local folder."""
    from sae_lens import HookedSAETransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    process = {k: v for k, v in kwargs.items() if k in PROCESSING}
    cfg = loading.get_pretrained_model_config(model_dir, fold_ln=process.get("fold_ln", True), device="cpu",
                                              **{k: v for k, v in kwargs.items() if k not in PROCESSING})
    state = loading.get_pretrained_state_dict(model_dir, cfg, AutoModelForCausalLM.from_pretrained(model_dir))
    model = HookedSAETransformer(cfg, AutoTokenizer.from_pretrained(model_dir))
    model.load_and_process_state_dict(state, **process)
    return model.eval()


def test_exports_load_in_saelens_with_the_metadata_they_wrote(trained):
    sae_lens = _sae_lens()
    import matryoshka

    cache, _, dirs = trained
    for name, run in dirs.items():
        theirs = sae_lens.SAE.load_from_disk(str(run / "saelens"))
        assert theirs.cfg.metadata.to_dict() == _cfg(run)["metadata"], name
        ours = matryoshka.load(run)
        x = _heldout(cache, ours.config["source"])
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-5, msg=name)  # skip included


def test_an_export_attached_the_way_its_metadata_says_sees_the_cached_rows(trained):
    sae_lens = _sae_lens()
    import matryoshka

    cache, _, dirs = trained
    a, b = cache.split["heldout"]
    ctx = cache.manifest["context_size"]
    tokens = torch.from_numpy(np.asarray(cache.tokens[a:b]).astype(np.int64)).view(-1, ctx)
    scored = (torch.arange(b - a) % ctx != 0).view(-1, ctx)  # BOS rows: left out of every FVU
    meta = _cfg(dirs["btk"])["metadata"]
    model = _hooked(meta["model_name"], meta["model_from_pretrained_kwargs"])
    _, clean = model.run_with_cache(tokens)
    for array, hook in HOOKS.items():  # the model as the export says reproduces the cache at every hook
        torch.testing.assert_close(clean[hook].reshape(-1, 64), torch.from_numpy(cache.read(array, a, b)),
                                   rtol=1e-4, atol=1e-5, msg=hook)
    default = _hooked(meta["model_name"], {})  # TransformerLens's default processing does not (it centres the
    _, processed = default.run_with_cache(tokens)  # residual stream; the fixture's LayerNorms are identities)
    hook = "blocks.1.hook_resid_mid"
    assert (processed[hook] - clean[hook]).norm() > 0.1 * clean[hook].norm()
    for name, run in dirs.items():
        sae = sae_lens.SAE.load_from_disk(str(run / "saelens"))
        m = sae.cfg.metadata
        model.add_sae(sae, exclude_special_tokens=m.exclude_special_tokens)
        out_hook = m.hook_name_out or m.hook_name
        _, spliced = model.run_with_cache(tokens)
        model.reset_saes()
        ours = matryoshka.load(run)
        source = ours.config["source"]
        x = spliced[f"{out_hook}.hook_sae_input"][scored]
        torch.testing.assert_close(x, _heldout(cache, source), rtol=1e-4, atol=1e-5, msg=name)
        target = ours.config["target"] or source
        y = clean[out_hook][scored]
        recons = spliced[f"{out_hook}.hook_sae_recons"][scored]
        if ours.W_skip is not None:  # SAELens splices encode-then-decode: a skip transcoder's skip term is dropped
            torch.testing.assert_close(sae(x) - recons, x @ sae.W_skip.T, rtol=1e-4, atol=1e-5)
            recons = recons + x @ sae.W_skip.T
        on_cache = _fvu(ours(_heldout(cache, source)), _heldout(cache, target), cache, target)
        assert _fvu(recons, y, cache, target) == pytest.approx(on_cache, rel=1e-4), name


def _saelens_saved(folder: Path, kind: str, meta: dict) -> Path:
    """A random dictionary of SAELens architecture ``kind`` (d_in 64, width 96), created and saved by SAELens."""
    from sae_lens import saes
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    common = {"d_in": 64, "d_sae": 96, "metadata": SAEMetadata(**meta)}
    tc = {"d_out": 64, "apply_b_dec_to_input": False}
    made = {
        "standard": lambda: saes.StandardSAE(saes.StandardSAEConfig(**common)),
        "topk": lambda: saes.TopKSAE(saes.TopKSAEConfig(k=6, rescale_acts_by_decoder_norm=True, **common)),
        "jumprelu": lambda: saes.JumpReLUSAE(saes.JumpReLUSAEConfig(**common)),
        "batchtopk": lambda: saes.BatchTopKTrainingSAE(saes.BatchTopKTrainingSAEConfig(k=6, **common)),
        "matryoshka": lambda: saes.MatryoshkaBatchTopKTrainingSAE(saes.MatryoshkaBatchTopKTrainingSAEConfig(
            k=6, matryoshka_widths=[16, 48, 96], **common)),
        "transcoder": lambda: saes.Transcoder(saes.TranscoderConfig(**common, **tc)),
        "skip_transcoder": lambda: saes.SkipTranscoder(saes.SkipTranscoderConfig(**common, **tc)),
        "jumprelu_transcoder": lambda: saes.JumpReLUTranscoder(saes.JumpReLUTranscoderConfig(**common, **tc)),
    }[kind]()
    with torch.no_grad():
        for p in made.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for name in ("threshold", "topk_threshold"):
            if hasattr(made, name):
                getattr(made, name).fill_(0.4)
        if hasattr(made, "log_threshold"):
            made.log_threshold.fill_(np.log(0.4))
    if hasattr(made, "save_inference_model"):  # a training SAE: saved as SAELens saves its finished runs
        made.save_inference_model(folder)
    else:
        made.save_model(folder)
    return folder


SAELENS_KINDS = ["standard", "topk", "jumprelu", "batchtopk", "matryoshka", "transcoder", "skip_transcoder",
                 "jumprelu_transcoder"]


@pytest.mark.parametrize("kind", SAELENS_KINDS)
def test_a_dictionary_saelens_saved_evaluates_through_sae_with_saelens_fvu(trained, tmp_path, gpt2, kind):
    sae_lens = _sae_lens()
    cache, _, _ = trained
    transcoder = "transcoder" in kind
    source, target = ("1.mlp_in", "1.mlp_out") if transcoder else ("1.resid_mid", "1.resid_mid")
    meta = {"model_name": str(gpt2), "hook_name": HOOKS[source]}
    if transcoder:
        meta["hook_name_out"] = HOOKS[target]
    folder = _saelens_saved(tmp_path / kind, kind, meta)
    out = _evaluate(cache, tmp_path / "runs", "--sae", str(folder), "--no-lm")
    assert out.exit_code == 0, out.output
    got = json.loads((tmp_path / "runs" / cache.fingerprint / kind / "eval.json").read_text())
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x, y = _heldout(cache, source), _heldout(cache, target)
    with torch.no_grad():
        want, acts = _fvu(theirs(x), y, cache, target), theirs.encode(x)
    assert got["fvu"] == pytest.approx(want, rel=1e-5)
    assert got["l0"] == pytest.approx(float((acts != 0).sum(1).double().mean()), rel=1e-6)
    assert 0 < got["l0"] < 96
    assert got["config"]["arch"] == json.loads((folder / "cfg.json").read_text())["architecture"]
    widths = [16, 48, 96] if kind == "matryoshka" else [96]  # SAELens kept the Matryoshka widths: so did we
    with torch.no_grad():
        skip = theirs(x) - theirs.decode(acts)  # a skip transcoder's skip term (decode leaves it out), else 0
        prefixes = [_fvu(theirs.decode(acts * (torch.arange(96) < w)) + skip, y, cache, target) for w in widths]
    assert got["prefix_fvu"] == pytest.approx(prefixes, rel=1e-5) and got["config"]["group_sizes"] == np.diff(
        [0, *widths]).tolist()


def test_a_pre_6_saelens_config_reads_with_its_top_level_keys(trained, tmp_path):
    """SAELens < 6 wrote hook_point, model_name at the top level and TopK as an activation function."""
    from matryoshka.train.saelens import read_saelens_config

    cache, _, dirs = trained
    old = tmp_path / "old"
    shutil.copytree(dirs["topk"] / "saelens", old)
    cfg = json.loads((old / "cfg.json").read_text())
    meta = cfg.pop("metadata")
    del cfg["architecture"]
    k = cfg.pop("k")
    cfg.update(hook_point=meta["hook_name"], model_name=meta["model_name"], activation_fn_str="topk",
               activation_fn_kwargs={"k": k})
    (old / "cfg.json").write_text(json.dumps(cfg))
    c = read_saelens_config(old)
    assert (c.architecture, c.k, c.hook_name, c.model_name) == ("topk", 4, HOOKS["1.resid_mid"], meta["model_name"])
    x = _heldout(cache, "1.resid_mid")
    torch.testing.assert_close(read_saelens(old).encode(x), read_saelens(dirs["topk"] / "saelens").encode(x))
    del cfg["d_sae"]
    (old / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="cfg.json has no integer d_sae"):
        read_saelens_config(old)
