"""The `pipeline` command: run (all stages), harvest, train, evaluate, browse, models, and cache
ls|info|verify|repair|copy|rm.

Each stage's flags are generated from its config model (:class:`~matryoshka.config.HarvestConfig`,
:class:`~matryoshka.config.TrainConfig`), so every flag is a key of the stage's pipeline.yaml section
and the two can never drift apart. A flag given on the
command line overrides the same key from ``--config``.
"""
from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from .config import ConfigError, EvaluateConfig, HarvestConfig, TrainConfig, check_path, from_dict, load_pipeline
from .errors import MatryoshkaError
from .settings import Keys

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Harvest LM activations once into a shared zarr cache; train and evaluate Matryoshka SAEs "
                       "and transcoders from it.")
cache_app = typer.Typer(no_args_is_help=True,
                        help="Inspect, share and remove caches: ls, info, verify, repair, copy, rm.")
app.add_typer(cache_app, name="cache")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _run_guarded(fn: Callable[[], Any]) -> Any:
    """One line and the error's exit status for every :class:`~matryoshka.errors.MatryoshkaError` (bad
    input: 2) and for a store that keeps failing; tracebacks only for our own bugs."""
    try:
        return fn()
    except MatryoshkaError as e:
        typer.echo(f"{e.prefix}{e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except Exception as e:
        from .cache.remote import is_store_error, store_error_line

        if not is_store_error(e):
            raise  # our own bug: the traceback is for us
        raise _fail(store_error_line(e)) from None


def _option_type(tp: Any) -> type:
    """The CLI type of a config field: ``int | None`` parses as int, any other union as text (a count such
    as ``200M``, a YAML mapping); the config model checks the value."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
        tp = args[0]
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if tp is bool:
        return bool
    if tp is int:
        return int
    if tp is float:
        return float
    return str


def _flags_from(cls: type[Keys], skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One typer option per key of a config model (``context_size`` is ``--context-size``), its help the
    field's description; every default is None, so that only the flags given override ``--config``."""
    params = []
    for name, f in cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        tp = _option_type(f.annotation)
        decls = [flag] if tp is not bool else [f"{flag}/--no-{flag[2:]}"]
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[tp],
            default=typer.Option(None, *decls, help=f.description or "", show_default=False)))
    return params


def _config_from(cls: type[Keys], section: str, config: Path | None, flags: dict[str, Any]) -> Any:
    base: dict[str, Any] = {}
    if config is not None:
        given = getattr(load_pipeline(config), section)
        base = given.model_dump() if given is not None else {}
    base.update({k: v for k, v in flags.items() if v is not None})
    return from_dict(cls, base, section)


def _harvest(config: Path | None = None, quiet: bool = False, **flags: Any) -> None:
    from .harvest import harvest

    def go() -> None:
        cfg = _config_from(HarvestConfig, "harvest", config, flags)
        path = harvest(cfg, progress=not quiet)
        typer.echo(str(path))

    _run_guarded(go)


def _with_signature(fn: Callable, extra: list[inspect.Parameter]) -> Callable:
    common = [
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", "-c", help="pipeline.yaml to read defaults from.")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--quiet", "-q", help="No progress bar.")),
    ]

    def wrapper(**kwargs: Any) -> None:
        fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(common + extra)  # type: ignore[attr-defined]
    wrapper.__doc__ = fn.__doc__
    return wrapper


app.command("harvest", help="Run the LM once over a dataset and write source/target activations to a zarr cache.")(
    _with_signature(_harvest, _flags_from(HarvestConfig)))


def _train(config: Path | None = None, quiet: bool = False, **flags: Any) -> None:
    from .train.trainer import train

    def go() -> None:
        cfg = _config_from(TrainConfig, "train", config, flags)
        if not cfg.cache and config is not None:  # the cache the file's harvest writes, as `pipeline run` trains on
            from .pipeline import harvest_cache

            cfg = cfg.model_copy(update={"cache": harvest_cache(load_pipeline(config))})
        for path in train(cfg, progress=not quiet):
            typer.echo(str(path))

    _run_guarded(go)


app.command("train", help="Train every run listed in the config from one shuffled read of a cache.")(
    _with_signature(_train, _flags_from(TrainConfig, skip=("runs",))))


def _evaluate(config: Path | None = None, quiet: bool = False, run: str | None = None,
              sae: list[str] | None = None, **flags: Any) -> None:
    from .evaluate.stage import LEGEND, evaluate, table

    def go() -> None:
        cfg = _config_from(EvaluateConfig, "evaluate", config, {**flags, "run": run, "sae": sae or None})
        default_runs = cfg.runs_dir == EvaluateConfig.default_of("runs_dir")
        if config is not None and flags.get("runs_dir") is None and default_runs:
            cfg = cfg.model_copy(update={"runs_dir": load_pipeline(config).train.runs_dir})  # as `pipeline run` does
        results = evaluate(cfg, progress=not quiet)
        typer.echo(table(results))
        typer.echo(LEGEND)
        for report in dict.fromkeys(r["report"] for r in results if "report" in r):
            typer.echo(f"report: {report}")

    _run_guarded(go)


