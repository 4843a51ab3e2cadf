"""`pipeline evaluate --sae FOLDER`: a SAELens dictionary evaluated on a cache, beside the cache's own runs.

The folder's ``cfg.json`` must name the cache's model, a hook the cache holds (and, for a transcoder, an
output hook it holds), and widths equal to those arrays' widths; anything else is refused in one line
before any evaluation starts. Its results go where a trained run's do, ``RUNS_DIR/<fingerprint>/NAME/``
(``eval.json``, ``eval.npz``; under ``results_dir`` if given), so the cache's comparison table and report
list it with the runs. NAME is the folder's name (``<run>-saelens`` for an export's ``saelens/`` folder),
which may be a URL (fetched first).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cache import Cache, CacheError
from ..cache.location import Location
from ..models import model_info, resolve_name
from ..run_folder import Workspace, is_trained
from ..train.saelens import SAELensConfig, SAELensDictionary, read_saelens, read_saelens_config


def _same_model(name: str | None, cache: Cache) -> bool:
    """The SAE's ``model_name`` and the cache's model are one model: the same resolved Hub id or path, or
    (a local folder) the same weights."""
    m = cache.manifest.get("model") or {}
    if name is None or not m:
        return False
    if resolve_name(name) in (m.get("resolved"), resolve_name(m.get("name", ""))):
        return True
    local = Path(name).expanduser().is_dir()
    return local and model_info(name).identity == cache.manifest.get("identity", {}).get("model")


def _array(cache: Cache, hook: str | None) -> str | None:
    return next((a for a, info in cache.manifest["arrays"].items() if info.get("hook_name") == hook), None)


def _name(c: SAELensConfig) -> str:
    folder = c.folder.resolve()
    return f"{folder.parent.name}-{folder.name}" if folder.name == "saelens" else folder.name


def check_sae(folder: str, cache: Cache, runs_dir: str | Path,
              space: Workspace) -> tuple[SAELensConfig, dict[str, Any], Location]:
    """The folder's config, its run config on ``cache`` (source and target arrays, name) and its output
    folder; a CacheError naming the mismatch when the cache's model, hooks or widths are not its own. A
    folder on object storage is fetched into ``space`` first."""
    given = Location.of(folder)
    if given.remote:
        place = space.place(given)
        place.fetch()
        c = read_saelens_config(place.work)
    else:
        c = read_saelens_config(folder)
    where = f"evaluate: --sae {folder!r}"
    if not _same_model(c.model_name, cache):
        m = cache.manifest.get("model") or {}
        held = m.get("resolved") or m.get("name") or f"no model (a {cache.manifest.get('source', 'model')} cache)"
        raise CacheError(f"{where} is for model {c.model_name!r}, but cache {cache.path!r} holds {held}")
    hooks = ", ".join(info.get("hook_name", a) for a, info in cache.manifest["arrays"].items())
    arrays = {}
    for role, hook, width in (("hook_name", c.hook_name, c.d_in),) + (
            (("hook_name_out", c.hook_name_out, c.d_out),) if c.transcoder else ()):
        arrays[role] = _array(cache, hook)
        if arrays[role] is None:
            raise CacheError(f"{where}: its {role} {hook!r} is not in cache {cache.path!r}; it holds {hooks}")
        have = cache.manifest["arrays"][arrays[role]]["width"]
        if have != width:
            raise CacheError(f"{where}: its width at {hook!r} is {width}, but the cache's is {have}")
    name = _name(c)
    out = Location.of(runs_dir).join(cache.fingerprint, name)
    if is_trained(out):
        raise CacheError(f"{where} would be named {name!r}, which is a trained run of this cache; rename the folder")
    run_cfg = {"name": name, "arch": c.architecture, "width": c.width, "k": c.k, "group_sizes": c.group_sizes,
               "source": arrays["hook_name"], "target": arrays.get("hook_name_out"), "transcoder": c.transcoder,
               "cache": cache.path, "fingerprint": cache.fingerprint,
               "sae": str(given) if given.remote else str(c.folder.resolve())}
    return c, run_cfg, out


def check_saes(folders: list[str], cache: Cache, runs_dir: str | Path,
               space: Workspace) -> list[tuple[SAELensConfig, dict[str, Any], Location]]:
    """:func:`check_sae` for every folder, all before any is evaluated; two that would share a name are refused."""
    checked, seen = [], {}
    for folder in folders:
        c, cfg, out = check_sae(folder, cache, runs_dir, space)
        if cfg["name"] in seen:
            raise CacheError(f"evaluate: --sae {folder!r} and --sae {seen[cfg['name']]!r} would both be named "
                             f"{cfg['name']!r}; rename one folder")
        seen[cfg["name"]] = folder
        checked.append((c, cfg, out))
    return checked


def load_sae(c: SAELensConfig, cfg: dict[str, Any], device: str = "cpu") -> SAELensDictionary:
    """The checked SAE's dictionary, its ``config`` the run config of :func:`check_sae`."""
    dic = read_saelens(c, device)  # checked by check_sae: not read again
    dic.config = cfg
    return dic
