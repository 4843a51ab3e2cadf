"""Typed configuration for every stage, and pipeline.yaml loading.

Every CLI flag is a key of the YAML section of its stage (``--context-size`` is ``context_size``),
so a command line and a config file describe the same run. Validation happens here, before any
model is loaded or any byte is written, and every error names the bad key or value and the valid
choices.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad user input. The CLI prints it as one line and exits with status 2."""


SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
"""Capturable sites in the order a block computes them. ``mlp_in`` is the true MLP input
(after ``ln2``, or Gemma-2's pre-feedforward norm), which differs from ``resid_mid``."""

STORAGE_DTYPES = ("bfloat16", "float16", "float32")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
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


def site_name(layer: int, site: str) -> str:
    """The array name of a captured site inside a cache: ``8.resid_mid``."""
    return f"{layer}.{site}"


def opt(default: Any, help: str) -> Any:
    """A config field with its help text, shown by the CLI and the README's reference."""
    return field(default=default, metadata={"help": help})


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


@dataclass
class HarvestConfig:
    """What `pipeline harvest` captures, from which model and text, and how it is stored."""

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
    dtype: str = opt("bfloat16", 'Storage dtype of the cache.')
    model_dtype: str = opt("float32", 'Dtype the LM computes in (bfloat16 is the usual choice for Gemma-2 on a GPU).')
    device: str | None = opt(None, "Device for the LM (default: cuda if available, else cpu).")
    device_map: str | None = opt(None, 'Spread a model too big for one GPU over several (``auto``), through the TransformerLens bridge.')
    cache: str | None = opt(None, 'Where the store goes; default ``cache/<model>/<fingerprint>``.')
    cache_root: str = opt("cache", "Root of default cache paths.")
    resume: bool = opt(False, "Continue an unfinished harvest of the same config.")
    codec: str = opt("lz4", "Compression: lz4 (blosc lz4 + bitshuffle), zstd (blosc zstd-1 + bitshuffle) or none.")
    chunk_mb: float = opt(4.0, 'Target uncompressed chunk size of the widest array, in MiB.')
    holdout: int | str = opt("1%", 'Held-out split: the first sequences of the cache, as tokens (``100K``) or a percentage.')
    seed: int | None = opt(0, "Document-order seed (a streaming shuffle buffer); ``null`` keeps the dataset's order.")
    shuffle_buffer: int = opt(10_000, "Documents in the seeded streaming shuffle buffer.")
    bos: str = opt("context", '``context``: every context starts with BOS; ``document``: every document does; ``none``.')
    writer_threads: int = opt(0, 'Compression/write threads; 0 means one per CPU core.')

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens, "tokens")
        for name in ("context_size", "batch_size", "shuffle_buffer"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}: {v!r} must be a positive integer")
        if self.context_size < 2:
            raise ConfigError(f"context_size: {self.context_size} must be at least 2")
        if not isinstance(self.chunk_mb, (int, float)) or self.chunk_mb <= 0:
            raise ConfigError(f"chunk_mb: {self.chunk_mb!r} must be a positive number")
        _choice("dtype", self.dtype, STORAGE_DTYPES)
        _choice("model_dtype", self.model_dtype, MODEL_DTYPES)
        _choice("codec", self.codec, CODECS)
        _choice("bos", self.bos, BOS_POLICIES)
        self.site_list = parse_sites(self.sites, self.layers)

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
        chunks = max(1, -(-int(seqs) // seqs_per_chunk) if seqs > 0 else 1)
        held = chunks * seqs_per_chunk
        if held >= self.n_sequences:
            raise ConfigError(
                f"holdout: {h!r} leaves no training data ({held} held-out sequences of {self.n_sequences}); "
                "raise --tokens or lower --holdout")
        return held


def from_dict(cls: type, data: dict[str, Any], path: str) -> Any:
    """Build a config dataclass from a YAML mapping, naming unknown keys and wrong types by path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key; valid keys are {', '.join(sorted(names))}")
    try:
        return cls(**data)
    except ConfigError as e:
        raise ConfigError(f"{path}.{e}") from None
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None


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
    objective: str = opt("default", "default (the seed's method with its faults fixed) or reference (the seed, exactly).")
    lr: float = opt(3e-4, "Adam learning rate.")
    tokens: int | str = opt("10M", "Training tokens.")
    skip: bool = opt(False, "A transcoder's linear skip connection.")
    aux_penalty: float = opt(1 / 32, "Weight of the dead-latent auxiliary loss.")
    dead_tokens: int | str = opt("10M", "default objective: a latent is dead after this many tokens without firing.")
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
        self.dead_tokens = parse_count(self.dead_tokens, "dead_tokens")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ConfigError(f"lr: {self.lr!r} must be positive")
        if self.objective == "reference" and self.arch != "matryoshka":
            raise ConfigError(f"objective: 'reference' reproduces the seed's Matryoshka BatchTopK; arch is {self.arch!r}")

    def resolve(self, d_in: int) -> "RunConfig":
        """Fill width, groups and k from the source width, and check them."""
        width = self.width or 16 * d_in
        groups = self.group_sizes
        if self.arch == "matryoshka" and groups is None:
            unit = width // 16
            groups = [unit, 2 * unit, 4 * unit, width - 7 * unit]
        k = self.k or max(1, width // 200)
        if self.arch == "matryoshka":
            if any(not isinstance(g, int) or g <= 0 for g in groups) or sum(groups) != width:
                raise ConfigError(f"group_sizes: {groups} must be positive and sum to the width {width} "
                                  f"(run {self.name!r})")
        elif groups is not None:
            raise ConfigError(f"group_sizes: only a matryoshka run has groups (run {self.name!r} is {self.arch})")
        if not 0 < k < width:
            raise ConfigError(f"k: {k} must be positive and below the width {width} (run {self.name!r})")
        return dataclasses.replace(self, width=width, group_sizes=groups, k=k)


@dataclass
class TrainConfig:
    """`pipeline train`: every run below trains from one shuffled read of one cache."""

    cache: str = opt("", "The cache to train from.")
    runs: list[RunConfig] = field(default_factory=list, metadata={"help": "The dictionaries to train."})
    runs_dir: str = opt("runs", "Runs land in RUNS_DIR/<cache fingerprint>/<run name>/.")
    batch_size: int = opt(4096, "Tokens per step, shared by every run.")
    buffer_tokens: int = opt(2**18, "Reader buffer: two blocks of half this size.")
    seed: int = opt(0, "Data order seed.")
    device: str | None = opt(None, "Default: cuda if available, else cpu.")
    autocast: bool = opt(True, "bf16 autocast on a GPU, with float32 master weights and optimiser state.")
    checkpoint_every: int = opt(1000, "Steps between checkpoints.")
    log_every: int = opt(10, "Steps between metrics lines.")
    wandb: str | None = opt(None, "W&B project to log to (offline mode works without an account).")

    def __post_init__(self) -> None:
        runs = []
        for i, r in enumerate(self.runs):
            runs.append(r if isinstance(r, RunConfig) else from_dict(RunConfig, r, f"train.runs[{i}]"))
        names = [r.name for r in runs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"train.runs: run name {dup[0]!r} is used twice")
        self.runs = runs
        for name in ("batch_size", "buffer_tokens", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}: {v!r} must be a positive integer")


@dataclass
class EvaluateConfig:
    """`pipeline evaluate`: which runs, on how much of the held-out split, and which metric families."""

    run: str | None = opt(None, "A run folder; default: every run of ``cache``, or the most recent run.")
    cache: str | None = opt(None, "Evaluate every run trained on this cache.")
    runs_dir: str = opt("runs", "Where runs are.")
    batch_size: int = opt(4096, "Tokens per evaluation batch.")
    dense_above: float = opt(0.1, "A latent firing on more than this fraction of tokens counts as dense.")

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise ConfigError(f"batch_size: {self.batch_size!r} must be a positive integer")
        if not isinstance(self.dense_above, (int, float)) or not 0 < self.dense_above < 1:
            raise ConfigError(f"dense_above: {self.dense_above!r} must be between 0 and 1")


@dataclass
class PipelineConfig:
    """The whole of pipeline.yaml. Later stages add their sections here."""

    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def load_pipeline(path: str | Path) -> PipelineConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p} must be a mapping of sections")
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section; valid sections are {', '.join(sorted(known))}")
    return PipelineConfig(harvest=from_dict(HarvestConfig, data.get("harvest") or {}, "harvest"),
                          train=from_dict(TrainConfig, data.get("train") or {}, "train"),
                          evaluate=from_dict(EvaluateConfig, data.get("evaluate") or {}, "evaluate"))
