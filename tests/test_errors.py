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
    lines = [l for l in result.output.splitlines() if l.strip()]
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
    (["--tokens", "100K"], ["ran out after", "lower --tokens", "removed"]),
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


def test_train_without_a_cache_says_so():
    run_bad(["train", "--config", str(Path(__file__).parent.parent / "pipeline.yaml")],
            "cache: none given; pass --cache CACHE")