app.command("evaluate", help="Metrics of trained runs on their cache's held-out split; eval.json per run, one table.")(
    _with_signature(_evaluate, [inspect.Parameter(
        "run", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
        default=typer.Argument(None, help="A run folder; default: every run of --cache, or the most recent run.")),
        inspect.Parameter("sae", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]], default=typer.Option(
            None, "--sae", help=EvaluateConfig.model_fields["sae"].description))]
        + _flags_from(EvaluateConfig, skip=("run", "sae"))))


@app.command("run")
def run(config: Path = typer.Argument(Path("pipeline.yaml"), help="The pipeline.yaml to run."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
        break_lock: bool = typer.Option(False, "--break-lock", help="Runs on object storage: take over the stale "
                                        "lock a dead writer left on a run folder (a live lock is never broken).")
        ) -> None:
    """Harvest, train and evaluate everything CONFIG describes, doing only what is missing; resumable."""
    from .pipeline import run_pipeline

    def go() -> None:
        cfg = load_pipeline(config)
        if break_lock:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"break_lock": True}),
                                         "evaluate": cfg.evaluate.model_copy(update={"break_lock": True})})
        out = run_pipeline(cfg, progress=not quiet, echo=typer.echo)
        if out.table:
            from .evaluate.stage import LEGEND

            typer.echo(out.table)
            typer.echo(LEGEND)
        if out.report is not None:
            typer.echo(f"report: {out.report}")

    _run_guarded(go)


@app.command("browse")
def browse_cmd(runs: list[str] | None = typer.Argument(
                   None, metavar="RUN",
                   help="Evaluated run folders or URLs; default: every evaluated run of --cache, or the most recent."),
               cache: str | None = typer.Option(None, "--cache", help="Browse every evaluated run of this cache."),
               runs_dir: str = typer.Option("runs", "--runs-dir", help="Where the runs are (a folder or a URL)."),
               out: str | None = typer.Option(
                   None, "--out", help="Write the site to this local folder instead of next to the runs' report "
                                       "(nothing is written or published there)."),
               tokens: int = typer.Option(131_072, "--tokens", help="Held-out rows read per run."),
               batch_size: int = typer.Option(4096, "--batch-size", help="Rows encoded at once."),
               serve: bool = typer.Option(False, "--serve", help="Then serve the site on localhost."),
               port: int = typer.Option(8000, "--port", help="The --serve port (0: any free one)."),
               quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")) -> None:
    """Write a static, offline feature browser next to the cache's report: runs, latents, hierarchy, search.

    For runs on object storage the site is built in a local copy and published next to the report; the
    command prints where the team finds it (its URL), and --serve serves the local copy."""
    from .browse import browse, resolve_runs
    from .run_folder import Workspace

    if serve and not 0 <= port <= 65535:
        raise _fail(f"--port: {port} is not a port (0 to 65535; 0: any free one)")
    with Workspace() as space:  # open while serving: the site of runs on a bucket is served from its local copy
        site = _run_guarded(lambda: browse(resolve_runs(runs or [], cache, runs_dir), space, cache, tokens,
                                           batch_size, progress=not quiet, out=out))
        typer.echo(str(site.shared))
        if serve:
            from .browse.serve import serve as serve_site

            serve_site(site.index.parent, port, typer.echo)


@app.command("models")
def models(names: list[str] | None = typer.Argument(
        None, help="Model names (gpt2, google/gemma-2-2b) or local directories; none: the seed's table.")) -> None:
    """Width, layers and the seed's suggested sizes (16x dictionary, groups [1x, 2x, 4x, 9x], k = width/200).

    Each name stands alone: the rows of the names that resolve are printed, then one error line for each
    name that does not (exit status 2)."""
    from .suggest import format_table, from_config, seed_table

    if not names:
        typer.echo(format_table(seed_table()))
        return
    rows, errors = [], []
    for n in names:
        try:
            rows.append(from_config(n))
        except ConfigError as e:
            errors.append(str(e))
    if rows:
        typer.echo(format_table(rows))
    for e in errors:
        typer.echo(f"error: {e}", err=True)
    if errors:
        raise typer.Exit(2)


@cache_app.command("ls")
def cache_ls(root: str = typer.Argument("cache",
                                        help="Directory or URL prefix (s3://bucket/prefix) to search.")) -> None:
    """List the caches under ROOT with model, sites, tokens and size."""
    from .cache.inspect import describe_path, find_caches

    def go() -> None:
        rows = [describe_path(p) for p in find_caches(root)]
        if not rows:
            typer.echo(f"no caches under {root}")
            return
        typer.echo(f"{'path':<48} {'model':<14} {'sites':<28} {'tokens':>12} {'size':>9}  status")
        for r in rows:
            typer.echo(f"{r['path']:<48} {r['model']:<14} {r['sites']:<28} {r['tokens']:>12,} "
                       f"{r['bytes'] / 1e9:>7.3f}GB  {r['status']}")

    _run_guarded(go)


@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="The cache directory or URL.")) -> None:
    """Print a cache's manifest, sizes and statistics."""
    from .cache import Cache
    from .cache.inspect import info_lines

    _run_guarded(lambda: typer.echo("\n".join(info_lines(Cache(path)))))


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="The cache directory or URL."),
                 quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")) -> None:
    """Check shapes, completeness and every chunk's checksum; name each damaged chunk."""
    from .cache import Cache
    from .cache.inspect import verify

    def go() -> int:
        cache = Cache(path)
        damage = verify(cache, progress=not quiet)
        for d in damage:
            typer.echo(f"DAMAGED {d.key}: {d.problem}")
        if damage:
            typer.echo(f"{len(damage)} problem(s) in {path}", err=True)
            return 1
        typer.echo(f"ok: {cache.chunks_committed} chunks x {len(cache.array_names) + 1} arrays verified in {path}")
        return 0

    code = _run_guarded(go)
    if code:
        raise typer.Exit(code)


