"""Typed configuration for every stage, and pipeline.yaml loading.

Every CLI flag is a key of the YAML section of its stage (``--context-size`` is ``context_size``),
so a command line and a config file describe the same run. Validation happens here, before any
model is loaded or any byte is written, and every error names the bad key or value and the valid
choices.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad user input. The CLI prints it as one line and exits with status 2."""


SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
"""Capturable sites in the order a block computes them. ``mlp_in`` is the true MLP input
(after ``ln2``, or Gemma-2's pre-feedforward norm), which differs from ``resid_mid``."""

STORAGE_DTYPES = ("bfloat16", "float16", "float32", "float8")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex_attention")
CODECS = ("lz4", "zstd", "none")
BOS_POLICIES = ("context", "document", "none")

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}


def parse_count(value: int | str, name: str = "tokens") -> int:
    """Parse ``200M``, ``1.5B``, ``64K`` or ``4096`` into a positive integer."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a count; use e.g. 4096, 64K, 200M or 1.5B")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGBTkmgbt]?)\s*", str(value))
        if not m:
            raise ConfigError(f"{name}: {value!r} is not a count; use e.g. 4096, 64K, 200M or 1.5B")
        n = int(round(float(m.group(1)) * _SUFFIXES[m.group(2).upper()]))
    if n <= 0:
        raise ConfigError(f"{name}: {value!r} must be positive")
    return n


def parse_sites(sites: str | list[str], layers: str | list[int] | int | None) -> list[tuple[int, str]]:
    """Turn ``--layers 6,8 --sites resid_mid,mlp_out`` or ``--sites 8.resid_mid,9.mlp_out`` into
    a sorted list of (layer, site) in the order the model computes them."""
    items = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites) if str(s).strip()]
    if not items:
        raise ConfigError(f"sites: none given; choose from {', '.join(SITES)}")
    if layers is None or layers == "" or layers == []:
        layer_list: list[int] = []
    elif isinstance(layers, int):
        layer_list = [layers]
    else:
        raw = layers.split(",") if isinstance(layers, str) else layers
        try:
            layer_list = [int(str(x).strip()) for x in raw if str(x).strip()]
        except ValueError:
            raise ConfigError(f"layers: {layers!r} is not a comma-separated list of integers") from None
    out: set[tuple[int, str]] = set()
    for item in items:
        if "." in item:
            layer_s, site = item.split(".", 1)
            try:
                layer_ids = [int(layer_s)]
            except ValueError:
                raise ConfigError(f"sites: {item!r} is not LAYER.SITE (e.g. 8.resid_mid)") from None
        else:
            site = item
            if not layer_list:
                raise ConfigError(f"sites: {item!r} has no layer; pass --layers or write it as LAYER.{item}")
            layer_ids = layer_list
        if site not in SITES:
            raise ConfigError(f"sites: unknown site {site!r}; valid sites are {', '.join(SITES)}")
        for layer in layer_ids:
            if layer < 0:
                raise ConfigError(f"layers: {layer} is negative")
            out.add((layer, site))
    return sorted(out, key=lambda ls: (ls[0], SITES.index(ls[1])))


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4): shard index (from 0) and shard count."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"shard: {text!r} is not I/N with 0 <= I < N (e.g. 0/2 and 1/2 for two workers)")
    return int(m.group(1)), int(m.group(2))


def site_name(layer: int, site: str) -> str:
    """The array name of a captured site inside a cache: ``8.resid_mid``."""
    return f"{layer}.{site}"


def opt(default: Any, help: str) -> Any:
    """A config field with its help text, shown by the CLI and docs/configuration.md (generated from it)."""
    return field(default=default, metadata={"help": help})


def _positive_ints(config: Any, *names: str) -> None:
    """Every named field of ``config`` must be a positive integer (YAML booleans are not integers)."""
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name}: {v!r} must be a positive integer")


def _finite(config: Any) -> None:
    """No float field of ``config`` may be nan or infinite (YAML's .nan and .inf pass every comparison
    that tests a range, and then fail deep inside a run)."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}: {v!r} must be a finite number")


