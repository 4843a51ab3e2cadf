"""`pipeline browse`: the static feature browser, its data checked against a dense encode, and the pages
driven in a real headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import harvest_config
from matryoshka.browse.build import dictionary_data
from matryoshka.browse.family import family
from matryoshka.browse.sample import sample_heldout
from matryoshka.browse.site import bucket
from matryoshka.browse.truth import latent_truth
from matryoshka.cache import Cache
from matryoshka.cache.format import bos_rows
from matryoshka.cli import app
from matryoshka.config import EvaluateConfig, HarvestConfig, TrainConfig
from matryoshka.evaluate.features import Codes
from matryoshka.evaluate.stage import evaluate
from matryoshka.harvest import harvest
from matryoshka.train.dictionary import Dictionary
from matryoshka.train.load import load
from matryoshka.train.trainer import train

RUN = {"name": "mat", "source": "1.resid_mid", "width": 64, "k": 4, "group_sizes": [8, 16, 40], "lr": 0.003,
       "tokens": "3K", "dead_tokens": "1K", "warmup_steps": 2}


def read_data(path: Path):
    """The data a ``browse.put(key, data);`` file carries."""
    text = path.read_text(encoding="utf-8")
    return json.loads(text[text.index(",") + 1:text.rindex(")")])


@pytest.fixture(scope="module")
def built(gpt2_dir, corpus, tmp_path_factory):
    work = tmp_path_factory.mktemp("browse")
    cache = harvest(harvest_config(gpt2_dir, corpus, work / "cache", sites="1.resid_mid", tokens="4K", layers=None),
                    progress=False)
    runs_dir = work / "runs"
    train(TrainConfig(cache=str(cache), runs=[dict(RUN)], runs_dir=str(runs_dir), batch_size=128,
                      buffer_tokens=1024, checkpoint_every=100, log_every=10), progress=False)
    evaluate(EvaluateConfig(cache=str(cache), runs_dir=str(runs_dir), batch_size=256), progress=False)
    res = CliRunner().invoke(app, ["browse", "--cache", str(cache), "--runs-dir", str(runs_dir), "-q"])
    assert res.exit_code == 0, res.output
    index = Path(res.output.strip().splitlines()[-1])
    run = next(runs_dir.glob("*/mat"))
    return {"cache": Cache(str(cache)), "index": index, "site": index.parent, "run": run,
            "meta": read_data(index.parent / "mat" / "data" / "meta.js"),
            "shard": read_data(index.parent / "mat" / "data" / "s" / "00000.js")}


def dense_heldout(built) -> tuple[np.ndarray, np.ndarray, int]:
    """[rows, width] inference activations of every held-out row (BOS rows zeroed), the token ids, the start."""
    c, dic = built["cache"], load(built["run"])
    a, b = c.split["heldout"]
    with torch.no_grad():
        acts = dic.encode(torch.from_numpy(c.read("1.resid_mid", a, b))).numpy()
    ids = np.asarray(c.tokens[a:b])
    acts[bos_rows(c.manifest["bos"], (a + np.arange(b - a)) % c.manifest["context_size"], ids)] = 0
    return acts, ids, a


@pytest.mark.slow
def test_site_layout_next_to_the_report(built):
    site, meta = built["site"], built["meta"]
    assert site == built["run"].parent / "browse" and (built["run"].parent / "report.md").is_file()
    assert (site / "index.html").is_file() and (site / "static" / "browse.js").is_file()
    assert meta["width"] == 64 and meta["bounds"] == [0, 8, 24, 64] and meta["shard"] == 256
    assert meta["tokens"] == built["cache"].split["heldout"][1] - built["cache"].split["heldout"][0]
    html = (site / "index.html").read_text()
    assert 'href="mat/latent.html"' in html and "<svg" in html
    remote = re.compile(r'(?:src|href)\s*=\s*"(?:[a-z]+:)?//|@import|url\((?!#)')  # nothing loaded from the network
    for page in [site / "index.html", site / "static" / "browse.css"] + list((site / "mat").glob("*.html")):
        assert not remote.search(page.read_text()), page
    script = (site / "static" / "browse.js").read_text()
    assert not re.search(r"https?:", script.replace("http://www.w3.org/2000/svg", ""))


@pytest.mark.slow
def test_contexts_and_density_equal_a_dense_encode(built):
    acts, ids, start = dense_heldout(built)
    latents = built["shard"]["latents"]
    strings = built["shard"]["strings"]
    for j, rec in enumerate(latents):
        assert rec["id"] == j and rec["n"] == int((acts[:, j] > 0).sum())
        if not rec["n"]:
            assert rec["top"] == []
            continue
        top = rec["top"][0]
        assert top["v"] == pytest.approx(acts[:, j].max(), rel=1e-4)
        assert acts[top["r"] - start, j] == pytest.approx(acts[:, j].max(), rel=1e-4)
        assert top["a"][top["c"]] == 100 and strings[str(top["t"][top["c"]])]
        assert top["t"][top["c"]] == int(ids[top["r"] - start])
        first = top["r"] - top["c"]  # the window's first row: its shading is the dense activation in percent
        want = np.round(100 * acts[first:first + len(top["a"]), j] / acts[:, j].max()).astype(int)
        assert top["a"] == want.tolist()
        assert [c["v"] for c in rec["top"]] == sorted((c["v"] for c in rec["top"]), reverse=True)


@pytest.mark.slow
def test_parents_follow_dense_coactivation(built):
    acts, _, _ = dense_heldout(built)
    on = acts > 0
    latents, bounds = built["shard"]["latents"], built["meta"]["bounds"]
    assert all(r["parent"] == -1 and r["candidates"] == [] for r in latents[:8])  # group 1: the roots
    checked = 0
    for r in latents[8:]:
        if not r["n"]:
            continue
        share = (on[:, :bounds[r["group"]]] & on[:, [r["id"]]]).sum(0) / r["n"]  # every earlier-group latent
        assert r["candidates"][0][1] == pytest.approx(share.max(), abs=1e-4) if share.max() else not r["candidates"]
        if r["parent"] >= 0:
            checked += 1
            assert share[r["parent"]] == pytest.approx(share.max()) and share.max() >= 0.5
            assert [r["id"], pytest.approx(share.max(), abs=1e-4)] in latents[r["parent"]]["children"]
    assert checked > 0


def test_family_known_answer():
    """Latent 2 (group 2) fires only with latent 0, latent 3 half the time with latent 1, latent 4 alone."""
    acts = np.zeros((8, 5), np.float32)
    acts[[0, 1, 2], 0] = 1
    acts[[0, 1], 2] = 1
    acts[[3, 4], 1] = 1
    acts[[3, 5], 3] = 1
    acts[[6, 7], 4] = 1
    W = torch.eye(5)
    W[2, 0] = 1.0
    f = family(Codes.from_dense(acts), W, [2, 3])
    assert f.parent.tolist() == [-1, -1, 0, 1, -1]
    assert f.share.tolist() == [0, 0, 1, 0.5, 0] and f.cos[2] == pytest.approx(2 ** -0.5)
    assert f.children() == [[2], [3], [], [], []]
    assert f.candidates[4] == [] and f.candidates[2] == [(0, 1.0, pytest.approx(2 ** -0.5))]


def test_search_bucket_is_the_scripts_hash():
    """browse.js computes h = (h * 31 + code point) mod 2^32 the same way."""
    assert bucket("a", 1000) == 97 and bucket("ab", 10 ** 9) == 97 * 31 + 98
    assert bucket("é🙂", 2 ** 32) == (0xE9 * 31 + 0x1F642) % 2 ** 32


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(built, tmp_path):
    run = built["run"]
    bare = tmp_path / "runs" / "fp" / "copy"
    shutil.copytree(run / "checkpoint", bare / "checkpoint")
    res = CliRunner().invoke(app, ["browse", str(bare)])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        f"error: browse: run {str(bare)!r} has no eval.json; evaluate it first: pipeline evaluate {bare}"]
    assert not (bare.parent / "browse").exists()
    res = CliRunner().invoke(app, ["browse", str(tmp_path)])
    assert res.exit_code == 2 and "is not a trained run" in res.output
    res = CliRunner().invoke(app, ["browse", str(run), "--tokens", "0"])
    assert res.exit_code == 2 and res.output.strip() == "error: browse: --tokens 0 must be at least 1"
    res = CliRunner().invoke(app, ["browse", str(run), "--batch-size", "-1"])
    assert res.exit_code == 2 and res.output.strip() == "error: browse: --batch-size -1 must be at least 1"
    res = CliRunner().invoke(app, ["browse", str(run), "--serve", "--port", "70000"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: --port: 70000 is not a port (0 to 65535; 0: any free one)"


def test_synthetic_cache_shows_the_ground_truth(tmp_path):
    """A dictionary equal to the truth: latent i recovers feature i exactly and absorbs no parent."""
    P, C = 3, 2
    F = P * (1 + C)
    cfg = HarvestConfig(source="synthetic", layers=0, sites="resid_mid", tokens=24 * 32, context_size=32,
                        synthetic={"d_model": 16, "n_parents": P, "children": C, "parent_rate": 0.3,
                                   "child_rate": 0.7, "magnitude_std": 0.0, "noise": 0.0},
                        batch_size=4, dtype="float32", holdout=8 * 32, cache=str(tmp_path / "c"), seed=3)
    cache = Cache(harvest(cfg, progress=False))
    truth = np.asarray(cache.group["ground_truth/0.resid_mid"][:], np.float64)
    dic = Dictionary(16, 16, F, 2, "matryoshka", [P, F - P])
    with torch.no_grad():
        dic.W_enc.copy_(torch.from_numpy(np.linalg.pinv(truth)).float())
        dic.W_dec.copy_(torch.from_numpy(truth).float())
        dic.b_dec.zero_()
        dic.threshold.fill_(0.5)
    sample = sample_heldout(dic.eval(), cache, "0.resid_mid", 10 ** 6)
    out = latent_truth(dic.W_dec, cache, "0.resid_mid", sample)
    parent = cache.manifest["synthetic"]["parent"]
    present = cache.read(cache.manifest["synthetic"]["features"], *cache.split["heldout"]) > 0
    for j, t in enumerate(out):
        assert t["feature"] == j and t["cos"] == pytest.approx(1, abs=1e-6) and t["match"]
        assert t["parent"] == parent[j]
        if parent[j] >= 0:
            events = int((present[:, j] & present[:, parent[j]]).sum())
            absorbed = [{"child": j, "parent": parent[j], "rate": 0.0, "events": events}] if events else []
            assert t["absorbed"] == absorbed
    dic.config = {"source": "0.resid_mid", "target": None, "arch": "matryoshka", "k": 2}
    data = dictionary_data(dic, "exact", cache, 10 ** 6)  # the whole run's data: truth beside each latent
    assert data.meta["synthetic"] and [r["truth"] for r in data.latents] == out
    assert "logits" not in data.latents[0]
    assert data.meta["logits"] == "no output tokens: the cache has no language model"
    assert data.meta["tokenizer"].endswith("has no tokenizer")
    assert [r["parent"] for r in data.latents[P:]] == parent[P:]  # each child fires only with its parent


# -- a real browser ---------------------------------------------------------------------------------
def chromium():
    """A headless Chromium driven by selenium, or a skip naming what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    opts = Options()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1500"):
        opts.add_argument(a)
    return webdriver.Chrome(options=opts, service=Service(driver))


