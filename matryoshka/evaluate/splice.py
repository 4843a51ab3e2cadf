"""Downstream metrics: splice a dictionary into its language model and measure what the predictions lose.

The LM of a cache is loaded once (its manifest's model, revision and dtype) and run on whole held-out
contexts read from the cache's ``tokens`` array. A splice replaces one site, in every forward pass, by a
function of a site of the same pass: an SAE replaces its source by its reconstruction; a transcoder
replaces its *target* (e.g. ``8.mlp_out``) by its output computed from its source (``8.resid_mid``).
Everything downstream of the site sees the replacement (see :func:`matryoshka.models.hook_site`). The
function takes and returns float32 rows, whatever dtype the LM computes in; its output is cast to the
LM's dtype before it goes back in.

BOS. A BOS position (as the reader and the statistics define it, :func:`~matryoshka.cache.format.bos_rows`:
position 0 of each context under the ``context`` policy, every BOS token under ``document``) is neither
spliced (the site keeps the value the model computes there) nor scored. The scored predictions are those
at positions t < T-1 where neither t nor t+1 is a BOS position: the prediction made from a BOS (the same
in every splice) and the prediction of a BOS (a document boundary, under ``document``) are left out.
With no BOS id (``--bos none``) every position is spliced and every prediction scored. Over the S scored
predictions, with p the clean model's next-token distribution and q the spliced (or ablated) model's:

    CE                 = -(1/S) sum log q(x_{t+1})                          (clean CE: with p)
    CE (zero-ablated)  = CE with the site replaced by 0
    CE (mean-ablated)  = CE with the site replaced by the cache statistics' mean of the site
    CE recovered (abl) = (CE_abl - CE_spliced) / (CE_abl - CE_clean)          (1: as good as clean; 0: as bad as abl)
    KL                 = (1/S) sum KL(p || q) = (1/S) sum_t sum_v p_v (log p_v - log q_v)

For a transcoder the ablations are of its target site.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import Cache, CacheError
from ..cache.format import bos_rows
from ..config import SITES, ConfigError
from ..models import hook_site, input_device, load_model
from .cache_model import HINT, cache_model

RowFn = Callable[[torch.Tensor], torch.Tensor]
"""float32 rows [n, d_in] -> [n, d_out] (a dictionary in cache units, or a test's identity/zero)."""


@dataclass(frozen=True)
class Splice:
    """Replace cache array ``target`` by ``fn`` of array ``source`` (default: the target itself, an SAE)."""

    target: str
    fn: RowFn
    source: str | None = None


def constant(value: np.ndarray | torch.Tensor) -> RowFn:
    """Every row becomes ``value`` (zero- and mean-ablation)."""
    c = torch.as_tensor(value, dtype=torch.float32)
    return lambda x: c.to(x.device).expand(len(x), -1)


def no_lm_reason(cache: Cache) -> str | None:
    """Why a cache has no LM to splice into (a synthetic cache written without a model), or None."""
    if cache.manifest.get("source") == "synthetic" or not cache.manifest.get("identity", {}).get("model"):
        return f"cache {cache.path} was not harvested from a language model"
    return None


class LM:
    """A cache's language model, loaded once, and the held-out contexts the downstream metrics use."""

    def __init__(self, model: torch.nn.Module, arch: str, cache: Cache, tokens: int,
                 batch_size: int = 8, progress: bool = False) -> None:
        """``tokens``: how many held-out tokens to use, as whole contexts from the start of the split
        (rounded up; at most the whole split). ``batch_size``: contexts per forward pass."""
        self.model, self.arch, self.cache = model, arch, cache
        self.batch_size, self.progress = batch_size, progress
        ctx = cache.manifest["context_size"]
        a, b = cache.split["heldout"]
        if a == b:
            raise CacheError(f"cache: {cache.path!r} has no held-out split to evaluate the LM on")
        n = min(-(-int(tokens) // ctx), (b - a) // ctx)
        self.tokens = torch.from_numpy(np.asarray(cache.tokens[a:a + n * ctx], dtype=np.int64).reshape(n, ctx))
        self.bos_id: int | None = cache.manifest["bos"]["token_id"]
        self.bos = bos_rows(cache.manifest["bos"], torch.arange(ctx).expand(n, ctx), self.tokens)
        """[N, T] bool: the BOS positions."""
        self._ablations: dict[str, tuple[float, float]] = {}

    @classmethod
    def load(cls, cache: Cache, *, tokens: int, batch_size: int = 8, device: str | None = None,
             progress: bool = False, model: str | None = None) -> LM:
        """Load the cache's model as it was harvested (or ``model``, a local copy of it checked against the
        cache's record: :mod:`.cache_model`); a model that cannot be loaded is a one-line error."""
        m = cache.manifest["model"]
        info = cache_model(cache, model)
        try:
            lm = load_model(info, dtype=m["dtype"], device=device, progress=progress,
                            attn_implementation=m.get("attn_implementation", "eager"))  # older caches: eager
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            raise ConfigError(f"evaluate: cannot load the cache's model {info.resolved!r} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {HINT}") from None
        return cls(lm, info.arch, cache, tokens, batch_size, progress)

    @property
    def scored(self) -> torch.Tensor:
        """[N, T-1] bool: which next-token predictions count (see the module docstring)."""
        ok = ~self.bos
        return ok[:, :-1] & ok[:, 1:]

    def _site(self, name: str) -> tuple[int, str]:
        a = self.cache.manifest["arrays"].get(name)
        if a is None or a["site"] not in SITES:
            raise CacheError(f"site: cache {self.cache.path!r} has no LM site {name!r}; it has "
                             f"{', '.join(self.cache.array_names)}")
        return a["layer"], a["site"]

    def _hooks(self, splice: Splice, keep: torch.Tensor) -> list:
        """Install ``splice`` for one forward pass; ``keep`` [B, T] marks the positions left as they are."""
        target = self._site(splice.target)
        source = self._site(splice.source or splice.target)
        if (source[0], SITES.index(source[1])) > (target[0], SITES.index(target[1])):
            raise ConfigError(f"evaluate: source {splice.source} is computed after target {splice.target}; "
                              "a transcoder's source must come first")
        seen: dict[str, torch.Tensor] = {}

        def replace(t: torch.Tensor) -> torch.Tensor:
            x = seen.pop("x") if source != target else t
            y = splice.fn(x.reshape(-1, x.shape[-1]).float()).to(t.device, t.dtype).reshape(t.shape)
            return torch.where(keep.to(t.device).unsqueeze(-1), t, y)

        handles = []
        if source != target:
            handles += hook_site(self.model, self.arch, *source, lambda t: seen.__setitem__("x", t))
        return handles + hook_site(self.model, self.arch, *target, replace)

    @torch.inference_mode()
    def compare(self, splices: dict[Any, Splice],
                desc: str = "LM") -> tuple[float, dict[Any, tuple[float, float]], int]:
        """Clean CE, then (CE, KL) of each splice, over the scored predictions; and their count."""
        scored_all = self.scored
        ce_clean, sums, n_scored = 0.0, {name: [0.0, 0.0] for name in splices}, 0  # sums: [CE, KL] per splice
        dev = input_device(self.model)
        starts = range(0, len(self.tokens), self.batch_size)
        for s in tqdm(starts, desc=desc, unit="batch", disable=not self.progress, leave=False):
            toks = self.tokens[s:s + self.batch_size].to(dev)
            scored = scored_all[s:s + self.batch_size].to(dev)
            keep = self.bos[s:s + self.batch_size].to(dev)
            targets = toks[:, 1:][scored][:, None]
            lp_clean = self._logprobs(toks, scored)
            p_clean = lp_clean.exp()
            ce_clean -= float(lp_clean.gather(1, targets).sum(dtype=torch.float64))
            n_scored += len(targets)
            for name, splice in splices.items():
                handles = self._hooks(splice, keep)
                try:
                    lp = self._logprobs(toks, scored)
                finally:
                    for h in handles:
                        h.remove()
                sums[name][0] -= float(lp.gather(1, targets).sum(dtype=torch.float64))
                sums[name][1] += float((p_clean * (lp_clean - lp)).sum(dtype=torch.float64))
        return ce_clean / n_scored, {k: (ce / n_scored, kl / n_scored) for k, (ce, kl) in sums.items()}, n_scored

    def _logprobs(self, toks: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=toks, use_cache=False).logits[:, :-1]
        return torch.log_softmax(logits[scored].float(), dim=-1)

    def downstream(self, fn: RowFn, target: str, source: str | None = None, desc: str = "LM") -> dict[str, Any]:
        """The downstream metrics of one dictionary (``fn``) spliced at ``target`` (eval.json's ``lm``)."""
        return self.downstream_many({"spliced": Splice(target, fn, source)}, desc)["spliced"]

    def downstream_many(self, splices: dict[Any, Splice], desc: str = "LM") -> dict[Any, dict[str, Any]]:
        """The downstream metrics of several dictionaries, by name, in one pass over the held-out contexts:
        each batch's clean forward runs once for all of them, each dictionary's splice in the same pass,
        and the zero- and mean-ablations of a target only the first time that target is seen (they are
        kept for later calls). K dictionaries at one target cost 1 + K + 2 forwards per batch, not
        K x (1 + 1) + 2; every number is the one :meth:`downstream` gives each alone (same batches, same
        forwards)."""
        new = sorted({s.target for s in splices.values()} - set(self._ablations))
        passes = {("run", name): s for name, s in splices.items()}
        for target in new:
            mean = self.cache.stats(target).mean
            passes[("zero", target)] = Splice(target, constant(np.zeros_like(mean)))
            passes[("mean", target)] = Splice(target, constant(mean))
        ce_clean, out, n = self.compare(passes, desc)
        for target in new:
            self._ablations[target] = (out[("zero", target)][0], out[("mean", target)][0])
        results = {}
        for name, splice in splices.items():
            ce_zero, ce_mean = self._ablations[splice.target]
            ce, kl = out[("run", name)]
            results[name] = {"sequences": len(self.tokens), "tokens": n, "ce_clean": ce_clean, "ce_spliced": ce,
                             "ce_zero_ablated": ce_zero, "ce_mean_ablated": ce_mean,
                             "ce_recovered_zero": recovered(ce_clean, ce, ce_zero),
                             "ce_recovered_mean": recovered(ce_clean, ce, ce_mean), "kl": kl}
        return results


def recovered(clean: float, spliced: float, ablated: float) -> float | None:
    """(CE_abl - CE_spliced) / (CE_abl - CE_clean); None when ablating changes nothing."""
    return None if ablated == clean else (ablated - spliced) / (ablated - clean)


def dictionary_fn(dic: torch.nn.Module) -> RowFn:
    """A loaded dictionary (cache units, float32) as a row function, on the device of the rows."""
    return lambda x: dic.to(x.device)(x)
