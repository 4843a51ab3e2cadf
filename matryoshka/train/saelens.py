"""The SAELens 6.x folder format (``cfg.json`` + ``sae_weights.safetensors``), both ways, without SAELens.

Exports write :func:`saelens_metadata` so that SAELens rebuilds the dictionary's identity on load (a
``cfg.json`` without ``sae_lens_version`` is taken for a pre-6.0 config and loses its metadata).
:func:`read_saelens` reads any SAELens folder (one of ours, or one SAELens saved) into a
:class:`SAELensDictionary`: our :class:`~matryoshka.train.dictionary.Dictionary` with the few
generalisations SAELens's inference architectures need, so every evaluation metric runs on it unchanged.
Reading needs only ``json`` and ``safetensors``: it works in an environment without SAELens.

SAELens computes, for every architecture it saves (``standard``, ``topk``, ``jumprelu``, and the
``transcoder`` / ``skip_transcoder`` / ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder`` variants;
BatchTopK and Matryoshka BatchTopK SAEs are saved as ``jumprelu``)::

    pre    = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    acts   = relu(pre)                      standard, transcoders
             relu(pre) * (pre > threshold)  jumprelu (a threshold per latent)
             relu(top k of pre, per row)    topk (pre scaled by |W_dec rows| first when rescale_acts_by_decoder_norm)
    x_hat  = acts @ W_dec + b_dec [+ x @ W_skip.T]
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import ConfigError
from .dictionary import Dictionary

SAELENS_FORMAT = "6.0.0"
"""The SAELens version whose cfg.json format exports follow (>= 6.0: SAELens reads ``metadata`` as written)."""

RAW_ACTIVATIONS = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False,
                   "fold_value_biases": False, "refactor_factored_attn_matrices": False}
"""``HookedTransformer.from_pretrained`` keyword arguments under which its hooks see what the cache holds:
a plain Hugging Face forward, with none of TransformerLens's weight processing."""

ARCHITECTURES: dict[str, tuple[bool, bool, str]] = {  # SAELens architecture: (transcoder, skip, activation)
    "standard": (False, False, "relu"), "jumprelu": (False, False, "jumprelu"), "topk": (False, False, "topk"),
    "transcoder": (True, False, "relu"), "skip_transcoder": (True, True, "relu"),
    "jumprelu_transcoder": (True, False, "jumprelu"), "jumprelu_skip_transcoder": (True, True, "jumprelu"),
}

TRAINING_ARCHITECTURES = {"matryoshka": "matryoshka_batchtopk", "batchtopk": "batchtopk", "topk": "topk"}
"""Our ``arch`` as SAELens names the training architecture (``metadata.training_architecture``)."""


