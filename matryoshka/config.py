"""Typed configuration for every stage, and pipeline.yaml loading.

Every CLI flag is a key of the YAML section of its stage (``--context-size`` is ``context_size``),
so a command line and a config file describe the same run. Each section is a pydantic model (see
``matryoshka/settings.py``): a field's type and rules say what it accepts, its description is its help
text, and validation happens here, before any model is loaded or any byte is written. Every error names
the bad key by its path and the valid choices, in one line.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any

import fsspec
import yaml
from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError
from .names import SITES, is_hub_id, looks_like_path
from .settings import Keys, Number, from_dict, opt, rule

__all__ = ["ConfigError", "SITES", "looks_like_path", "from_dict", "opt"]  # re-exported: imported from here

STORAGE_DTYPES = ("bfloat16", "float16", "float32", "float8")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex_attention")
CODECS = ("lz4", "zstd", "none")
BOS_POLICIES = ("context", "document", "none")
SOURCES = ("model", "synthetic")
ARCHS = ("matryoshka", "batchtopk", "topk")
OBJECTIVES = ("default", "reference")

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}
_COUNT_EXAMPLES = "is not a count; use e.g. 4096, 64K, 200M or 1.5B"


def _count(value: Any) -> int:
    """``200M``, ``1.5B``, ``64K`` or ``4096`` as a positive integer; a failure is a :func:`rule`'s."""
    if isinstance(value, bool):
        raise PydanticCustomError("rule", _COUNT_EXAMPLES)
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGBTkmgbt]?)\s*", str(value))
        if not m:
            raise PydanticCustomError("rule", _COUNT_EXAMPLES)
        n = int(round(float(m.group(1)) * _SUFFIXES[m.group(2).upper()]))
    if n <= 0:
        raise PydanticCustomError("rule", "must be positive")
    return n


def parse_count(value: int | str, name: str = "tokens") -> int:
    """Parse ``200M``, ``1.5B``, ``64K`` or ``4096`` into a positive integer."""
    try:
        return _count(value)
    except PydanticCustomError as e:
        raise ConfigError(f"{name}: {value!r} {e.message()}") from None


def _count_or_zero(value: Any) -> int:
    return 0 if value in (0, "0") and not isinstance(value, bool) else _count(value)


Count = Annotated[int | str, BeforeValidator(_count)]
"""A token count: an integer, or text with a suffix (``200M``); stored as the integer."""
CountOrZero = Annotated[int | str, BeforeValidator(_count_or_zero)]
"""A count, or 0 for a default that depends on other settings."""


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


_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
_SHARD_FORMAT = "is not I/N with 0 <= I < N (e.g. 0/2 and 1/2 for two workers)"


def _is_shard(text: str) -> bool:
    m = _SHARD.fullmatch(str(text))
    return bool(m) and int(m.group(1)) < int(m.group(2))


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> (1, 4): shard index (from 0) and shard count."""
    if not _is_shard(text):
        raise ConfigError(f"shard: {text!r} {_SHARD_FORMAT}")
    m = _SHARD.fullmatch(str(text))
    return int(m.group(1)), int(m.group(2))


def site_name(layer: int, site: str) -> str:
    """The array name of a captured site inside a cache: ``8.resid_mid``."""
    return f"{layer}.{site}"


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


NULL_WORDS = ("none", "null", "~")


def _null_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in NULL_WORDS


def _null_wording(key: str, optional: bool = True) -> str:
    tip = f", or leave {key} out (or write {key}: null, unquoted) for its default" if optional else ""
    return f"is not a path (a null written as text); give a folder, URL or name{tip}"


def check_path(value: Any, key: str, where: str = "", optional: bool = True) -> None:
    """Refuse ``None``, ``null`` or ``~`` given as text for a path (``where`` prefixes the key in the message):
    YAML ``cache: None`` (or a quoted null) is the string "None", which would otherwise become a folder named
    None beside the user's files."""
    if _null_text(value):
        raise ConfigError(f"{where}{key}: {value!r} {_null_wording(key, optional)}")