@cache_app.command("repair")
def cache_repair(path: str = typer.Argument(..., metavar="CACHE", help="A complete cache: directory or URL."),
                 quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.")) -> None:
    """Re-harvest exactly the damaged and missing chunks `cache verify` names (byte-identical), then verify
    again; a healthy cache is left untouched. Takes the cache's writer lock."""
    from .harvest.repair import repair, summary

    _run_guarded(lambda: typer.echo(summary(repair(path, progress=not quiet))))


@cache_app.command("copy")
def cache_copy(src: str = typer.Argument(..., metavar="CACHE", help="A complete cache: directory or URL."),
               dest_root: str = typer.Argument(..., metavar="ROOT", help="A cache root (directory or URL prefix, "
                                               "s3://bucket/cache): the copy lands at ROOT/<model>/<fingerprint>."),
               workers: int = typer.Option(16, "--workers", help="Objects copied at once."),
               quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")) -> None:
    """Copy a complete cache under another cache root, checking every chunk; resumable."""
    from .cache.copy import copy_cache

    if workers < 1:
        raise _fail(f"--workers: {workers} must be at least 1")
    _run_guarded(lambda: check_path(dest_root, "ROOT", "cache copy ", optional=False))
    typer.echo(str(_run_guarded(lambda: copy_cache(src, dest_root, workers=workers, progress=not quiet))))


def _size(n: int) -> str:
    for unit, d in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= d:
            return f"{n / d:.1f} {unit}"
    return f"{n} bytes"


@cache_app.command("rm")
def cache_rm(path: str = typer.Argument(..., metavar="CACHE", help="The cache directory or URL."),
             yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
             break_lock: bool = typer.Option(False, "--break-lock", help="Take over the stale lock of a writer "
                                             "that died (object storage), as `harvest --break-lock` does.")) -> None:
    """Delete a cache, unless a writer (harvest, resume, copy) holds it; only a cache, never another folder."""
    from .cache import Cache
    from .cache.inspect import describe
    from .cache.remove import remove_cache

    def go() -> None:
        cache = Cache(path)
        about = describe(cache)
        what = (f"{path} ({about['model']}, {about['sites']}, {about['tokens']:,} tokens, {_size(about['bytes'])}, "
                f"{about['status']})")
        if not yes:
            if not sys.stdin.isatty():
                raise _fail(f"cache rm: pass --yes to remove {what} without asking")
            typer.confirm(f"remove {what}?", abort=True)
        remove_cache(cache, break_lock)
        typer.echo(f"removed {what}")

    _run_guarded(go)


def main() -> int:
    """The console script. A usage error (an unknown flag, a value of the wrong type) is one line too,
    like every other bad input, rather than click's framed usage block."""
    try:
        from typer._click.exceptions import UsageError  # typer >= 0.2x carries its own click
    except ImportError:
        from click.exceptions import UsageError

    from .cpus import fit_torch_threads

    fit_torch_threads()
    try:
        code = app(prog_name="pipeline", standalone_mode=False)
    except UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "pipeline"
        typer.echo(f"error: {e.format_message()} (see `{where} --help`)", err=True)
        return 2
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        return 1
    code = code if isinstance(code, int) else 0
    if code:  # the command said why in one line: nothing after it (see quiet_exit)
        from .quiet_exit import quiet_abandoned_coroutines

        quiet_abandoned_coroutines()
    return code


if __name__ == "__main__":
    sys.exit(main())
