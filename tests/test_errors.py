"""Bad input: one line naming the bad value and the valid choices, exit status 2, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from matryoshka.cache import Cache
from matryoshka.cache.format import STORAGE, encode_chunk
from matryoshka.cache.lock import WriterLock, writer_lock
from matryoshka.cli import app

runner = CliRunner()


def harvest_args(model: Path, corpus: Path, cache: Path, *extra: str) -> list[str]:
    return ["harvest", "--model", str(model), "--dataset", str(corpus), "--sites", "1.resid_mid,1.mlp_out",
            "--tokens", "512", "--context-size", "32", "--batch-size", "4", "--holdout", "128",
            "--chunk-mb", "0.015625", "--cache", str(cache), "--quiet", *extra]


def run_bad(args: list[str], *fragments: str) -> str:
    result = runner.invoke(app, args)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("flags, fragments", [
    (["--model", "no-such-model"], ["'no-such-model'", "gemma-2-2b"]),
    (["--sites", "1.resid_middle"], ["'resid_middle'", "resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post"]),
    (["--sites", "7.resid_mid"], ["layer 7", "layers 0..2"]),
    (["--text-column", "body"], ["'body'", "columns are text"]),
    (["--tokens", "0"], ["'0'", "positive"]),
    (["--tokens", "-5"], ["'-5'"]),
    (["--tokens", "lots"], ["'lots'", "200M"]),
    (["--dtype", "int8"], ["'int8'", "bfloat16, float16, float32"]),
    (["--codec", "gzip"], ["'gzip'", "lz4, zstd, none"]),
    (["--bos", "always"], ["'always'", "context, document, none"]),
    (["--attn-implementation", "flash"], ["attn_implementation: 'flash'", "auto, eager, sdpa, flex_attention"]),
    (["--hub-id", "org/gpt2/main"], ["hub_id: 'org/gpt2/main' is not a Hugging Face Hub id", "owner/name"]),
    (["--hub-id", "org--x/gpt2"], ["hub_id: 'org--x/gpt2' is not a Hugging Face Hub id"]),
    # a Hub name already says where the model comes from; refused before the name is looked up (offline here)
    (["--model", "openai-community/gpt2", "--hub-id", "tiny-org/gpt2"],
     ["hub_id: 'tiny-org/gpt2' is only for a local model directory", "'openai-community/gpt2' is a Hub name"]),
    pytest.param(["--tokens", "100K"], ["ran out after", "lower --tokens", "removed"], marks=pytest.mark.slow),
    (["--tokens", "1T"], ["GB needed", "GB free", "lower --tokens"]),
])
def test_bad_input_writes_nothing(gpt2_dir, corpus, tmp_path, flags, fragments):
    cache = tmp_path / "new" / "cache"
    run_bad(harvest_args(gpt2_dir, corpus, cache) + flags, *fragments)
    assert not (tmp_path / "new").exists()


def test_an_attention_the_model_does_not_offer_writes_nothing(gemma2_dir, corpus, tmp_path):
    """Gemma-2 soft-caps its attention logits, which sdpa cannot: refused before anything is written."""
    run_bad(harvest_args(gemma2_dir, corpus, tmp_path / "new" / "c", "--attn-implementation", "sdpa"),
            "attn_implementation: 'sdpa' is not offered", "(gemma2)", "valid: auto, eager")
    assert not (tmp_path / "new").exists()


def test_a_folder_that_is_not_a_cache_is_not_harvested_into(gpt2_dir, corpus, tmp_path):
    """Else its files would lie among the chunks, and `cache rm` would be asked to delete them too."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "mycode.py").write_text("print('mine')")
    run_bad(harvest_args(gpt2_dir, corpus, project), "is a folder that is not a cache and holds 1 other entry",
            "mycode.py", "new or empty folder")
    assert sorted(p.name for p in project.iterdir()) == ["mycode.py"]
    (project / "mycode.py").unlink()
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, project)).exit_code == 0  # an empty one is fine