def check_device(name: str | None) -> None:
    """``device`` must name a device torch knows and this machine has: one line, not torch's traceback."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count or (device.index or 0) >= count:
            raise ConfigError(f"device: {name!r}, but torch {torch.__version__} sees {count} CUDA device(s) on this "
                              "machine; use cpu" + (f" or cuda:0..{count - 1}" if count else ""))
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r}, but this machine has no MPS device; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device: {name!r} is not supported; use cpu, cuda or cuda:N")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


SOURCES = ("model", "synthetic")


@dataclass
class SyntheticConfig:
    """``harvest.synthetic``: activations built from a known dictionary of hierarchical sparse features,
    so that evaluation can score dictionaries against the truth (see ``matryoshka/harvest/synthetic.py``).
    A nested mapping rather than flat harvest keys: these settings mean nothing to a model harvest, and a
    nested mapping keeps them apart and names each one by its path (``harvest.synthetic.n_parents``)."""

    d_model: int = opt(64, "Width of the source array x (the first site).")
    d_target: int = opt(0, "Width of the target array (the second site, if any); 0 means d_model.")
    n_parents: int = opt(16, "Parent features.")
    children: int = opt(4, "Child features per parent.")
    parent_rate: float = opt(0.08, "Probability that a parent fires on a token (independently of the others).")
    child_rate: float = opt(0.8, "Probability that, when a parent fires, one of its children fires too (which one is "
                                 "uniform; siblings never fire together, a child never fires without its parent).")
    magnitude_std: float = opt(0.15, "A firing feature's magnitude is 1 + magnitude_std * N(0, 1), at least 0.1.")
    noise: float = opt(0.01, "Standard deviation of the Gaussian noise added to every coordinate of x.")
    target_noise: float = opt(0.01, "Standard deviation of the Gaussian noise added to every coordinate of the target.")

    def __post_init__(self) -> None:
        _finite(self)
        _positive_ints(self, "d_model", "n_parents", "children")
        if not isinstance(self.d_target, int) or isinstance(self.d_target, bool) or self.d_target < 0:
            raise ConfigError(f"d_target: {self.d_target!r} must be 0 (d_model) or a positive integer")
        for name, low, high in (("parent_rate", 0, 1), ("child_rate", 0, 1)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not low < v <= high:
                raise ConfigError(f"{name}: {v!r} must be a probability in ({low}, {high}]")
        for name in ("magnitude_std", "noise", "target_noise"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name}: {v!r} must be a number >= 0")

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children)


MODEL_ONLY = ("model", "revision", "dataset", "dataset_config", "dataset_split", "dataset_revision", "text_column",
              "token_column", "model_dtype", "device_map", "shuffle_buffer", "attn_implementation")
"""Harvest keys of the language-model source only."""


@dataclass
class HarvestConfig:
    """What `pipeline harvest` captures, from which model and text, and how it is stored."""

    source: str = opt("model", "``model``: run the LM; ``synthetic``: generate activations with a known ground truth "
                               "(settings in ``synthetic``; no model, dataset or tokenizer is used).")
    synthetic: SyntheticConfig | str | None = opt(None, "``source: synthetic`` settings, a mapping "
                                                        "(docs/synthetic.md); on the command line a YAML mapping that replaces the config's.")
    model: str = opt("gpt2", 'HF model name (``gpt2``, ``google/gemma-2-2b``) or a local directory saved with save_pretrained.')
    revision: str | None = opt(None, "Model revision (branch, tag or commit) on the Hub.")
    dataset: str = opt("Skylion007/openwebtext", 'HF dataset name (streamed) or a local .txt (one document per line), .jsonl or .parquet file.')
    dataset_config: str | None = opt(None, "Dataset configuration (subset) name on the Hub.")
    dataset_split: str = opt("train", "Dataset split to stream.")
    dataset_revision: str | None = opt(None, "Dataset revision on the Hub.")
    text_column: str = opt("text", "Column holding the documents' text.")
    token_column: str | None = opt(None, 'Read pre-tokenized ids from this column instead of tokenizing ``text_column``.')
    layers: str | list[int] | int | None = opt(8, "Layers for sites given without one: 8 or 6,8.")
    sites: str | list[str] = opt("resid_mid,mlp_out", "Sites to capture: resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post, or LAYER.SITE.")
    tokens: int | str = opt("10M", "Tokens to harvest (suffixes K, M, B), rounded up to whole contexts.")
    context_size: int = opt(128, "Tokens per context (sequence).")
    batch_size: int = opt(32, 'Sequences per LM forward pass.')
    dtype: str = opt("bfloat16", 'Storage dtype of the cache: bfloat16, float16, float32, or float8 (e4m3 scaled per row: half of bf16).')
    model_dtype: str = opt("float32", 'Dtype the LM computes in (bfloat16 is the usual choice for Gemma-2 on a GPU).')
    attn_implementation: str = opt("auto", "Attention implementation the LM runs: ``auto`` (the fastest exact one: "
                                           "sdpa for GPT-2, eager for Gemma-2), eager, sdpa or flex_attention. "
                                           "Part of the cache's identity.")
    device: str | None = opt(None, "Device for the LM (default: cuda if available, else cpu).")
    device_map: str | None = opt(None, 'Spread a model too big for one GPU over several (``auto``), through the TransformerLens bridge.')
    cache: str | None = opt(None, 'Where the store goes; default ``cache/<model>/<fingerprint>``.')
    cache_root: str = opt("cache", "Root of default cache paths.")
    resume: bool = opt(False, "Continue an unfinished harvest of the same config.")
    break_lock: bool = opt(False, "Take over the stale writer lock of a dead writer on object storage (a live lock is never broken).")
    shard: str | None = opt(None, 'Write only shard ``I/N`` of the cache (workers on separate machines, same ``cache``); under torchrun the rank and world size are used.')
    codec: str = opt("lz4", "Compression: lz4 (blosc lz4 + bitshuffle), zstd (blosc zstd-1 + bitshuffle) or none.")
    chunk_mb: float = opt(4.0, 'Target uncompressed chunk size of the widest array, in MiB.')
    holdout: int | str = opt("1%", 'Held-out split: the first sequences of the cache, as tokens (``100K``) or a percentage; '
                                   'whole chunks, at most 10 % more than asked (smaller chunks where needed).')
    seed: int | None = opt(0, "Document-order seed (a streaming shuffle buffer); ``null`` keeps the dataset's order. "
                              "For the synthetic source, the generator's seed.")
    shuffle_buffer: int = opt(10_000, "Documents in the seeded streaming shuffle buffer.")
    bos: str = opt("context", '``context``: every context starts with BOS; ``document``: every document does; ``none``.')
    writer_threads: int = opt(0, 'Compression/write threads; 0 means one per CPU core this process may use (its affinity and cgroup quota).')

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens, "tokens")
        _positive_ints(self, "context_size", "batch_size", "shuffle_buffer")
        if self.context_size < 2:
            raise ConfigError(f"context_size: {self.context_size} must be at least 2")
        if not isinstance(self.chunk_mb, (int, float)) or isinstance(self.chunk_mb, bool) or self.chunk_mb <= 0:
            raise ConfigError(f"chunk_mb: {self.chunk_mb!r} must be a positive number")
        _finite(self)
        if not isinstance(self.writer_threads, int) or isinstance(self.writer_threads, bool) or self.writer_threads < 0:
            raise ConfigError(f"writer_threads: {self.writer_threads!r} must be 0 (one per usable core) or a positive "
                              "integer")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise ConfigError(f"seed: {self.seed!r} must be a non-negative integer (or null: the dataset's order)")
        _choice("dtype", self.dtype, STORAGE_DTYPES)
        _choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        _choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        _choice("codec", self.codec, CODECS)
        _choice("bos", self.bos, BOS_POLICIES)
        self.site_list = parse_sites(self.sites, self.layers)
        if self.shard is not None:
            parse_shard(self.shard)
        _choice("source", self.source, SOURCES)
        if self.source == "synthetic":
            self._synthetic_settings()
        elif self.synthetic is not None:
            raise ConfigError("synthetic: settings given but source is 'model'; set source: synthetic or drop them")

    def _synthetic_settings(self) -> None:
        """Validate ``synthetic`` (a mapping, or YAML text from the command line) and what it needs."""
        s = self.synthetic
        if isinstance(s, str):
            try:
                s = yaml.safe_load(s)
            except yaml.YAMLError:
                raise ConfigError(f"synthetic: {s!r} is not a YAML mapping (e.g. '{{n_parents: 32}}')") from None
        if not isinstance(s, SyntheticConfig):
            s = from_dict(SyntheticConfig, s or {}, "synthetic")
        self.synthetic = s
        for f in dataclasses.fields(self):  # a model's settings would be silently ignored
            if f.name in MODEL_ONLY and getattr(self, f.name) != f.default:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} means nothing to source: synthetic (no model "
                                  f"or dataset); set source: model, or drop {f.name}")
        if len(self.site_list) > 2:
            raise ConfigError(f"sites: the synthetic source writes one array (x) and optionally a second (the "
                              f"target); {len(self.site_list)} sites were given")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed: {self.seed!r}; the synthetic source needs an integer seed (its generator's)")

    @property
    def n_sequences(self) -> int:
        """Whole contexts to harvest: ``tokens`` rounded up to a multiple of ``context_size``."""
        return -(-int(self.tokens) // self.context_size)

    def holdout_sequences(self, seqs_per_chunk: int) -> int:
        """Held-out sequences, rounded up to whole chunks, at least one chunk, and leaving a train split."""
        h = self.holdout
        if isinstance(h, str) and h.strip().endswith("%"):
            try:
                frac = float(h.strip()[:-1]) / 100
            except ValueError:
                raise ConfigError(f"holdout: {h!r} is not a percentage or a token count") from None
            if not 0 < frac < 1:
                raise ConfigError(f"holdout: {h!r} must be between 0% and 100%")
            seqs = frac * self.n_sequences
        else:
            seqs = parse_count(h, "holdout") / self.context_size
        # up, not down: 4.5 sequences need a fifth; the tolerance keeps 29 % of 100 (28.999...) at 29
        chunks = max(1, math.ceil(seqs / seqs_per_chunk - 1e-9))
        held = chunks * seqs_per_chunk
        if held >= self.n_sequences:
            raise ConfigError(
                f"holdout: {h!r} leaves no training data ({held} held-out sequences of {self.n_sequences}); "
                "raise --tokens or lower --holdout")
        return held

    def holdout_layout(self, seqs_per_chunk: int) -> tuple[int, int]:
        """``(seqs_per_chunk, held-out sequences)``: the held-out split as asked, rounded up to whole
        contexts, and the chunk size that makes it whole chunks.

        The held-out split is whole chunks (the reader serves a split chunk by chunk), so with the planned
        chunk size a small request grew to a whole chunk: 1 % of a small cache held out 16 % of it. Instead
        the chunks shrink, for the whole cache, to the largest size whose whole chunks hold out at most
        :data:`HOLDOUT_TOLERANCE` more than asked (one context per chunk always fits exactly). A percentage
        asks for at most ``1 / percentage`` small chunks; only a tiny absolute held-out split on a large
        cache makes many small chunks, and harvest says what it chose."""
        asked = self.holdout_sequences(1)
        for spc in range(seqs_per_chunk, 0, -1):
            held = self.holdout_sequences(spc)
            if held - asked <= HOLDOUT_TOLERANCE * asked:
                return spc, held
        raise AssertionError("one sequence per chunk holds out exactly what was asked")


HOLDOUT_TOLERANCE = 0.1
"""How much more than asked (a fraction of the request, in whole contexts) the held-out split may hold."""


PATH_KEYS = ("model", "dataset", "cache", "cache_root", "runs_dir", "run", "local_cache_dir")
"""Keys whose value is a path (or a Hub name): the text ``None`` there is a mistyped null, not a folder name."""

NULL_WORDS = ("none", "null", "~")


def check_path(value: Any, key: str, where: str = "", optional: bool = True) -> None:
    """Refuse ``None``, ``null`` or ``~`` given as text for a path (``where`` prefixes the key in the message):
    YAML ``cache: None`` (or a quoted null) is the string "None", which would otherwise become a folder named
    None beside the user's files."""
    if isinstance(value, str) and value.strip().lower() in NULL_WORDS:
        tip = f", or leave {key} out (or write {key}: null, unquoted) for its default" if optional else ""
        raise ConfigError(f"{where}{key}: {value!r} is not a path (a null written as text); give a folder, URL or "
                          f"name{tip}")