def _path_text(value: str, info: ValidationInfo) -> str:
    if _null_text(value):
        raise PydanticCustomError("rule", _null_wording(info.field_name))
    return value


def _runs_folder(value: str) -> str:
    """A local folder (a ``file://`` URL names one) or object storage that fsspec can write (``s3://``,
    ``gs://``): never a URL turned into a local folder named ``s3:``, nor one no run could be written to."""
    if value.startswith("file://"):
        return value[len("file://"):]
    if "://" in value:
        protocol = value.split("://", 1)[0]
        if protocol in ("http", "https"):
            raise PydanticCustomError("rule", "is a web address, which cannot be written to; give a local folder "
                                              "or object storage (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX)")
        try:
            fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as e:
            raise PydanticCustomError("rule", "names storage that cannot be used here ({why}); give a local folder "
                                              "or object storage (s3://, gs://, with the s3 or gcs extra installed)",
                                      {"why": str(e).splitlines()[0][:120]}) from None
    return value


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PathText = Annotated[str, BeforeValidator(_fspath), AfterValidator(_path_text)]
"""A folder, URL or Hub name (a ``pathlib.Path`` from Python is taken as its text): the text ``None`` there is
a mistyped null, not a folder name."""

RunsFolder = Annotated[PathText, AfterValidator(_runs_folder)]
"""Where runs are: a local folder or a URL of object storage (see ``run_folder.py``)."""


def one_of(choices: tuple[str, ...]) -> Any:
    """Text that must be one of ``choices``."""
    return Annotated[str, rule(lambda v: v in choices, f"is not one of {', '.join(choices)}")]


Source = one_of(SOURCES)
StorageDtype = one_of(STORAGE_DTYPES)
ModelDtype = one_of(MODEL_DTYPES)
AttnImplementation = one_of(ATTN_IMPLEMENTATIONS)
Codec = one_of(CODECS)
BosPolicy = one_of(BOS_POLICIES)
Arch = one_of(ARCHS)
Objective = one_of(OBJECTIVES)


# The value types of the sections' keys: each says what it accepts and how a refusal reads.
Finite = rule(math.isfinite, "must be a finite number")
"""YAML's .nan and .inf pass every comparison that tests a range, and then fail deep inside a run."""
PositiveInt = Annotated[int, rule(lambda v: v > 0, "must be a positive integer")]
PositiveNumber = Annotated[Number, Finite, rule(lambda v: v > 0, "must be a positive number")]
Fraction = Annotated[Number, Finite, rule(lambda v: 0 < v < 1, "must be between 0 and 1")]
Probability = Annotated[Number, Finite, rule(lambda v: 0 < v <= 1, "must be a probability in (0, 1]")]
NonNegative = Annotated[Number, Finite, rule(lambda v: v >= 0, "must be a number >= 0")]
ZeroOrMore = Annotated[Number, rule(lambda v: math.isfinite(v) and v >= 0, "must be 0 or more")]
Natural = Annotated[int, rule(lambda v: v >= 0, "must be a non-negative integer")]
SeedDefault = Annotated[int, rule(lambda v: v >= 0, "must be a non-negative integer (0: the seed's default)")]

_PLAIN_NAME = ("must be a plain folder name (no '/', not '.' or '..'): runs land in runs_dir/<cache fingerprint>/"
               "<name>")


def _plain_name(name: str) -> bool:
    return not ("/" in name or "\\" in name or name in (".", ".."))


