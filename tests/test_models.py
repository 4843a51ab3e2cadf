"""Capture path: the sites we record are the model's own activations, under TransformerLens's names."""
from __future__ import annotations

import pytest
import torch

from matryoshka.config import SITES, ConfigError
from matryoshka.models import AUTO_ATTENTION, Capture, check_sites, hook_name, load_model, model_info, resolve_attention


def _tokens(n_batch=2, n_ctx=24, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n_batch, n_ctx), generator=g)


def _capture_all(info, model, toks):
    """Every site of every layer, in one forward pass."""
    cap = Capture(model, info.arch, [(layer, s) for layer in range(info.n_layers) for s in SITES])
    try:
        return cap(toks)
    finally:
        cap.close()


@pytest.fixture(scope="module")
def loaded(model_dir):
    """Eager attention: the bridge's own implementation and the plain HF forward these tests compare with."""
    info = model_info(str(model_dir))
    return info, load_model(info, dtype="float32", device="cpu", attn_implementation="eager")


@pytest.fixture(scope="module")
def fastest(model_dir):
    """The implementation a harvest runs by default (``auto``)."""
    info = model_info(str(model_dir))
    return info, load_model(info, dtype="float32", device="cpu")


def test_config_comes_from_the_model(loaded):
    info, _ = loaded
    assert (info.d_model, info.n_layers) == (64, 3)
    assert info.identity.startswith("sha256:")


def test_capture_equals_plain_hf_forward(loaded, model_dir):
    """Every site equals a plain Hugging Face forward of the same weights (no bridge, no processing)."""
    from transformers import AutoModelForCausalLM

    info, model = loaded
    toks = _tokens()
    got = _capture_all(info, model, toks)
    raw = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        hs = raw(toks, output_hidden_states=True).hidden_states
    for layer in range(info.n_layers):
        torch.testing.assert_close(got[(layer, "resid_pre")], hs[layer], rtol=0, atol=0)
        if layer < info.n_layers - 1:  # HF applies the final norm to the last hidden state
            torch.testing.assert_close(got[(layer, "resid_post")], hs[layer + 1], rtol=0, atol=0)


def test_residual_identities(loaded):
    info, model = loaded
    got = _capture_all(info, model, _tokens())
    for layer in range(info.n_layers):
        torch.testing.assert_close(got[(layer, "resid_pre")] + got[(layer, "attn_out")], got[(layer, "resid_mid")])
        torch.testing.assert_close(got[(layer, "resid_mid")] + got[(layer, "mlp_out")], got[(layer, "resid_post")])
    # the true MLP input is the normed residual, not resid_mid
    assert not torch.allclose(got[(1, "mlp_in")], got[(1, "resid_mid")])


def test_hook_names_match_a_fresh_bridge(loaded, model_dir):
    """The TransformerLens names we record point at the same values in the bridge's own cache."""
    from transformer_lens.model_bridge import TransformerBridge

    info, model = loaded
    toks = _tokens()
    got = _capture_all(info, model, toks)
    bridge = TransformerBridge.boot_transformers(str(model_dir), device="cpu", dtype=torch.float32)
    _, cache = bridge.run_with_cache(toks)
    for (layer, s), value in got.items():
        torch.testing.assert_close(value, cache[hook_name(layer, s)], rtol=1e-4, atol=1e-5,
                                   msg=f"{hook_name(layer, s)} differs from the bridge")


def test_forward_stops_after_deepest_site(loaded):
    info, model = loaded
    blocks = model.get_submodule("transformer.h" if info.arch == "gpt2" else "model.layers")
    ran = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    cap = Capture(model, info.arch, [(0, "resid_mid"), (1, "attn_out")])
    out = cap(_tokens())
    cap.close()
    for h in handles:
        h.remove()
    assert ran == [0, 1] and set(out) == {(0, "resid_mid"), (1, "attn_out")}


def test_site_and_model_errors(model_dir, tmp_path):
    info = model_info(str(model_dir))
    with pytest.raises(ConfigError, match=r"layer 3 is out of range; .* has layers 0\.\.2"):
        check_sites(info, [(3, "resid_mid")])
    with pytest.raises(ConfigError, match="'no-such-model' could not be resolved offline .HF_HUB_OFFLINE is set."):
        model_info("no-such-model")
    from transformers import LlamaConfig
    LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                vocab_size=10).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="is a 'llama' model; supported: GPT-2"):
        model_info(str(tmp_path / "llama"))


def test_auto_attention_is_sdpa_for_gpt2_and_eager_for_gemma2(fastest):
    """GPT-2 runs the fused kernel; Gemma-2 (soft-capped logits, sliding windows) stays eager, and the
    installed transformers indeed refuses sdpa for it."""
    info, model = fastest
    want = {"gpt2": "sdpa", "gemma2": "eager"}[info.arch]
    assert model.config._attn_implementation == AUTO_ATTENTION[info.arch] == want
    if info.arch == "gemma2":
        with pytest.raises(ConfigError, match=r"attn_implementation: 'sdpa' is not offered .*; valid: auto, eager"):
            resolve_attention(info, "sdpa")
    with pytest.raises(ConfigError, match="'bogus' is not offered"):
        resolve_attention(info, "bogus")


def test_every_site_under_auto_equals_eager(loaded, fastest):
    """Every site of every layer under the chosen implementation equals eager within float32's tolerance
    (torch.testing's float32 defaults: rtol 1.3e-6, about 10 ulps, atol 1e-5 on values of order 1): the
    implementations compute the same function and differ only in the order of the attention's sums."""
    info, eager = loaded
    _, model = fastest
    toks = _tokens(n_ctx=48)
    got, want = _capture_all(info, model, toks), _capture_all(info, eager, toks)
    assert set(got) == set(want)
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1.3e-6, atol=1e-5, msg=f"{key} differs from eager")


def test_residual_identities_hold_exactly_under_auto(fastest):
    """The adds the block does are the adds of captured values, whatever computes the attention."""
    info, model = fastest
    got = _capture_all(info, model, _tokens())
    for layer in range(info.n_layers):
        assert torch.equal(got[(layer, "resid_pre")] + got[(layer, "attn_out")], got[(layer, "resid_mid")])
        assert torch.equal(got[(layer, "resid_mid")] + got[(layer, "mlp_out")], got[(layer, "resid_post")])
        if layer + 1 < info.n_layers:
            assert torch.equal(got[(layer, "resid_post")], got[(layer + 1, "resid_pre")])
