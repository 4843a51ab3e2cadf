"""The default pipeline's experiment, over several seeds: does the Matryoshka SAE absorb less than BatchTopK?

    python benchmarks/absorption.py                 # pipeline.yaml, seeds 0 1 2
    python benchmarks/absorption.py --seeds 0 1 2 3 --config examples/other.yaml
    python benchmarks/absorption.py --seeds 0 --tokens 8M    # every run trained on 8M tokens (convergence)

For each seed s, the stages of ``pipeline.yaml`` run for real (harvest -> cache -> train -> evaluate) in a
temporary folder, with every seed set to s: the generator's (``harvest.seed``: new data and a new true
dictionary), the data order (``train.seed``) and each run's initialisation. Prints each run's L0, FVU,
ground-truth recovery and absorption rate, then, per seed, the ratio of the Matryoshka SAE's absorption
to the BatchTopK SAE's (the baseline, measured in the same run), and the seconds each stage took.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine, print_table
from matryoshka.config import load_pipeline, parse_count
from matryoshka.evaluate.stage import evaluate
from matryoshka.harvest import harvest
from matryoshka.train.trainer import train


def one_seed(config: Path, seed: int, root: Path, tokens: str | None = None) -> tuple[list[dict], dict[str, float]]:
    p = load_pipeline(config)
    h = p.harvest.model_copy(update={"seed": seed, "cache": str(root / f"cache-{seed}")})
    runs = [r.model_copy(update={"seed": seed, **({"tokens": parse_count(tokens)} if tokens else {})})
            for r in p.train.runs]
    t = p.train.model_copy(update={"seed": seed, "runs": runs, "runs_dir": str(root / "runs")})
    times = {}
    start = time.perf_counter()
    t.cache = str(harvest(h, progress=False))
    times["harvest"] = time.perf_counter() - start
    start = time.perf_counter()
    train(t, progress=False)
    times["train"] = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluate(p.evaluate.model_copy(update=dict(cache=t.cache, runs_dir=t.runs_dir, run=None, report=False,
                                                         features=False, contexts=0)))
    times["evaluate"] = time.perf_counter() - start
    return results, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "pipeline.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--baseline", default="batchtopk-sae", help="run the ratio is taken against")
    ap.add_argument("--candidate", default="matryoshka-sae")
    ap.add_argument("--tokens", default=None, help="train every run on this many tokens (default: the config's)")
    args = ap.parse_args()
    print(machine("cpu"))
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results, times = one_seed(args.config, seed, Path(tmp), args.tokens)
            by_name = {}
            for r in results:
                g = r["ground_truth"]
                by_name[r["run"]] = g["absorption"]
                rows.append([r["run"], str(seed), f"{r['l0']:.2f}", f"{r['fvu']:.4f}", f"{g['recovery']:.3f}",
                             f"{g['absorption']:.3f}"])
            ratio = by_name[args.candidate] / by_name[args.baseline]
            ratios.append([str(seed), f"{by_name[args.baseline]:.3f}", f"{by_name[args.candidate]:.3f}", f"{ratio:.2f}",
                           "yes" if ratio < 1 else "NO",
                           *(f"{times[s]:.1f}" for s in ("harvest", "train", "evaluate"))])
    print_table(["run", "seed", "L0", "FVU", "recovery", "absorption"], rows)
    print()
    print_table(["seed", f"absorption {args.baseline}", f"absorption {args.candidate}", "ratio", "lower",
                 "harvest s", "train s", "evaluate s"], ratios)


if __name__ == "__main__":
    main()
