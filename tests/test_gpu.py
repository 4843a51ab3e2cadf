"""The GPU path against the CPU path it must reproduce. Skipped where CUDA is absent (as in CI): these run
on a lent GPU machine (see docs/benchmarks.md). The reference step and the sparse encoder backward run on
every available device in tests/test_objectives.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from matryoshka.fixtures import write_cache
from matryoshka.train.sparse import batch_topk
from matryoshka.train.trainer import train
from test_reader import cache  # noqa: F401  (the module-scoped reader cache fixture)
from test_train import RUNS, _cfg, _weights, kill_after_first_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would change float32 results in the 4th digit; these tests compare against the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A cache with the test_train runs' arrays, of sparse sums of 512 directions (no LM needed, so this
    file runs where TransformerLens is not installed)."""
    rng = np.random.default_rng(0)
    n, d = 24 * 1024, 64
    dirs = rng.standard_normal((512, d)).astype(np.float32)
    codes = rng.random((n, 512)) < 8 / 512
    x = (codes * rng.exponential(1.0, (n, 512))).astype(np.float32) @ dirs
    y = x @ rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
    tokens = rng.integers(1, 100, n)
    tokens[::128] = 0
    return write_cache(tmp_path_factory.mktemp("g") / "cache", {"1.resid_mid": x, "1.mlp_out": y}, tokens, 128, 8,
                       heldout_seqs=16)


def test_reader_on_the_gpu_serves_the_cpu_stream(cache):  # noqa: F811
    """Blocks uploaded once and gathered on the device: the same rows, in the same order, over epochs,
    with the next two blocks decompressing while one is served."""
    with _reader(cache) as cpu, _reader(cache, device="cuda") as gpu:
        n = 2 * cpu.batches_per_epoch + 3
        assert gpu.mirror and not cpu.mirror
        depth = set()
        for _ in range(n):
            a, b = next(cpu), next(gpu)
            depth.add(len(gpu._loads))
            assert b["src"].device.type == "cuda"
            for name in a:
                assert torch.equal(a[name], b[name].cpu())
        assert max(depth) == 2
        state = gpu.state_dict()
        want = [next(gpu)["src"].cpu() for _ in range(5)]
    with _reader(cache, device="cuda", state=state) as resumed:
        for w in want:
            assert torch.equal(next(resumed)["src"].cpu(), w)


def _reader(cache, device="cpu", **kw):  # noqa: F811
    from matryoshka.cache.reader import ReaderConfig, ShuffledReader

    cfg = ReaderConfig(batch_size=32, buffer_tokens=256)
    return ShuffledReader(["src", "tgt"], str(cache), cfg, device=device, **kw)


def test_float8_rows_dequantize_on_the_gpu_as_on_the_cpu(tmp_path):
    """float8 rows travel to the device as stored bytes and are multiplied by their scale there."""
    from matryoshka.cache.reader import ReaderConfig, ShuffledReader

    n = 64 * 16
    x = np.random.default_rng(0).standard_normal((n, 24)).astype(np.float32) * np.logspace(-2, 2, 24)
    path = write_cache(tmp_path / "f8", {"x": x}, np.ones(n, int), 16, 4, dtype="float8")
    cfg = ReaderConfig(batch_size=32, buffer_tokens=256, exclude_bos=False)
    with ShuffledReader(["x"], str(path), cfg, dtype=torch.float32) as cpu, \
            ShuffledReader(["x"], str(path), cfg, dtype=torch.float32, device="cuda") as gpu:
        for _ in range(2 * cpu.batches_per_epoch):
            assert torch.equal(next(cpu)["x"], next(gpu)["x"].cpu())


def test_batch_topk_on_the_gpu_selects_the_cpu_entries():
    acts = torch.relu(torch.randn(512, 4096, generator=torch.Generator().manual_seed(0)))
    a, b = batch_topk(acts, 16), batch_topk(acts.cuda(), 16)
    assert torch.equal(a.rows, b.rows.cpu()) and torch.equal(a.latents, b.latents.cpu())
    assert torch.equal(a.values, b.values.cpu())


def test_gpu_training_fp32_tracks_the_cpu(harvested, tmp_path):  # noqa: F811
    """Same stream, same init, float32 on both: the first checkpoints agree to float32 rounding. (Later,
    a rounding difference can flip one batch top-k entry at the threshold, so the runs drift apart.)"""
    runs = [{**RUNS[0], "tokens": "2560"}, {**RUNS[1], "tokens": "2560"}]  # 10 steps
    cpu = {p.name: _weights(p)
           for p in train(_cfg(harvested, tmp_path / "cpu", runs=runs, device="cpu"), progress=False)}
    gpu = {p.name: _weights(p) for p in train(_cfg(harvested, tmp_path / "gpu", runs=runs, device="cuda",
                                                   autocast=False), progress=False)}
    for name in cpu:
        for k in cpu[name]:
            torch.testing.assert_close(gpu[name][k], cpu[name][k], rtol=2e-3, atol=2e-4, msg=f"{name} {k}")