@pytest.mark.parametrize("flags, fragment", [
    (["--codec", "zstd"], "is complete with codec 'lz4', not the 'zstd'"),
    (["--holdout", "40%"], "is complete with held-out split [0, 128], not the [0, 224]"),  # 7 of 16 contexts
])
def test_a_complete_cache_refuses_settings_it_was_not_harvested_with(gpt2_dir, corpus, tmp_path, flags, fragment):
    """Codec, chunk size and held-out split are not in the fingerprint: asked for anew, they are refused, not
    silently dropped."""
    cache = tmp_path / "c"
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, cache)).exit_code == 0
    run_bad(harvest_args(gpt2_dir, corpus, cache) + flags, fragment, "harvest to another --cache")


@pytest.mark.parametrize("flags, fragments", [
    (["--writer-threads", "-1"], ["writer_threads: -1"]),
    (["--chunk-mb", "nan"], ["chunk_mb: nan must be a finite number"]),
    (["--device", "foo"], ["device: 'foo' is not a device"]),
    (["--device", "cuda:99"], ["device: 'cuda:99', but torch"]),
])
def test_more_bad_input_is_one_line(gpt2_dir, corpus, tmp_path, flags, fragments):
    run_bad(harvest_args(gpt2_dir, corpus, tmp_path / "c") + flags, *fragments)
    assert not (tmp_path / "c").exists()


def test_unwritable_path(gpt2_dir, corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run_bad(harvest_args(gpt2_dir, corpus, blocker / "cache"), "cannot write to", str(blocker))


def test_missing_dataset_file_and_bad_suffix(gpt2_dir, tmp_path):
    run_bad(harvest_args(gpt2_dir, tmp_path / "nope.txt", tmp_path / "c"), "nope.txt' does not exist")
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    run_bad(harvest_args(gpt2_dir, csv, tmp_path / "c"), "'.csv'", ".txt, .jsonl")


def test_second_writer_is_refused(gpt2_dir, corpus, tmp_path):
    cache = tmp_path / "c"
    cache.mkdir()
    with WriterLock(cache):
        run_bad(harvest_args(gpt2_dir, corpus, cache), "is being written by pid", "one writer per cache")
    assert [p.name for p in cache.iterdir()] == [".writer.lock"]


def test_fingerprint_mismatch_is_refused(gpt2_dir, corpus, tmp_path):
    cache = tmp_path / "c"
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, cache)).exit_code == 0
    before = (cache / "zarr.json").read_bytes()
    msg = run_bad(harvest_args(gpt2_dir, corpus, cache, "--seed", "7"), "holds fingerprint", "choose another --cache")
    assert json.loads(before)["attributes"]["manifest"]["fingerprint"] in msg
    assert (cache / "zarr.json").read_bytes() == before