class SyntheticConfig(Keys):
    """``harvest.synthetic``: activations built from a known dictionary of hierarchical sparse features,
    so that evaluation can score dictionaries against the truth (see ``matryoshka/harvest/synthetic.py``).
    A nested mapping rather than flat harvest keys: these settings mean nothing to a model harvest, and a
    nested mapping keeps them apart and names each one by its path (``harvest.synthetic.n_parents``)."""

    d_model: PositiveInt = opt(64, "Width of the source array x (the first site).")
    d_target: Annotated[int, rule(lambda v: v >= 0, "must be 0 (d_model) or a positive integer")] = opt(
        0, "Width of the target array (the second site, if any); 0 means d_model.")
    n_parents: PositiveInt = opt(16, "Parent features.")
    children: PositiveInt = opt(4, "Child features per parent.")
    parent_rate: Probability = opt(0.08, "Probability that a parent fires on a token (independently of the others).")
    child_rate: Probability = opt(0.8, "Probability that, when a parent fires, one of its children fires too (which one is "
                                       "uniform; siblings never fire together, a child never fires without its parent).")
    magnitude_std: NonNegative = opt(0.15, "A firing feature's magnitude is 1 + magnitude_std * N(0, 1), at least 0.1.")
    noise: NonNegative = opt(0.01, "Standard deviation of the Gaussian noise added to every coordinate of x.")
    target_noise: NonNegative = opt(0.01, "Standard deviation of the Gaussian noise added to every coordinate of the target.")

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.children)


