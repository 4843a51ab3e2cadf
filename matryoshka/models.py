"""Language models: loading through TransformerLens's bridge, and capturing sites at full speed.

Loading goes through ``TransformerBridge.boot_transformers`` so that names, revisions, dtypes and
multi-GPU device maps resolve exactly as TransformerLens resolves them. The bridge wraps every
Hugging Face module in a hook-carrying component, which is slower than a raw truncated forward
(docs/benchmarks.md, "Harvest"). So after booting we put the original modules back
(``_unwrap_bridge``) and capture with plain PyTorch forward hooks on them, stopping the forward pass
right after the deepest captured module. The values are the model's own, unprocessed activations:
a cached site equals a plain Hugging Face forward of the same weights on the same tokens, with the same
attention implementation (tests/test_models.py checks this, checks every site under the implementation
``auto`` picks against eager, and checks the TransformerLens hook names we record against a fresh
bridge's ``run_with_cache``).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .hub import offline_hint, offline_reason
from .names import SITES, is_hub_id, looks_like_path

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

HOOK_NAMES = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "attn_out": "blocks.{l}.hook_attn_out",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "mlp_in": "blocks.{l}.mlp.hook_in",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "resid_post": "blocks.{l}.hook_resid_post",
}
"""TransformerLens hook names, recorded in the cache and in exported SAE configs (SAELens's ``hook_name``)."""


def hook_name(layer: int, site: str) -> str:
    return HOOK_NAMES[site].format(l=layer)


# Where each site lives in a Hugging Face block: (submodule path, "in" = its input or "out" = its output).
# Gemma-2 norms the attention and MLP outputs before adding them to the residual stream, so its
# attn_out / mlp_out are the post-norm outputs, and resid_mid is the input of the pre-feedforward norm.
_RECIPES: dict[str, dict] = {
    "gpt2": {
        "blocks": "transformer.h",
        "sites": {
            "resid_pre": ("", "in"), "attn_out": ("attn", "out"), "resid_mid": ("ln_2", "in"),
            "mlp_in": ("mlp", "in"), "mlp_out": ("mlp", "out"), "resid_post": ("", "out"),
        },
    },
    "gemma2": {
        "blocks": "model.layers",
        "sites": {
            "resid_pre": ("", "in"), "attn_out": ("post_attention_layernorm", "out"),
            "resid_mid": ("pre_feedforward_layernorm", "in"), "mlp_in": ("mlp", "in"),
            "mlp_out": ("post_feedforward_layernorm", "out"), "resid_post": ("", "out"),
        },
    },
}
AUTO_ATTENTION = {"gpt2": "sdpa", "gemma2": "eager"}
"""What ``attn_implementation: auto`` runs: the fastest implementation that computes the architecture's own
function on every device. GPT-2's attention is plain causal softmax attention, which ``sdpa`` computes (to
float rounding) without materialising the attention matrix. Gemma-2 soft-caps its attention logits and
alternates sliding-window layers: transformers refuses ``sdpa`` for it (no soft-capping); ``flex_attention``
computes both (measured within 3e-6 of eager in float32 on the tiny test model), but it is compiled per
input shape (about 150 s on a 2-core CPU) and ran slower than eager there afterwards, so ``auto`` keeps
eager and a GPU user may force ``flex_attention``."""

SUPPORTED = {"gpt2": "GPT-2 family (gpt2 ... gpt2-xl)", "gemma2": "Gemma-2 (gemma-2-2b, -9b, -27b)"}

ALIASES = {
    "gpt2-small": "openai-community/gpt2", "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium", "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl", "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b", "gemma-2-27b": "google/gemma-2-27b",
}
"""Short names from the seed's model table. Only names: widths and depths always come from the config."""


def resolve_name(name: str) -> str:
    """A local directory stays as it is; a short name from the seed's table becomes its HF id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return ALIASES.get(name, name)


@dataclass(frozen=True)
class ModelInfo:
    """What the cache needs to know about a model before loading its weights."""

    name: str
    resolved: str
    arch: str
    d_model: int
    n_layers: int
    revision: str | None
    identity: str
    """A hash of the weights for a local directory, else the HF id and resolved commit."""
    attention: tuple[str, ...] = ("eager",)
    """The attention implementations the installed transformers offers for this model class."""
    commit: str | None = None
    """The Hub commit a Hub name resolved to, when the Hub or the local Hugging Face cache says; None for a
    local directory."""
    max_positions: int | None = None
    """The longest context the model's position embeddings cover (its config's n_positions or
    max_position_embeddings); None when the config does not say."""


def model_info(name: str, revision: str | None = None) -> ModelInfo:
    """Read a model's config (cheap: no weights) and check that we can capture its sites.

    A local directory must exist and hold whole weight files; a Hub name is looked up offline (the local
    Hugging Face cache only) when the Hub cannot be reached (:mod:`matryoshka.hub`)."""
    from transformers import AutoConfig

    resolved = resolve_name(name)
    local = Path(resolved).is_dir()
    if not local and looks_like_path(name):
        where = Path(name).expanduser()
        raise ConfigError(f"model: {name!r} " + ("is a file, not a model directory" if where.exists() else
                                                 "is a local path that does not exist") +
                          "; give a directory with config.json (saved with save_pretrained) or a Hugging Face id "
                          f"such as {', '.join(sorted(ALIASES))}")
    offline = None if local else offline_reason()
    try:
        cfg = AutoConfig.from_pretrained(resolved, revision=revision, local_files_only=offline is not None)
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        if offline is not None:
            raise ConfigError(f"model: {name!r} could not be resolved offline ({offline}) and is not in the local "
                              f"Hugging Face cache; {offline_hint('model')} "
                              f"(short names: {', '.join(sorted(ALIASES))})") from None
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise ConfigError(
            f"model: cannot load {name!r} ({type(e).__name__}{': ' + why if why else ''}); give a local directory "
            f"with config.json or a Hugging Face id such as {', '.join(sorted(ALIASES))}") from None
    arch = cfg.model_type
    if arch not in _RECIPES:
        raise ConfigError(f"model: {name!r} is a {arch!r} model; supported: {', '.join(SUPPORTED.values())}")
    if local:
        check_weights(Path(resolved))
    commit = None if local else getattr(cfg, "_commit_hash", None) or _cached_commit(resolved, revision)
    identity = _hash_dir(Path(resolved)) if local else f"{resolved}@{commit or revision or 'main'}"
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    return ModelInfo(name=name, resolved=resolved, arch=arch, d_model=int(cfg.hidden_size),
                     n_layers=int(cfg.num_hidden_layers), revision=revision, identity=identity,
                     attention=_attention_offered(cfg), max_positions=int(positions) if positions else None,
                     commit=commit)


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of a Hub model as the local Hugging Face cache holds it: the snapshot folder of its config.json.
    Offline, transformers reports no commit, and an identity of ``name@main`` would differ from the one the same
    model gets online (``name@<commit>``), giving one model two fingerprints."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a Hub name: no commit to report
        return None
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def _attention_offered(cfg) -> tuple[str, ...]:
    """Eager, plus sdpa and flex attention where the model class declares support for them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    return ("eager", *(impl for impl, flag in (("sdpa", "_supports_sdpa"), ("flex_attention", "_supports_flex_attn"))
                       if getattr(cls, flag, False)))