def test_verify_names_a_damaged_chunk(gpt2_dir, corpus, tmp_path):
    cache = tmp_path / "c"
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, cache)).exit_code == 0
    ok = runner.invoke(app, ["cache", "verify", str(cache), "-q"])
    assert ok.exit_code == 0 and "ok:" in ok.output
    chunk = cache / "acts" / "1.mlp_out" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    (cache / "tokens" / "c" / "1").unlink()
    # a whole, checksummed chunk of another chunking (half the rows): blosc alone would decode it short
    c = Cache(cache)
    rows = np.zeros((c.chunk_tokens // 2, c.manifest["arrays"]["1.mlp_out"]["width"]), STORAGE[c.storage_dtype][0])
    (cache / "acts" / "1.mlp_out" / "c" / "1" / "0").write_bytes(encode_chunk(rows, c.manifest["storage"]["codec"]))
    bad = runner.invoke(app, ["cache", "verify", str(cache), "-q"])
    assert bad.exit_code == 1
    assert "DAMAGED acts/1.mlp_out/c/2/0: unreadable (stored and computed crc32c checksums differ)" in bad.output
    assert "DAMAGED tokens/c/1: missing" in bad.output
    assert f"DAMAGED acts/1.mlp_out/c/1/0: unreadable (the chunk decodes to {rows.nbytes} bytes, not the " \
           f"{2 * rows.nbytes} of a chunk of this array)" in bad.output


def test_non_finite_activations_name_hook_and_tokens(gpt2_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[3] = float("inf")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    for f in gpt2_dir.glob("tokenizer*"):
        (broken / f.name).write_bytes(f.read_bytes())
    result = runner.invoke(app, harvest_args(broken, corpus, tmp_path / "c"))
    assert result.exit_code == 1
    assert "non-finite activations in blocks.1.hook_mlp_out at tokens 0..127 (chunk 0)" in result.output
    assert not (tmp_path / "c").exists()


def test_cache_commands_on_a_non_cache(tmp_path):
    run_bad(["cache", "info", str(tmp_path)], "is not a cache")
    run_bad(["cache", "verify", str(tmp_path / "nope")], "is not a cache")
    run_bad(["cache", "ls", str(tmp_path / "nope")], "does not exist (no cache has been harvested there)")
    (tmp_path / "file").write_text("x")
    run_bad(["cache", "ls", str(tmp_path / "file")], "is not a directory")


def test_cache_ls_and_info(gpt2_dir, corpus, tmp_path):
    root = tmp_path / "root"
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, root / "a" / "one")).exit_code == 0
    ls = runner.invoke(app, ["cache", "ls", str(root)])
    assert ls.exit_code == 0 and "one" in ls.output and "1.resid_mid,1.mlp_out" in ls.output and "complete" in ls.output
    info = runner.invoke(app, ["cache", "info", str(root / "a" / "one")])
    assert info.exit_code == 0
    assert "blocks.1.hook_mlp_out" in info.output and "512 of 512 tokens committed" in info.output


def test_cache_rm_removes_a_cache_and_nothing_else(gpt2_dir, corpus, tmp_path):
    from matryoshka.cache import Cache

    one, two = tmp_path / "root" / "a" / "one", tmp_path / "root" / "a" / "two"
    for c in (one, two):
        assert runner.invoke(app, harvest_args(gpt2_dir, corpus, c)).exit_code == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    run_bad(["cache", "rm", str(notes), "--yes"], "is not a cache")
    assert (notes / "keep.txt").read_text() == "mine"
    run_bad(["cache", "rm", str(one)], "pass --yes to remove", str(one), "512 tokens")  # no terminal to ask on
    with WriterLock(one):  # a harvest, resume or copy writing it
        run_bad(["cache", "rm", str(one), "--yes"], f"cache {one} is being written by pid")
    assert Cache(one).complete
    r = runner.invoke(app, ["cache", "rm", str(one), "--yes"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"removed {one} ({gpt2_dir}, 1.resid_mid,1.mlp_out, 512 tokens, ") and \
        r.output.endswith(" kB, complete)\n")
    assert not one.exists() and Cache(two).complete
    ls = runner.invoke(app, ["cache", "ls", str(tmp_path / "root")])
    assert str(two) in ls.output and str(one) not in ls.output
    # a link to a cache is refused (rmtree would not follow it), and what else a cache folder holds stays
    (tmp_path / "link").symlink_to(two)
    run_bad(["cache", "rm", str(tmp_path / "link"), "--yes"], "is a symbolic link to", str(two))
    assert Cache(two).complete
    (two / "README.txt").write_text("notes on this cache")
    assert not Cache(f"file://{two}").remote and isinstance(writer_lock(f"file://{two}"), WriterLock)  # flock
    assert runner.invoke(app, ["cache", "rm", f"file://{two}", "--yes"]).exit_code == 0  # a file:// URL: local
    assert sorted(p.name for p in two.iterdir()) == ["README.txt"]


def test_usage_errors_are_one_line_too():
    """The console script turns click's framed usage block into one line, exit status 2."""
    import subprocess
    import sys

    for args, fragment in ((["run", "--bogus"], "No such option: --bogus (see `pipeline run --help`)"),
                           (["harvest", "--context-size", "1.5"], "Invalid value for '--context-size'")):
        r = subprocess.run([sys.executable, "-m", "matryoshka.cli", *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr


def test_train_without_a_cache_says_so(tmp_path):
    """A config with no harvest section and no train.cache names no cache (one with a harvest section trains
    on the cache that harvest writes, tests/test_run_writer.py)."""
    config = tmp_path / "train-only.yaml"
    config.write_text("train:\n  runs:\n    - {name: sae, source: 0.resid_mid, width: 64, k: 4}\n")
    run_bad(["train", "--config", str(config)], "cache: none given; pass --cache CACHE")
    train = run_bad(["train", "--config", str(Path(__file__).parent.parent / "pipeline.yaml")], "is not a cache")
    assert "cache/synthetic/" in train  # the harvest section's default path, not harvested yet


# --- issue 17: tracebacks where one line is promised, offline names, fingerprint differences -------------------

REPO = Path(__file__).resolve().parents[1]


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (a lock file's holder record aside): to show nothing was written."""
    return {str(p.relative_to(root)): b"" if p.name == ".writer.lock" else p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tests_run_outside_the_repository(tmp_path):
    """conftest's autouse fixture: a test writing to a relative path writes into its own temporary folder."""
    assert Path.cwd() == tmp_path and not Path.cwd().resolve().is_relative_to(REPO)


@pytest.mark.parametrize("word", ["None", "null", "~", "NULL"])
def test_a_null_written_as_text_is_not_a_folder(gpt2_dir, corpus, tmp_path, word):
    """YAML `cache: None` is the text "None" (an unquoted null or ~ is YAML's null: the default path); it used to
    become a folder named None in the working directory."""
    cfg = tmp_path / "p.yaml"
    cache_text = word if word == "None" else json.dumps(word)
    cfg.write_text(f"harvest:\n  model: {gpt2_dir}\n  dataset: {corpus}\n  cache: {cache_text}\n")
    run_bad(["harvest", "--config", str(cfg), "--quiet"], f"harvest.cache: {word!r} is not a path", "leave cache out")
    run_bad(harvest_args(gpt2_dir, corpus, Path(word)), f"harvest.cache: {word!r} is not a path")
    run_bad(["train", "--cache", "x", "--runs-dir", word], f"train.runs_dir: {word!r} is not a path")
    run_bad(["cache", "copy", str(tmp_path), word], f"cache copy ROOT: {word!r} is not a path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_context_size_above_the_models_positions(gpt2_dir, corpus, tmp_path):
    """The tiny GPT-2 has 256 positions: 512 was an IndexError deep in the forward pass, after the cache was made."""
    run_bad(harvest_args(gpt2_dir, corpus, tmp_path / "c", "--context-size", "512"),
            "context_size: 512 is more than the 256 positions", "--context-size 256 or less")
    assert not (tmp_path / "c").exists()


def test_truncated_weights_and_missing_model_directory(gpt2_dir, corpus, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    weights = broken / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    run_bad(harvest_args(broken, corpus, tmp_path / "c"),
            f"'{weights}' is truncated ({size // 2:,} of the {size:,} bytes",
            "download or save the model again")
    with open(weights, "r+b") as f:
        f.truncate(5)  # not even a header
    run_bad(harvest_args(broken, corpus, tmp_path / "c"), f"'{weights}' is not a readable safetensors file")
    run_bad(harvest_args(tmp_path / "nope", corpus, tmp_path / "c"),
            f"model: '{tmp_path / 'nope'}' is a local path that does not exist", "config.json")
    assert not (tmp_path / "c").exists()


def _damage(cache: Path, how: str) -> None:
    if how == "truncated root":
        meta = cache / "zarr.json"
        meta.write_bytes(meta.read_bytes()[:len(meta.read_bytes()) // 2])
    elif how == "invalid root":
        meta = cache / "zarr.json"
        doc = json.loads(meta.read_text())
        del doc["attributes"]["manifest"]["storage"]
        meta.write_text(json.dumps(doc))
    elif how == "truncated array":
        meta = cache / "acts" / "1.mlp_out" / "zarr.json"
        meta.write_bytes(meta.read_bytes()[:100])
    else:
        (cache / "tokens" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}')


@pytest.mark.parametrize("how, fragment", [
    ("truncated root", "its zarr.json is unreadable (JSONDecodeError"),
    ("invalid root", "its zarr.json manifest lacks storage"),
    ("truncated array", "acts/1.mlp_out/zarr.json is unreadable (JSONDecodeError"),
    ("invalid array", "tokens/zarr.json is not valid zarr metadata"),
])
def test_damaged_metadata_is_one_line_in_every_command(gpt2_dir, corpus, tmp_path, how, fragment):
    cache = tmp_path / "root" / "c"
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, cache)).exit_code == 0
    _damage(cache, how)
    before = files(tmp_path)
    (tmp_path / "t.yaml").write_text(f"train:\n  cache: {cache}\n  runs_dir: {tmp_path / 'runs'}\n"
                                     "  runs:\n    - {name: a, source: 1.mlp_out}\n")
    damaged = f"cache: '{cache}' is damaged: {fragment}"
    for args in (harvest_args(gpt2_dir, corpus, cache), harvest_args(gpt2_dir, corpus, cache, "--resume"),
                 ["cache", "info", str(cache)], ["cache", "verify", str(cache), "-q"],
                 ["cache", "rm", str(cache), "--yes"], ["cache", "copy", str(cache), str(tmp_path / "copies"), "-q"],
                 ["train", "--config", str(tmp_path / "t.yaml"), "-q"],
                 ["evaluate", "--cache", str(cache), "--runs-dir", str(tmp_path / "runs"), "-q"]):
        run_bad(args, damaged, "restore the cache from a copy")
    (tmp_path / "t.yaml").unlink()
    assert files(tmp_path) == before
    ls = runner.invoke(app, ["cache", "ls", str(tmp_path / "root")])
    assert ls.exit_code == 0 and str(cache) in ls.output and f"DAMAGED ({fragment}" in ls.output, ls.output


def test_harvest_into_a_cache_whose_root_metadata_was_deleted(gpt2_dir, corpus, tmp_path):
    """Was a ContainsArrayError traceback, and a cache left at "partial 0%"."""
    cache = tmp_path / "c"
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, cache)).exit_code == 0
    (cache / "zarr.json").unlink()
    before = files(tmp_path)
    run_bad(harvest_args(gpt2_dir, corpus, cache), "holds a cache's arrays but no root zarr.json",
            "nothing was written")
    assert files(tmp_path) == before
    run_bad(["cache", "info", str(cache)], "is damaged: its root zarr.json is missing")
    ls = runner.invoke(app, ["cache", "ls", str(tmp_path)])
    assert ls.exit_code == 0 and "DAMAGED (its root zarr.json is missing" in ls.output, ls.output


def test_fingerprint_mismatch_names_the_settings_that_differ(gpt2_dir, corpus, tmp_path):
    cache = tmp_path / "c"
    assert runner.invoke(app, harvest_args(gpt2_dir, corpus, cache)).exit_code == 0
    msg = run_bad(harvest_args(gpt2_dir, corpus, cache, "--dtype", "float32", "--seed", "7"), "holds fingerprint")
    assert "(dataset.seed: 7 here, 0 in the cache; dtype: float32 here, bfloat16 in the cache)" in msg


def test_hub_names_fail_fast_offline(gpt2_dir, corpus, tmp_path):
    """HF_HUB_OFFLINE (set by conftest): one line saying the name could not be resolved offline, and what to do."""
    run_bad(["models", "gpt2"], "model: 'gpt2' could not be resolved offline (HF_HUB_OFFLINE is set)",
            "give a local model directory")
    run_bad(harvest_args(gpt2_dir, "Skylion007/openwebtext", tmp_path / "c"),
            "dataset: 'Skylion007/openwebtext' could not be resolved offline (HF_HUB_OFFLINE is set)",
            "give a local .txt, .jsonl or .parquet file")
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_no_route_to_the_hub_is_one_line_without_retries(tmp_path):
    """Without HF_HUB_OFFLINE and with no route to the Hub (here: an endpoint whose port nobody listens on),
    huggingface_hub retried for ~25 s, a line per retry; one probe connection now decides, and the name is
    looked up in the local Hugging Face cache only."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    code = ("import time, transformers; t = time.monotonic()\n"
            "from matryoshka.models import model_info\n"
            "try:\n    model_info('gpt2')\n"
            "except Exception as e:\n    print(f'{time.monotonic() - t:.1f}'); print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    seconds, message = r.stdout.splitlines()
    assert "could not be resolved offline (no route to 127.0.0.1)" in message and "local model directory" in message
    assert float(seconds) < 10 and "Retry" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "matryoshka.cli", "models", "gpt2"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: model: 'gpt2' could not be resolved offline (no route to 127.0.0.1)")


def test_models_lists_what_it_can_and_one_line_per_name_it_cannot(gpt2_dir):
    r = runner.invoke(app, ["models", str(gpt2_dir), "gpt2", "./local-dir"])
    assert r.exit_code == 2
    lines = r.output.splitlines()
    assert lines[0].startswith("model") and lines[1].startswith(f"{gpt2_dir} ") and "[64, 128, 256, 576]" in lines[1]
    assert lines[2].startswith("error: model: 'gpt2' could not be resolved offline") and len(lines) == 4
    assert lines[3].startswith("error: model: './local-dir' is a local path that does not exist")