def _yaml_mapping(value: Any) -> Any:
    """``--synthetic '{n_parents: 32}'``: the command line gives the mapping as YAML text."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value) or {}
    except yaml.YAMLError:
        raise PydanticCustomError("rule", "is not a YAML mapping (e.g. '{n_parents: 32}')") from None


_HUB_ID_SHAPE = ("is not a Hugging Face Hub id: give owner/name (letters, digits, '-', '_' and '.'; no '--' or '..'), "
                 "e.g. openai-community/gpt2")

MODEL_ONLY = ("model", "revision", "dataset", "dataset_config", "dataset_split", "dataset_revision", "text_column",
              "token_column", "model_dtype", "device_map", "shuffle_buffer", "attn_implementation", "hub_id")
"""Harvest keys of the language-model source only."""


class HarvestConfig(Keys):
    """What `pipeline harvest` captures, from which model and text, and how it is stored."""

    section = "harvest"

    source: Source = opt("model", "``model``: run the LM; ``synthetic``: generate activations with a known ground truth "
                               "(settings in ``synthetic``; no model, dataset or tokenizer is used).")
    synthetic: Annotated[SyntheticConfig | None, BeforeValidator(_yaml_mapping)] = opt(None, "``source: synthetic`` settings, a mapping "
                                                        "(docs/synthetic.md); on the command line a YAML mapping that replaces the config's.")
    model: PathText = opt("gpt2", 'HF model name (``gpt2``, ``google/gemma-2-2b``) or a local directory saved with save_pretrained.')
    revision: str | None = opt(None, "Model revision (branch, tag or commit) on the Hub.")
    hub_id: Annotated[str, rule(is_hub_id, _HUB_ID_SHAPE)] | None = opt(None, "The Hub id a local model directory was "
        "downloaded or saved from (``owner/name``), recorded as the manifest's ``model.hub_id`` so that a teammate "
        "without the directory knows which model to fetch; wins over its config's ``_name_or_path``. Only for a "
        "local ``model``; not part of the cache's identity (the weights hash already names the model).")
    dataset: PathText = opt("Skylion007/openwebtext", 'HF dataset name (streamed) or a local .txt (one document per line), .jsonl or .parquet file.')
    dataset_config: str | None = opt(None, "Dataset configuration (subset) name on the Hub.")
    dataset_split: str = opt("train", "Dataset split to stream.")
    dataset_revision: str | None = opt(None, "Dataset revision on the Hub.")
    text_column: str = opt("text", "Column holding the documents' text.")
    token_column: str | None = opt(None, 'Read pre-tokenized ids from this column instead of tokenizing ``text_column``.')
    layers: str | list[int] | int | None = opt(8, "Layers for sites given without one: 8 or 6,8.")
    sites: str | list[str] = opt("resid_mid,mlp_out", "Sites to capture: resid_pre, attn_out, resid_mid, mlp_in, mlp_out, resid_post, or LAYER.SITE.")
    tokens: Count = opt("10M", "Tokens to harvest (suffixes K, M, B), rounded up to whole contexts.")
    context_size: Annotated[PositiveInt, rule(lambda v: v >= 2, "must be at least 2")] = opt(128, "Tokens per context (sequence).")
    batch_size: PositiveInt = opt(32, 'Sequences per LM forward pass.')
    dtype: StorageDtype = opt("bfloat16", 'Storage dtype of the cache: bfloat16, float16, float32, or float8 (e4m3 scaled per row: half of bf16).')
    model_dtype: ModelDtype = opt("float32", 'Dtype the LM computes in (bfloat16 is the usual choice for Gemma-2 on a GPU).')
    attn_implementation: AttnImplementation = opt("auto", "Attention implementation the LM runs: ``auto`` (the fastest exact one: "
                                           "sdpa for GPT-2, eager for Gemma-2), eager, sdpa or flex_attention. "
                                           "Part of the cache's identity.")
    device: str | None = opt(None, "Device for the LM (default: cuda if available, else cpu).")
    device_map: str | None = opt(None, 'Spread a model too big for one GPU over several (``auto``), through the TransformerLens bridge.')
    cache: PathText | None = opt(None, 'Where the store goes; default ``cache/<model>/<fingerprint>``.')
    cache_root: PathText = opt("cache", "Root of default cache paths.")
    resume: bool = opt(False, "Continue an unfinished harvest of the same config.")
    break_lock: bool = opt(False, "Take over the stale writer lock of a dead writer on object storage (a live lock is never broken).")
    shard: Annotated[str, rule(_is_shard, _SHARD_FORMAT)] | None = opt(None, 'Write only shard ``I/N`` of the cache (workers on separate machines, same ``cache``); under torchrun the rank and world size are used.')
    codec: Codec = opt("lz4", "Compression: lz4 (blosc lz4 + bitshuffle), zstd (blosc zstd-1 + bitshuffle) or none.")
    chunk_mb: PositiveNumber = opt(4.0, 'Target uncompressed chunk size of the widest array, in MiB.')
    holdout: int | str = opt("1%", 'Held-out split: the first sequences of the cache, as tokens (``100K``) or a percentage; '
                                   'whole chunks, at most 10 % more than asked (smaller chunks where needed).')
    seed: Annotated[int | None, rule(lambda v: v is None or v >= 0, "must be a non-negative integer (or null: the dataset's order)")] = opt(0, "Document-order seed (a streaming shuffle buffer); ``null`` keeps the dataset's order. "
                              "For the synthetic source, the generator's seed.")
    shuffle_buffer: PositiveInt = opt(10_000, "Documents in the seeded streaming shuffle buffer.")
    bos: BosPolicy = opt("context", '``context``: every context starts with BOS; ``document``: every document does; ``none``.')
    writer_threads: Annotated[int, rule(lambda v: v >= 0, "must be 0 (one per usable core) or a positive integer")] = opt(0, 'Compression/write threads; 0 means one per CPU core this process may use (its affinity and cgroup quota).')

    @model_validator(mode="after")
    def _sources_and_sites(self) -> HarvestConfig:
        parse_sites(self.sites, self.layers)
        if self.source == "synthetic":
            self._synthetic_settings()
        elif self.synthetic is not None:
            raise ConfigError("synthetic: settings given but source is 'model'; set source: synthetic or drop them")
        return self

    def _synthetic_settings(self) -> None:
        """The synthetic source's defaults, and what it cannot use."""
        if self.synthetic is None:
            self.synthetic = SyntheticConfig()
        for name in MODEL_ONLY:  # a model's settings would be silently ignored
            if getattr(self, name) != self.default_of(name):
                raise ConfigError(f"{name}: {getattr(self, name)!r} means nothing to source: synthetic (no model "
                                  f"or dataset); set source: model, or drop {name}")
        if len(self.site_list) > 2:
            raise ConfigError(f"sites: the synthetic source writes one array (x) and optionally a second (the "
                              f"target); {len(self.site_list)} sites were given")
        if self.seed is None:
            raise ConfigError(f"seed: {self.seed!r}; the synthetic source needs an integer seed (its generator's)")

    @property
    def site_list(self) -> list[tuple[int, str]]:
        """(layer, site) of every captured site, in the order the model computes them."""
        return parse_sites(self.sites, self.layers)

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