def looks_like_path(name: str) -> bool:
    """Whether a model name is meant as a local directory rather than a Hub id: it exists as one, starts like a
    path (``/``, ``.``, ``~``), or has more than the one ``/`` of ``namespace/repo``."""
    return Path(name).expanduser().is_dir() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def from_dict(cls: type, data: dict[str, Any], path: str) -> Any:
    """Build a config dataclass from a YAML mapping, naming unknown keys and wrong types by path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key; valid keys are {', '.join(sorted(names))}")
    for key in PATH_KEYS:
        if key in data:
            check_path(data[key], key, f"{path}.")
    try:
        built = cls(**data)
    except ConfigError as e:  # the dataclass's own check, unless a YAML type was wrong (that says more)
        _check_types(cls, data, path)
        raise ConfigError(str(e) if str(e).startswith(f"{path}.") else f"{path}.{e}") from None
    except (TypeError, ValueError, AttributeError) as e:
        _check_types(cls, data, path)
        raise ConfigError(f"{path}: {e}") from None
    _check_types(cls, data, path)
    return built


def _check_types(cls: type, data: dict[str, Any], path: str) -> None:
    """Name the first value whose YAML type does not fit its field (``width: big``)."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not _fits(value, hints[key]):
            raise ConfigError(f"{path}.{key}: {value!r} is a {type(value).__name__}; expected {_type_name(hints[key])}")


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    return True  # a type this check does not know: the dataclass validates it


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    names = {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


ARCHS = ("matryoshka", "batchtopk", "topk")
OBJECTIVES = ("default", "reference")


@dataclass
class RunConfig:
    """One dictionary to train: an SAE (no ``target``) or a transcoder (``target`` is another array)."""

    name: str = opt("", "Run name: the folder under runs/<cache fingerprint>/.")
    source: str = opt("", "Cache array the dictionary reads, e.g. 8.resid_mid.")
    target: str | None = opt(None, "Cache array it reconstructs (a transcoder); none for an SAE.")
    arch: str = opt("matryoshka", "matryoshka (BatchTopK with nested groups), batchtopk or topk.")
    width: int = opt(0, "Latents; 0 means 16x the source width (the seed's default).")
    group_sizes: list[int] | None = opt(None, "Matryoshka groups; none means the seed's [1x, 2x, 4x, 9x] of width/16.")
    k: int = opt(0, "Active latents per token; 0 means width / 200 (the seed's suggestion).")
    objective: str = opt("default", "default (the seed's method with its faults fixed) or reference (the seed, exactly; matryoshka or batchtopk).")
    lr: float = opt(3e-4, "Adam learning rate.")
    tokens: int | str = opt("10M", "Training tokens.")
    skip: bool = opt(False, "A transcoder's linear skip connection.")
    aux_penalty: float = opt(1 / 32, "Weight of the dead-latent auxiliary loss.")
    dead_tokens: int | str = opt(0, "default objective: a latent is dead after this many tokens without firing; 0 means a tenth of `tokens`, at most 10M.")
    warmup_steps: int = opt(100, "default objective: linear learning-rate warm-up steps.")
    decay_fraction: float = opt(0.2, "default objective: linear decay to 0 over this last fraction of steps.")
    grad_clip: float = opt(1.0, "default objective: clip the gradient's norm (0: off).")
    seed: int = opt(0, "Initialisation seed.")

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("name: every run needs a name")
        if not self.source:
            raise ConfigError(f"source: run {self.name!r} names no source array (e.g. 8.resid_mid)")
        _choice("arch", self.arch, ARCHS)
        _choice("objective", self.objective, OBJECTIVES)
        self.tokens = parse_count(self.tokens, "tokens")
        auto = self.dead_tokens in (0, "0") and not isinstance(self.dead_tokens, bool)  # resolve() fills it
        self.dead_tokens = 0 if auto else parse_count(self.dead_tokens, "dead_tokens")
        if "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name: {self.name!r} must be a plain folder name (no '/', not '.' or '..'): runs land "
                              "in runs_dir/<cache fingerprint>/<name>")
        for key, low, high in (("lr", 0, None), ("aux_penalty", 0, None), ("grad_clip", 0, None),
                               ("decay_fraction", 0, 1)):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{key}: {v!r} is a {type(v).__name__}; expected a number")
            if not math.isfinite(v) or v < low or (high is not None and v > high) or (key == "lr" and v == 0):
                bound = "positive" if key == "lr" else f"between {low} and {high}" if high is not None else "0 or more"
                raise ConfigError(f"{key}: {v!r} must be {bound}")
        for key in ("width", "k", "warmup_steps", "seed"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{key}: {v!r} must be a non-negative integer" +
                                  (" (0: the seed's default)" if key in ("width", "k") else ""))
        if self.objective == "reference" and self.arch == "topk":
            raise ConfigError("objective: 'reference' reproduces the seed's Matryoshka BatchTopK (arch: matryoshka) "
                              "and BatchTopK (arch: batchtopk); arch 'topk' has only objective: default")

    def resolve(self, d_in: int) -> "RunConfig":
        """Fill width, groups and k from the source width, and check them."""
        width = self.width or 16 * d_in
        groups = self.group_sizes
        if self.arch == "matryoshka" and groups is None:
            unit = width // 16
            groups = [unit, 2 * unit, 4 * unit, width - 7 * unit]
        k = self.k or max(1, width // 200)
        # A latent must be able to die within the run, or the auxiliary loss never revives one: 10M tokens
        # (OpenAI's TopK SAEs) suits runs of billions, and was the whole of a 10M-token run.
        dead = self.dead_tokens or min(10_000_000, max(1, self.tokens // 10))
        if self.arch == "matryoshka":
            if any(not isinstance(g, int) or g <= 0 for g in groups) or sum(groups) != width:
                raise ConfigError(f"group_sizes: {groups} must be positive and sum to the width {width} "
                                  f"(run {self.name!r})")
        elif groups is not None:
            raise ConfigError(f"group_sizes: only a matryoshka run has groups (run {self.name!r} is {self.arch})")
        if not 0 < k < width:
            raise ConfigError(f"k: {k} must be positive and below the width {width} (run {self.name!r})")
        return dataclasses.replace(self, width=width, group_sizes=groups, k=k, dead_tokens=dead)


@dataclass
class TrainConfig:
    """`pipeline train`: every run below trains from one shuffled read of one cache."""

    cache: str = opt("", "The cache to train from.")
    runs: list[RunConfig] = field(default_factory=list, metadata={"help": "The dictionaries to train."})
    runs_dir: str = opt("runs", "Runs land in RUNS_DIR/<cache fingerprint>/<run name>/.")
    batch_size: int = opt(4096, "Tokens per step, shared by every run.")
    buffer_tokens: int = opt(2**18, "Reader buffer: two blocks of half this size.")
    seed: int = opt(0, "Data order seed.")
    data_ranks: int = opt(0, "Disjoint reader streams whose batches make each global batch; 0: one per torchrun process. One process with N reproduces an N-process job's data exactly.")
    device: str | None = opt(None, "Default: cuda if available, else cpu.")
    autocast: bool = opt(True, "bf16 autocast on a GPU, with float32 master weights and optimiser state.")
    checkpoint_every: int = opt(1000, "Steps between checkpoints.")
    log_every: int = opt(10, "Steps between metrics lines.")
    wandb: str | None = opt(None, "W&B project to log to (offline mode works without an account).")
    local_cache_dir: str | None = opt(None, "For a cache on object storage: keep a local copy of every chunk read here.")

    def __post_init__(self) -> None:
        if not isinstance(self.runs, list):
            raise ConfigError(f"train.runs: expected a list of runs (- {{name: ..., source: ...}}), "
                              f"got {type(self.runs).__name__}")
        runs = []
        for i, r in enumerate(self.runs):
            runs.append(r if isinstance(r, RunConfig) else from_dict(RunConfig, r, f"train.runs[{i}]"))
        names = [r.name for r in runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"train.runs: run name {dup[0]!r} is used twice")
        self.runs = runs
        if not isinstance(self.data_ranks, int) or isinstance(self.data_ranks, bool) or self.data_ranks < 0:
            raise ConfigError(f"data_ranks: {self.data_ranks!r} must be 0 (one per process) or a positive integer")
        _positive_ints(self, "batch_size", "buffer_tokens", "checkpoint_every", "log_every")


@dataclass
class EvaluateConfig:
    """`pipeline evaluate`: which runs, on how much of the held-out split, and which metric families."""

    run: str | None = opt(None, "A run folder; default: every run of ``cache``, or the most recent run.")
    cache: str | None = opt(None, "Evaluate every run trained on this cache.")
    sae: list[str] | None = opt(None, "SAELens folders (cfg.json + sae_weights.safetensors) to evaluate on ``cache`` instead of its runs (with ``run``, if given), into its report; on the command line ``--sae FOLDER``, repeatable.")
    runs_dir: str = opt("runs", "Where runs are.")
    batch_size: int = opt(4096, "Tokens per evaluation batch.")
    dense_above: float = opt(0.1, "A latent firing on more than this fraction of tokens counts as dense.")
    features: bool = opt(True, "Feature metrics: absorption, splitting, monosemanticity, hierarchy per group.")
    feature_tokens: int = opt(131072, "Held-out tokens the co-activation, monosemanticity and hierarchy statistics use (bounds their time and memory).")
    absorption_above: float = opt(0.9, "Absorption: decoder-row pairs with cosine above this.")
    split_above: float = opt(0.5, "Splitting: latent pairs co-active above this rate.")
    rare_below: int = opt(50, "Latents firing on fewer of the feature tokens are rare: not scored for monosemanticity.")
    block_mb: float = opt(64.0, "Memory of one block of the pairwise feature statistics, in MiB.")
    contexts: int = opt(10, "Top-activating contexts kept per latent (0: none).")
    report: bool = opt(True, "Write the cache's report: RUNS_DIR/<fingerprint>/report.md with PNG plots.")
    local_cache_dir: str | None = opt(None, "For a cache on object storage: keep a local copy of every chunk read here.")
    lm: bool = opt(True, "Downstream metrics: splice each dictionary into the cache's LM (CE, CE recovered, KL); --no-lm when the LM is not at hand.")
    lm_tokens: int | str = opt("64K", "Held-out tokens the downstream metrics run the LM on: whole contexts from the start of the split, at most all of it.")
    lm_batch_size: int = opt(8, "Contexts per LM forward pass (its memory grows with this times the context size times the vocabulary).")
    device: str | None = opt(None, "Device for the LM and the spliced dictionaries (default: cuda if available, else cpu).")
    model: str | None = opt(None, "A local copy of the cache's model for the downstream metrics (checked against the cache's record: architecture, widths, weights hash); default: where the cache says it was harvested from.")

    def __post_init__(self) -> None:
        _finite(self)
        self.lm_tokens = parse_count(self.lm_tokens, "lm_tokens")
        _positive_ints(self, "lm_batch_size", "batch_size")
        if not isinstance(self.dense_above, (int, float)) or not 0 < self.dense_above < 1:
            raise ConfigError(f"dense_above: {self.dense_above!r} must be between 0 and 1")
        for name in ("absorption_above", "split_above"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
                raise ConfigError(f"{name}: {v!r} must be between 0 and 1")
        for name, low in (("feature_tokens", 1), ("rare_below", 1), ("contexts", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{name}: {v!r} must be an integer >= {low}")
        if not isinstance(self.block_mb, (int, float)) or isinstance(self.block_mb, bool) or self.block_mb <= 0:
            raise ConfigError(f"block_mb: {self.block_mb!r} must be a positive number of MiB")


@dataclass
class PipelineConfig:
    """The whole of pipeline.yaml. Later stages add their sections here."""

    harvest: HarvestConfig | None = field(default_factory=HarvestConfig)
    """None: the file has no harvest section; ``pipeline run`` trains from ``train.cache`` as it is."""
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last, so ``lr: 0.01`` under ``lr: 0.001`` would pass unseen."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"config: {key!r} is given twice in one mapping (line {key_node.start_mark.line + 1}); "
                                  "YAML would keep the last silently")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_pipeline(path: str | Path) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: {str(p)!r} " + ("is a directory, not a YAML file" if p.is_dir() else "does not exist"))
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {p} is not UTF-8 text (is it a YAML file?)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must be a mapping of sections")
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; valid sections are {', '.join(sorted(known))}")
    cfg = PipelineConfig(harvest=from_dict(HarvestConfig, data["harvest"] or {}, "harvest") if "harvest" in data else None,
                         train=from_dict(TrainConfig, data.get("train") or {}, "train"),
                         evaluate=from_dict(EvaluateConfig, data.get("evaluate") or {}, "evaluate"))
    check_pipeline(cfg)
    return cfg


def harvested_arrays(h: HarvestConfig) -> list[str]:
    """The cache arrays a harvest section writes, in the order the model computes them."""
    return [site_name(layer, site) for layer, site in h.site_list]


def harvested_width(h: HarvestConfig) -> int:
    """The width of the harvested arrays, from the model's config (no weights are loaded); for the synthetic
    source, the width of x."""
    if h.source == "synthetic":
        return h.synthetic.d_model
    from .models import model_info

    return model_info(h.model, h.revision).d_model


def check_pipeline(cfg: PipelineConfig) -> None:
    """Cross-section checks, before anything runs: every run reads arrays the harvest writes, and its
    width, groups and k fit. A run whose width follows the model (``width: 0``) is checked against the
    model's config only when it sets groups or k (the defaults always fit) and the config can be read
    (a local directory, the HF cache, or the network); otherwise the trainer checks it against the cache.
    Without a harvest section there is nothing to check against before the cache is opened."""
    if cfg.harvest is None:
        return
    arrays = harvested_arrays(cfg.harvest)
    width: list[int | None] = []  # the model's width, read at most once (None: its config is unreachable)
    for i, run in enumerate(cfg.train.runs):
        for key in ("source", "target"):
            name = getattr(run, key)
            if name is not None and name not in arrays:
                raise ConfigError(f"train.runs[{i}].{key}: {name} is not harvested; the harvest writes "
                                  f"{', '.join(arrays)}")
        if not run.width and run.group_sizes is None and not run.k:
            continue
        if not run.width and not width:
            try:
                width.append(harvested_width(cfg.harvest))
            except ConfigError:  # the harvest reports it; train checks the run against the cache's widths
                width.append(None)
        if not run.width and width[0] is None:
            continue
        try:
            run.resolve(1 if run.width else width[0])  # an explicit width does not use the model's
        except ConfigError as e:
            raise ConfigError(f"train.runs[{i}].{e}") from None
