"""The site of runs on object storage: what is fetched into the local copy, and how the pages go back.

A cache's runs folder on a bucket is browsed through its local copy (:class:`~matryoshka.run_folder.Workspace`):
each browsed run's checkpoint (without the optimiser state) and ``eval.json``, every run's ``eval.json`` (the
runs page compares them all), and the pages of the site's other runs, so the runs page links them as a local
site would and ``--serve`` serves the whole site. The site is built in the copy's ``browse/`` and published
next to the report: each rebuilt run's folder (its data before its pages, then its objects that the new
build no longer has removed), then ``static/``, then ``index.html`` last, so the runs page never links pages
that are not there yet. A local folder is its own copy: nothing is fetched or published.
"""
from __future__ import annotations

from collections.abc import Callable, Collection

from ..run_folder import CHECKPOINTS, Place

SITE = "browse"
"""The site's folder in a cache's runs folder, next to ``report.md``."""


def run_files(key: str) -> bool:
    """What the site needs of a browsed run: its dictionary and its eval.json (not its optimiser state,
    metrics or exports)."""
    return key.split("/")[0] in CHECKPOINTS or key == "eval.json"


def folder_files(rebuilt: Collection[str], with_site: bool) -> Callable[[str], bool]:
    """What the site needs of the cache's folder: every run's eval.json and, when the site is to be published
    there (``with_site``), its pages of runs not rebuilt now (the runs page links those, ``--serve`` serves them)."""
    def keep(key: str) -> bool:
        parts = key.split("/")
        if len(parts) == 2:
            return parts[1] == "eval.json" and parts[0] not in rebuilt  # those come with their run's fetch
        return with_site and len(parts) > 2 and parts[0] == SITE and parts[1] not in {*rebuilt, "static"}
    return keep


def publish_run(folder: Place, name: str) -> None:
    """The site's folder of run ``name`` home, replacing what is there: objects the new build does not have
    (shards of an earlier, wider dictionary of the same name) are removed after the upload."""
    pages = f"{SITE}/{name}"
    folder.publish(pages)
    built = {p.relative_to(folder.work / pages).as_posix() for p in (folder.work / pages).rglob("*") if p.is_file()}
    for key in folder.home.join(SITE, name).listing():
        if key not in built:
            folder.home.remove_object(f"{pages}/{key}")


def publish_index(folder: Place) -> None:
    """The site's static files, then its runs page, home."""
    folder.publish(f"{SITE}/static", f"{SITE}/index.html")