class RunConfig(Keys):
    """One dictionary to train: an SAE (no ``target``) or a transcoder (``target`` is another array)."""

    name: Annotated[str, rule(_plain_name, _PLAIN_NAME)] = opt("", "Run name: the folder under runs/<cache fingerprint>/.")
    source: str = opt("", "Cache array the dictionary reads, e.g. 8.resid_mid.")
    target: str | None = opt(None, "Cache array it reconstructs (a transcoder); none for an SAE.")
    arch: Arch = opt("matryoshka", "matryoshka (BatchTopK with nested groups), batchtopk or topk.")
    width: SeedDefault = opt(0, "Latents; 0 means 16x the source width (the seed's default).")
    group_sizes: list[int] | None = opt(None, "Matryoshka groups; none means the seed's [1x, 2x, 4x, 9x] of width/16.")
    k: SeedDefault = opt(0, "Active latents per token; 0 means width / 200 (the seed's suggestion).")
    objective: Objective = opt("default", "default (the seed's method with its faults fixed) or reference (the seed, exactly; matryoshka or batchtopk).")
    lr: Annotated[Number, rule(lambda v: math.isfinite(v) and v > 0, "must be positive")] = opt(3e-4, "Adam learning rate.")
    tokens: Count = opt("10M", "Training tokens.")
    skip: bool = opt(False, "A transcoder's linear skip connection.")
    aux_penalty: ZeroOrMore = opt(1 / 32, "Weight of the dead-latent auxiliary loss.")
    dead_tokens: CountOrZero = opt(0, "default objective: a latent is dead after this many tokens without firing; 0 means a tenth of `tokens`, at most 10M.")
    warmup_steps: Natural = opt(100, "default objective: linear learning-rate warm-up steps.")
    decay_fraction: Annotated[Number, rule(lambda v: 0 <= v <= 1, "must be between 0 and 1")] = opt(0.2, "default objective: linear decay to 0 over this last fraction of steps.")
    grad_clip: ZeroOrMore = opt(1.0, "default objective: clip the gradient's norm (0: off).")
    seed: Natural = opt(0, "Initialisation seed.")

    @model_validator(mode="after")
    def _names_and_objective(self) -> RunConfig:
        if not self.name:
            raise ConfigError("name: every run needs a name")
        if not self.source:
            raise ConfigError(f"source: run {self.name!r} names no source array (e.g. 8.resid_mid)")
        if self.objective == "reference" and self.arch == "topk":
            raise ConfigError("objective: 'reference' reproduces the seed's Matryoshka BatchTopK (arch: matryoshka) "
                              "and BatchTopK (arch: batchtopk); arch 'topk' has only objective: default")
        return self

    def resolve(self, d_in: int) -> RunConfig:
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
        return self.model_copy(update=dict(width=width, group_sizes=groups, k=k, dead_tokens=dead))


class TrainConfig(Keys):
    """`pipeline train`: every run below trains from one shuffled read of one cache."""

    section = "train"

    cache: PathText = opt("", "The cache to train from.")
    runs: list[RunConfig] = Field(default_factory=list, description="The dictionaries to train.")
    runs_dir: RunsFolder = opt("runs", "Runs land in RUNS_DIR/<cache fingerprint>/<run name>/: a local folder or a URL (s3://BUCKET/PREFIX) the team shares.")
    batch_size: PositiveInt = opt(4096, "Tokens per step, shared by every run.")
    buffer_tokens: PositiveInt = opt(2**18, "Reader buffer: two blocks of half this size.")
    seed: int = opt(0, "Data order seed.")
    data_ranks: Annotated[int, rule(lambda v: v >= 0, "must be 0 (one per process) or a positive integer")] = opt(0, "Disjoint reader streams whose batches make each global batch; 0: one per torchrun process. One process with N reproduces an N-process job's data exactly.")
    device: str | None = opt(None, "Default: cuda if available, else cpu.")
    autocast: bool = opt(True, "bf16 autocast on a GPU, with float32 master weights and optimiser state.")
    checkpoint_every: PositiveInt = opt(1000, "Steps between checkpoints.")
    log_every: PositiveInt = opt(10, "Steps between metrics lines.")
    wandb: str | None = opt(None, "W&B project to log to (offline mode works without an account).")
    local_cache_dir: PathText | None = opt(None, "For a cache on object storage: keep a local copy of every chunk read here.")
    break_lock: bool = opt(False, "Runs on object storage: take over the stale lock a dead trainer left on a run folder (a live lock is never broken).")

    @model_validator(mode="after")
    def _unique_names(self) -> TrainConfig:
        names = [r.name for r in self.runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"runs: run name {dup[0]!r} is used twice")
        return self