def resolved_path(name: str | None) -> str | None:
    """An existing local path as an absolute path; anything else (a Hub id) as it is."""
    if name is None:
        return None
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def saelens_metadata(cfg: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``metadata`` block of an export of the run ``cfg`` (its config.json) trained on a cache with
    ``manifest``: what SAELens needs to attach the dictionary to the model the activations came from."""
    arrays, bos = manifest.get("arrays", {}), manifest.get("bos", {})
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": manifest.get("model", {}).get("resolved"), "model_class_name": "HookedTransformer",
        "hook_name": arrays.get(cfg["source"], {}).get("hook_name", cfg["source"]), "hook_head_index": None,
        "context_size": manifest.get("context_size"),
        "prepend_bos": bos.get("policy") == "context",
        # training and evaluation leave BOS rows out (the reader's exclude_bos)
        "exclude_special_tokens": [bos["token_id"]] if bos.get("token_id") is not None else False,
        "dataset_path": resolved_path(manifest.get("dataset", {}).get("id")),
        "model_from_pretrained_kwargs": dict(RAW_ACTIVATIONS),
        "matryoshka": {"arch": cfg["arch"], "group_sizes": cfg["group_sizes"], "k": cfg["k"],
                       "objective": cfg["objective"], "source": cfg["source"], "target": cfg["target"]},
    }
    if cfg["transcoder"]:
        meta["hook_name_out"] = arrays.get(cfg["target"], {}).get("hook_name", cfg["target"])
    else:  # where SAELens records how an SAE saved as jumprelu was trained, in its training config's terms
        meta["training_architecture"] = TRAINING_ARCHITECTURES[cfg["arch"]]
        meta["training_architecture_details"] = {"k": cfg["k"]}
        if cfg["arch"] == "matryoshka":  # SAELens's form: cumulative widths
            meta["training_architecture_details"]["matryoshka_widths"] = np.cumsum(cfg["group_sizes"]).tolist()
    return meta


@dataclass(frozen=True)
class SAELensConfig:
    """What evaluation needs from a SAELens ``cfg.json``, checked before any weights are read."""

    folder: Path
    architecture: str
    d_in: int
    d_out: int
    width: int
    k: int | None
    group_sizes: list[int]
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool
    model_name: str | None
    hook_name: str | None
    hook_name_out: str | None

    @property
    def transcoder(self) -> bool:
        return ARCHITECTURES[self.architecture][0]


def _bad(folder: Path, what: str) -> ConfigError:
    return ConfigError(f"sae: {str(folder)!r}: {what}")


def read_saelens_config(folder: str | Path) -> SAELensConfig:
    """Parse and check ``folder/cfg.json`` (SAELens 6.x, or an older one with its keys at the top level)."""
    folder = Path(folder).expanduser()
    cfg = _read_cfg_json(folder)
    meta = {**cfg, **(cfg.get("metadata") or {})}  # SAELens < 6 kept these at the top level
    arch = _architecture(folder, cfg)
    width, d_in = int(cfg["d_sae"]), int(cfg["d_in"])
    widths = (meta.get("training_architecture_details") or {}).get("matryoshka_widths") or [width]
    groups = np.diff([0, *widths]).tolist()
    if widths[-1] != width or min(groups) <= 0:
        raise _bad(folder, f"matryoshka_widths {widths} must increase to d_sae {width}")
    if arch == "topk" and not isinstance(cfg.get("k"), int):
        raise _bad(folder, f"a topk SAE needs an integer k, not {cfg.get('k')!r}")
    hook_out = meta.get("hook_name_out")
    if ARCHITECTURES[arch][0] and hook_out is None:
        raise _bad(folder, f"a {arch} needs metadata.hook_name_out, the hook its output reconstructs")
    c = SAELensConfig(folder, arch, d_in, int(cfg.get("d_out", d_in)), width, cfg["k"] if arch == "topk" else None,
                      groups, bool(cfg.get("apply_b_dec_to_input", not ARCHITECTURES[arch][0])),
                      bool(cfg.get("rescale_acts_by_decoder_norm", False)), meta.get("model_name"),
                      meta.get("hook_name") or meta.get("hook_point"), hook_out)
    _check_weights(c)
    return c


def _read_cfg_json(folder: Path) -> dict[str, Any]:
    """``folder``'s cfg.json, once it is known to be a SAELens folder whose config names its sizes."""
    if not (folder / "cfg.json").is_file() or not (folder / "sae_weights.safetensors").is_file():
        raise _bad(folder, "is not a SAELens folder (it needs cfg.json and sae_weights.safetensors)")
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
    except ValueError as e:
        raise _bad(folder, f"cfg.json is not JSON ({e})") from None
    missing = [key for key in ("d_in", "d_sae") if not isinstance(cfg.get(key), int)]
    if missing:
        raise _bad(folder, f"cfg.json has no integer {' or '.join(missing)}")
    return cfg


def _architecture(folder: Path, cfg: dict[str, Any]) -> str:
    """The SAELens architecture of ``cfg`` (which a pre-6 TopK config gains, with its ``k``), once its
    activations are known to need no normalising or reshaping."""
    legacy_k = (cfg.get("activation_fn_kwargs") or {}).get("k")  # SAELens < 6 said TopK this way
    if "architecture" not in cfg and cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk" and legacy_k:
        cfg.update(architecture="topk", k=legacy_k)
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise _bad(folder, f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise _bad(folder, f"normalize_activations {norm!r} is not supported; supported: 'none' (weights in the "
                           "activations' own units)")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise _bad(folder, f"reshape_activations {cfg['reshape_activations']!r} is not supported; supported: 'none'")
    return arch


def _check_weights(c: SAELensConfig) -> None:
    """The weights file holds the tensors ``c`` implies, in their shapes (its header only: no weights read)."""
    with safe_open(c.folder / "sae_weights.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    for name, shape in _weight_shapes(c).items():
        if shapes.get(name) != shape:
            raise _bad(c.folder, f"sae_weights.safetensors: {name} is {shapes.get(name) or 'missing'}, "
                                 f"cfg.json implies {shape}")


def _weight_shapes(c: SAELensConfig) -> dict[str, tuple[int, ...]]:
    """The tensors a SAELens folder of this config holds, and their shapes (SAELens's layout)."""
    _, skip, activation = ARCHITECTURES[c.architecture]
    shapes = {"W_enc": (c.d_in, c.width), "W_dec": (c.width, c.d_out), "b_dec": (c.d_out,), "b_enc": (c.width,)}
    if activation == "jumprelu":
        shapes["threshold"] = (c.width,)
    if skip:
        shapes["W_skip"] = (c.d_out, c.d_in)
    return shapes


class SAELensDictionary(Dictionary):
    """A SAELens dictionary as a :class:`Dictionary`: a per-latent threshold (0 for ReLU), an encoder bias
    for SAEs too, and the decoder bias subtracted from the input only when ``apply_b_dec_to_input``."""

    def __init__(self, c: SAELensConfig) -> None:
        transcoder, skip, activation = ARCHITECTURES[c.architecture]
        arch = "topk" if activation == "topk" else "matryoshka" if len(c.group_sizes) > 1 else "batchtopk"
        super().__init__(c.d_in, c.d_out, c.width, c.k or 0, arch, c.group_sizes, transcoder=transcoder, skip=skip)
        self.b_enc = torch.nn.Parameter(torch.zeros(c.width))
        self.threshold = torch.zeros(c.width)
        self.apply_b_dec_to_input = c.apply_b_dec_to_input

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec.detach() if self.apply_b_dec_to_input else x


def read_saelens(folder: str | Path | SAELensConfig, device: str | torch.device = "cpu") -> SAELensDictionary:
    """A SAELens folder (or its :class:`SAELensConfig`, read and checked already) as a :class:`SAELensDictionary`
    in eval mode (float32); ``config`` holds its :class:`SAELensConfig` fields."""
    c = folder if isinstance(folder, SAELensConfig) else read_saelens_config(folder)
    weights = {k: v.float() for k, v in load_file(c.folder / "sae_weights.safetensors").items()}
    dic = SAELensDictionary(c)
    with torch.no_grad():
        if c.rescale_acts_by_decoder_norm:  # fold the rescaling: the same latents as SAELens's encode
            norm = weights["W_dec"].norm(dim=-1)
            weights["W_enc"], weights["b_enc"] = weights["W_enc"] * norm, weights["b_enc"] * norm
            weights["W_dec"] = weights["W_dec"] / norm[:, None]
        for name in ("W_enc", "W_dec", "b_dec", "b_enc"):
            getattr(dic, name).copy_(weights[name])
        if "threshold" in _weight_shapes(c):  # relu(pre) * (pre > t) keeps exactly the relu values above max(t, 0)
            dic.threshold.copy_(weights["threshold"].clamp(min=0))
        if dic.W_skip is not None:
            dic.W_skip.copy_(weights["W_skip"].t())
    dic.config = {**{f: getattr(c, f) for f in SAELensConfig.__dataclass_fields__}, "folder": str(c.folder.resolve())}
    return dic.to(device).eval().requires_grad_(False)