def resolve_attention(info: ModelInfo, requested: str = "auto") -> str:
    """The attention implementation a model runs: ``auto`` is :data:`AUTO_ATTENTION`'s choice for the
    architecture; a forced one must be offered for this model (one-line ConfigError otherwise)."""
    impl = AUTO_ATTENTION[info.arch] if requested == "auto" else requested
    if impl not in info.attention:
        raise ConfigError(f"attn_implementation: {requested!r} is not offered for {info.name} ({info.arch}) by the "
                          f"installed transformers; valid: auto, {', '.join(info.attention)}")
    return impl


def check_context_size(info: ModelInfo, context_size: int) -> None:
    """A context longer than the model's position embeddings fails deep in the forward pass (an IndexError in
    the embedding lookup): refuse it from the config, before any weights load."""
    if info.max_positions is not None and context_size > info.max_positions:
        raise ConfigError(f"context_size: {context_size} is more than the {info.max_positions} positions "
                          f"{info.name!r} supports (its config); use --context-size {info.max_positions} or less")


def check_weights(path: Path) -> None:
    """Every ``*.safetensors`` file of a local model is whole: its header parses and the file holds every
    byte the header lists. A truncated download otherwise fails inside the loader with a traceback, after the
    cache has been created."""
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(fh.read(n)) if 0 <= n <= size - 8 else None
            except (ValueError, UnicodeDecodeError):
                header = None
        if not isinstance(header, dict):
            raise ConfigError(f"model: {str(f)!r} is not a readable safetensors file (its header is cut short or "
                              f"damaged; the file has {size:,} bytes); download or save the model again")
        end = 8 + n + max((t["data_offsets"][1] for k, t in header.items()
                           if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t), default=0)
        if size < end:
            raise ConfigError(f"model: {str(f)!r} is truncated ({size:,} of the {end:,} bytes its header lists); "
                              "download or save the model again")


