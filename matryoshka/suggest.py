"""`pipeline models`: a model's width and depth, and the seed's suggested dictionary sizes for it.

Sizes follow the seed's rule of thumb, which is also what a run's zero defaults resolve to
(:meth:`~matryoshka.config.RunConfig.resolve`): a dictionary of 16x the width, Matryoshka groups of
[1x, 2x, 4x, 9x] the width, and k = dictionary / 200. A named model's width and depth come from its own
config (:func:`~matryoshka.models.model_info`: a local directory, the Hugging Face cache, or the Hub).
With no name, the seed's model-support table is shown as the seed printed it, without any network access.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, RunConfig

SEED_TABLE = {
    "gpt2": (768, 12), "gpt2-medium": (1024, 24), "gpt2-large": (1280, 36), "gpt2-xl": (1600, 48),
    "gemma-2-2b": (2304, 26), "gemma-2-9b": (3584, 42), "gemma-2-27b": (4608, 46),
}
"""(d_model, n_layers) of the seed's supported models, from its README's model-support table."""


@dataclass(frozen=True)
class Suggestion:
    model: str
    source: str
    """Where width and depth came from: ``config`` (the model's own) or ``seed table``."""
    d_model: int
    n_layers: int
    width: int
    group_sizes: list[int]
    k: int


def suggest(model: str, d_model: int, n_layers: int, source: str) -> Suggestion:
    sized = RunConfig(name="suggested", source="x").resolve(d_model)  # the same rule a run's defaults use
    return Suggestion(model, source, d_model, n_layers, sized.width, sized.group_sizes, sized.k)


def from_config(name: str) -> Suggestion:
    """Read ``name``'s config (no weights); an unknown or unsupported model is a ConfigError."""
    from .models import model_info

    try:
        info = model_info(name)
    except ConfigError as e:
        hint = "; `pipeline models` with no name shows the seed's table offline" if name in SEED_TABLE else ""
        raise ConfigError(f"{e}{hint}") from None
    return suggest(name, info.d_model, info.n_layers, "config")


def seed_table() -> list[Suggestion]:
    return [suggest(name, d, n, "seed table") for name, (d, n) in SEED_TABLE.items()]


def format_table(rows: list[Suggestion]) -> str:
    name_w = max(12, *(len(r.model) for r in rows))
    lines = [f"{'model':<{name_w}} {'from':<10} {'d_model':>7} {'layers':>6} {'width (16x)':>11} "
             f"{'k (width/200)':>13}  group_sizes [1x, 2x, 4x, 9x]"]
    for r in rows:
        lines.append(f"{r.model:<{name_w}} {r.source:<10} {r.d_model:>7} {r.n_layers:>6} {r.width:>11,} {r.k:>13}  "
                     f"[{', '.join(str(g) for g in r.group_sizes)}]")
    return "\n".join(lines)