class EvaluateConfig(Keys):
    """`pipeline evaluate`: which runs, on how much of the held-out split, and which metric families."""

    section = "evaluate"

    run: PathText | None = opt(None, "A run folder; default: every run of ``cache``, or the most recent run.")
    cache: PathText | None = opt(None, "Evaluate every run trained on this cache.")
    sae: list[str] | None = opt(None, "SAELens folders (cfg.json + sae_weights.safetensors) to evaluate on ``cache`` instead of its runs (with ``run``, if given), into its report; on the command line ``--sae FOLDER``, repeatable.")
    runs_dir: RunsFolder = opt("runs", "Where runs are: a local folder or a URL (s3://BUCKET/PREFIX).")
    results_dir: RunsFolder | None = opt(None, "Write each run's eval.json, eval.npz and the report under RESULTS_DIR/<fingerprint>/<run>/ instead of into the run folders, which are then only read (a teammate's runs); a local folder or a URL.")
    batch_size: PositiveInt = opt(4096, "Tokens per evaluation batch.")
    dense_above: Fraction = opt(0.1, "A latent firing on more than this fraction of tokens counts as dense.")
    features: bool = opt(True, "Feature metrics: absorption, splitting, monosemanticity, hierarchy per group.")
    feature_tokens: Annotated[int, rule(lambda v: v >= 1, "must be an integer >= 1")] = opt(131072, "Held-out tokens the co-activation, monosemanticity and hierarchy statistics use (bounds their time and memory).")
    absorption_above: Fraction = opt(0.9, "Absorption: decoder-row pairs with cosine above this.")
    split_above: Fraction = opt(0.5, "Splitting: latent pairs co-active above this rate.")
    rare_below: Annotated[int, rule(lambda v: v >= 1, "must be an integer >= 1")] = opt(50, "Latents firing on fewer of the feature tokens are rare: not scored for monosemanticity.")
    block_mb: Annotated[Number, Finite, rule(lambda v: v > 0, "must be a positive number of MiB")] = opt(64.0, "Memory of one block of the pairwise feature statistics, in MiB.")
    contexts: Annotated[int, rule(lambda v: v >= 0, "must be an integer >= 0")] = opt(10, "Top-activating contexts kept per latent (0: none).")
    report: bool = opt(True, "Write the cache's report: RUNS_DIR/<fingerprint>/report.md with PNG plots.")
    local_cache_dir: PathText | None = opt(None, "For a cache on object storage: keep a local copy of every chunk read here.")
    lm: bool = opt(True, "Downstream metrics: splice each dictionary into the cache's LM (CE, CE recovered, KL); --no-lm when the LM is not at hand.")
    lm_tokens: Count = opt("64K", "Held-out tokens the downstream metrics run the LM on: whole contexts from the start of the split, at most all of it.")
    lm_batch_size: PositiveInt = opt(8, "Contexts per LM forward pass (its memory grows with this times the context size times the vocabulary).")
    device: str | None = opt(None, "Device for the LM and the spliced dictionaries (default: cuda if available, else cpu).")
    break_lock: bool = opt(False, "Runs on object storage: take over the stale lock a dead writer left on a run folder (a live lock is never broken).")
    model: PathText | None = opt(None, "A local copy of the cache's model for the downstream metrics (checked against the cache's record: architecture, widths, weights hash); default: where the cache says it was harvested from.")


class PipelineConfig(Keys):
    """The whole of pipeline.yaml. Later stages add their sections here."""

    harvest: HarvestConfig | None = Field(default_factory=HarvestConfig)
    """None: the file has no harvest section; ``pipeline run`` trains from ``train.cache`` as it is."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


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
    known = set(PipelineConfig.model_fields)
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