def hub_id(local_dir: str | Path) -> str | None:
    """The Hub id a local model directory came from, as its config.json says (``_name_or_path``, written by
    ``save_pretrained``), or None when that is a local path (or missing, or ``local_dir`` is a Hub name): a
    path says nothing to a teammate on another machine. Harvest records it (evaluate/cache_model.py)."""
    try:
        name = json.loads((Path(local_dir) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not is_hub_id(name) or Path(name).exists():
        return None
    return name


def _hash_dir(path: Path) -> str:
    """Content hash of a local model's config and weights, so a team's copies share one fingerprint."""
    return _hash_files(sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin")
                              and not p.name.startswith(("tokenizer", "special_tokens", "generation"))))


def weights_hash(path: str | Path) -> str | None:
    """Content hash of a model folder's weight files (its ``*.safetensors``, names and bytes), None when it has
    none. Unlike the identity of a local directory (:func:`_hash_dir`, its config too), it is the same for
    every copy of the files a Hub model is loaded from, whatever else the folder holds (a tokenizer, a ``.bin``
    copy of the weights, a config rewritten by another transformers). Harvest records it for a model given by
    Hub name, whose identity is its name and commit, so that `evaluate --model` can check a local copy."""
    files = sorted(Path(path).glob("*.safetensors"))
    return _hash_files(files) if files else None


def hub_weights(info: ModelInfo) -> str | None:
    """:func:`weights_hash` of a Hub model's files at its resolved commit, fetched into the local Hugging Face
    cache (where its load finds them next; offline, read from there). None when there are none to hash: the
    Hub has no safetensors for it, or they cannot be fetched (then loading the model says why, next)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(info.resolved, revision=info.commit or info.revision,
                                   allow_patterns=["*.safetensors"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
        return None
    return weights_hash(folder)


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 23):
                h.update(block)
    return "sha256:" + h.hexdigest()


def check_sites(info: ModelInfo, sites: list[tuple[int, str]]) -> None:
    for layer, site in sites:
        if not 0 <= layer < info.n_layers:
            raise ConfigError(f"layers: layer {layer} is out of range; {info.name} has layers 0..{info.n_layers - 1}")
        if site not in SITES:
            raise ConfigError(f"sites: unknown site {site!r}; valid sites are {', '.join(SITES)}")


def load_tokenizer(info: ModelInfo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(info.resolved, revision=info.revision)


def tokenizer_identity(tokenizer) -> dict:
    """What makes two tokenizers the same, wherever they were loaded from (the path is not part of it)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def load_model(info: ModelInfo, *, dtype: str = "float32", device: str | None = None,
               device_map: str | None = None, tokenizer=None, progress: bool = True,
               attn_implementation: str = "auto") -> nn.Module:
    """Boot the model through TransformerLens's bridge, then return the plain HF module tree in eval mode,
    running ``attn_implementation`` (see :func:`resolve_attention`).

    The bridge boots with eager attention (TransformerLens 3.x and 4.x alike: its hooks want attention
    patterns, which we never capture). Attention is dispatched at run time from the config, so after the
    bridge is taken off, ``set_attn_implementation`` switches the plain HF model; the switch is checked,
    never assumed."""
    impl = resolve_attention(info, attn_implementation)
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    if not progress:
        transformers.utils.logging.disable_progress_bar()

    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = dict(dtype=TORCH_DTYPES[dtype], revision=info.revision, tokenizer=tokenizer)
    if device_map is not None:
        kwargs["device_map"] = device_map
    else:
        kwargs["device"] = device
    bridge = TransformerBridge.boot_transformers(info.resolved, **kwargs)
    hf = bridge.original_model
    _unwrap_bridge(hf)
    if hf.config._attn_implementation != impl:
        if hasattr(hf, "set_attn_implementation"):
            hf.set_attn_implementation(impl)  # checks that the class offers it
        else:  # transformers before the public switch: the attention modules read the config at run time
            hf.config._attn_implementation = impl
    if hf.config._attn_implementation != impl:
        raise RuntimeError(f"attn_implementation: the model runs {hf.config._attn_implementation!r} after asking "
                           f"transformers for {impl!r}")
    hf.eval()
    hf.requires_grad_(False)
    return hf


def _unwrap_bridge(module: nn.Module) -> None:
    """Replace every bridge component by the Hugging Face module it wraps, recursively."""
    for name, child in list(module.named_children()):
        inner = child
        while isinstance(getattr(inner, "_original_component", None), nn.Module):
            inner = inner._original_component
        if inner is not child:
            setattr(module, name, inner)
        _unwrap_bridge(inner)


def input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


class _StopForward(Exception):
    """Raised by the deepest capture hook: the layers after it are never run."""


SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Called with a site's value [batch, seq, d] where the block computes it; a returned tensor replaces it."""


def hook_site(model: nn.Module, arch: str, layer: int, site: str, fn: SiteFn) -> list:
    """Hook one site of an HF model: the one mechanism behind capturing (``fn`` returns None) and
    splicing (``fn`` returns the replacement, which everything downstream then sees).

    resid_mid is the input of the pre-MLP norm, but the block also carries it, as a plain local
    variable, to its final residual add (``resid_post = resid_mid + mlp_out``), which no hook sees. So a
    replaced resid_mid also redoes that add at the block's output with the replacement, exactly as the
    block would have computed it. Returns the hook handles (``.remove()`` them when done).
    """
    recipe = _RECIPES[arch]
    block = model.get_submodule(recipe["blocks"])[layer]
    path, where = recipe["sites"][site]
    mod = block.get_submodule(path) if path else block
    state: dict[str, torch.Tensor] = {}  # a replaced resid_mid and the MLP branch added to it
    if site == "resid_mid":
        inner = fn

        def fn(t: torch.Tensor) -> torch.Tensor | None:  # records the replacement
            r = inner(t)
            if r is not None:
                state["x"] = r
            return r

    if where == "in":
        def pre(m, args, kwargs):
            r = fn(args[0] if args else kwargs["hidden_states"])
            if r is None:
                return None
            return ((r, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": r})
        handles = [mod.register_forward_pre_hook(pre, with_kwargs=True)]
    else:
        def post(m, args, out):
            r = fn(out[0] if isinstance(out, tuple) else out)
            if r is None:
                return None
            return (r, *out[1:]) if isinstance(out, tuple) else r
        handles = [mod.register_forward_hook(post)]
    if site == "resid_mid":
        def keep_branch(t: torch.Tensor) -> None:
            if "x" in state:
                state["branch"] = t

        handles += hook_site(model, arch, layer, "mlp_out", keep_branch)
        handles += hook_site(model, arch, layer, "resid_post",
                             lambda t: state.pop("x") + state.pop("branch") if "x" in state else None)
    return handles


class Capture:
    """Forward hooks that capture sites of an HF model and cut the forward short after the last one.

    ``capture(tokens)`` returns ``{(layer, site): tensor [batch, seq, d_model]}`` in the model's dtype.
    A ``transform`` applied inside the hook (e.g. a cast to the storage dtype) avoids keeping
    model-dtype copies of every site alive until the end of the pass.
    """

    def __init__(self, model: nn.Module, arch: str, sites: list[tuple[int, str]],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model
        self.sites = list(sites)
        self._out: dict[tuple[int, str], torch.Tensor] = {}
        self._handles = []
        last = max(self.sites, key=lambda ls: (ls[0], SITES.index(ls[1])))
        transform = transform or (lambda t: t)
        for layer, site in self.sites:
            def store(t: torch.Tensor, key=(layer, site), stop=(layer, site) == last) -> None:
                self._out[key] = transform(t.detach())
                if stop:
                    raise _StopForward
            self._handles += hook_site(model, arch, layer, site, store)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
        self._out = {}
        try:
            self.model(input_ids=tokens.to(input_device(self.model)), use_cache=False)
        except _StopForward:
            pass
        out, self._out = self._out, {}
        missing = [k for k in self.sites if k not in out]
        if missing:
            raise RuntimeError(f"sites {missing} were not reached by the forward pass")
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