@pytest.mark.slow
def test_in_a_real_browser(built):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    meta, shard = built["meta"], built["shard"]
    d = chromium()
    try:
        wait = WebDriverWait(d, 20)
        d.get(built["index"].as_uri())
        assert "mat" in d.find_element(By.ID, "runs").text
        d.find_element(By.CSS_SELECTOR, "a.run-link").click()  # runs page -> the run's first latent
        start = shard["latents"][meta["start"]]
        title = wait.until(EC.presence_of_element_located((By.ID, "latent-title")))
        assert title.text.startswith(f"Latent #{meta['start']}")
        strings = shard["strings"]
        top = start["top"][0]
        first = d.find_element(By.CSS_SELECTOR, "#top-contexts .ctx")
        text = "".join(strings[str(t)] for t in top["t"]).replace("\n", "⏎")
        assert first.text.split(maxsplit=1)[1].strip() == text.strip()
        centre = first.find_element(By.CSS_SELECTOR, ".tok.centre")
        assert centre.text.strip() == strings[str(top["t"][top["c"]])].strip() and "on" in centre.get_attribute("class")
        assert centre.value_of_css_property("background-color") == "rgba(255, 110, 0, 1)"  # 100%: fully shaded
        # a child link: from this latent if it has children, else from the hierarchy's first root with any
        kids = [c for c, _ in start["children"]]
        if kids:
            parent = meta["start"]
            d.find_element(By.CSS_SELECTOR, "#children a.latent-link").click()
        else:
            d.find_element(By.ID, "nav-hierarchy").click()
            node = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#roots > li > details")))
            parent = int(node.find_element(By.XPATH, "..").get_attribute("data-id"))
            node.find_element(By.TAG_NAME, "summary").click()
            kids = [c for c, _ in shard["latents"][parent]["children"]]
            wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#roots details ul a.latent-link"))).click()
        title = wait.until(EC.presence_of_element_located((By.ID, "latent-title")))
        assert title.text.startswith(f"Latent #{kids[0]}") and d.current_url.endswith(f"latent.html?i={kids[0]}")
        assert d.find_element(By.CSS_SELECTOR, "#parent a.latent-link").get_attribute("data-id") == str(parent)
        # search the token the start latent fires on hardest
        token = strings[str(top["t"][top["c"]])].strip()
        box = d.find_element(By.ID, "search-box")
        box.send_keys(token)
        d.find_element(By.ID, "search-go").click()
        hits = wait.until(EC.presence_of_element_located((By.ID, "token-hits")))
        ids = [a.get_attribute("data-id") for a in hits.find_elements(By.CSS_SELECTOR, "a.latent-link")]
        assert str(meta["start"]) in ids
        assert [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        d.quit()


@pytest.mark.slow
def test_serve_serves_the_site_until_interrupted(built):
    """`--serve`: a real `pipeline` process serves the built pages on localhost and stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "matryoshka.cli", "browse", str(built["run"]), "--serve",
                             "--port", "0", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        index = proc.stdout.readline().strip()
        line = proc.stdout.readline().strip()
        assert index == str(built["index"]) and line.startswith("serving http://127.0.0.1:"), (index, line)
        url = line.split()[1]
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200 and b'href="mat/latent.html"' in r.read()
        with urllib.request.urlopen(url.replace("index.html", "mat/data/meta.js"), timeout=10) as r:
            assert r.read().startswith(b'browse.put("meta",')
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