def test_gpu_bf16_autocast_training_learns(harvested, tmp_path):  # noqa: F811
    (path, _) = train(_cfg(harvested, tmp_path, runs=RUNS[:2], device="cuda", autocast=True), progress=False)
    lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["fvu"] < min(0.5, 0.7 * lines[0]["fvu"])  # 0.75 -> 0.445 on an H200, as float32 on a CPU
    assert all(v.dtype == torch.float32 for v in _weights(path).values() if v.is_floating_point())  # master weights
    assert np.isfinite([x["loss"] for x in lines]).all()


def test_gpu_harvest_writes_the_cpu_harvest(gpt2_dir, corpus, tmp_path):
    """Activations copied off the GPU without blocking reach the cache whole: the writer waits on an event
    of the tensors' own device (here cuda:0 named explicitly, which the harvest makes current)."""
    from helpers import harvest_config
    from matryoshka.cache import Cache
    from matryoshka.harvest import harvest

    paths = {d: harvest(harvest_config(gpt2_dir, corpus, tmp_path / d, device=d), progress=False)
             for d in ("cpu", "cuda:0")}
    cpu, gpu = Cache(paths["cpu"]), Cache(paths["cuda:0"])
    assert cpu.fingerprint == gpu.fingerprint
    for name in cpu.array_names:
        a, b = cpu.read(name, 0, cpu.tokens_committed), gpu.read(name, 0, gpu.tokens_committed)
        assert np.abs(a).sum() > 0
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)


def test_gpu_training_resumes_after_a_kill(harvested, tmp_path):  # noqa: F811
    """The checkpoint's state is loaded onto the GPU, its CPU generator state included: resuming must put
    that back on the CPU (set_rng_state takes no CUDA tensor)."""
    import os
    import subprocess

    from matryoshka.cache import Cache

    runs = [{**RUNS[0], "tokens": "200K"}]  # 782 steps of 256: the kill lands long before the end
    args = kill_after_first_checkpoint(harvested, tmp_path / "runs", runs, device="cuda")
    done = subprocess.run(args, env=dict(os.environ), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / Cache(harvested).fingerprint / runs[0]["name"]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 782, 5)) + [782]


def test_reconstruction_metrics_of_a_gpu_dictionary_equal_the_cpu_ones(harvested):
    """`reconstruction` reads the held-out rows onto the dictionary's device."""
    from matryoshka.cache import Cache
    from matryoshka.evaluate.metrics import reconstruction
    from matryoshka.train.dictionary import Dictionary

    torch.manual_seed(0)
    dic = Dictionary(64, 64, 128, 4, "matryoshka", [32, 96], transcoder=False, skip=False).eval()
    store = Cache(harvested)
    cpu = reconstruction(dic, store, "1.resid_mid", batch_size=512)
    gpu = reconstruction(dic.cuda(), store, "1.resid_mid", batch_size=512)
    assert gpu.tokens == cpu.tokens and gpu.dead == cpu.dead
    np.testing.assert_allclose(gpu.prefix_fvu, cpu.prefix_fvu, rtol=1e-4)
    np.testing.assert_allclose(gpu.density, cpu.density, atol=1e-3)


def test_gemma2_flex_attention_equals_eager_on_the_gpu(gemma2_dir):
    """Gemma-2's soft-capped, sliding-window attention forced to flex_attention (compiled on CUDA) gives
    every site of every layer within the tolerance the CPU/GPU harvest test allows (rtol = atol = 1e-4: GPU
    kernels sum in other orders than eager's matmuls; the same function otherwise). 64 positions span the
    fixture's 16-token sliding window several times."""
    from matryoshka.config import SITES
    from matryoshka.models import Capture, load_model, model_info

    info = model_info(str(gemma2_dir))
    toks = torch.randint(4, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    sites = [(layer, s) for layer in range(info.n_layers) for s in SITES]
    got = {}
    for impl in ("eager", "flex_attention"):
        model = load_model(info, dtype="float32", device="cuda", progress=False, attn_implementation=impl)
        assert model.config._attn_implementation == impl
        cap = Capture(model, info.arch, sites)
        got[impl] = cap(toks)
        cap.close()
    for key in sites:
        torch.testing.assert_close(got["flex_attention"][key], got["eager"][key], rtol=1e-4, atol=1e-4,
                                   msg=f"{key}: flex_attention differs from eager")
