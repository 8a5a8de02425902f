"""Where a site's data lives: a site fact, never a recipe key.

A site finds its manifest, in order:

1. ``FEDXR_SITE_MANIFEST`` — the path of this site's manifest (``site-N.csv``), set in the site's own
   environment (production: in the shell that runs ``startup/start.sh``);
2. ``FEDXR_SITES_DIR`` — a folder holding ``<site name>.csv`` (convenient in POC on one machine);
3. the manifest folder passed by fedxr in simulation (``--sites-dir``, written by ``fedxr data split``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fedxr.errors import DataError

SITE_MANIFEST_ENV = "FEDXR_SITE_MANIFEST"
SITES_DIR_ENV = "FEDXR_SITES_DIR"


def resolve_site_manifest(site: str, sites_dir: str | Path | None = None) -> Path:
    """The manifest path for ``site``, or a DataError naming the site and what to set."""
    tried = []
    if os.environ.get(SITE_MANIFEST_ENV):
        candidates = [Path(os.environ[SITE_MANIFEST_ENV])]
    else:
        candidates = [Path(d) / f"{site}.csv" for d in (os.environ.get(SITES_DIR_ENV), sites_dir) if d]
    for path in candidates:
        tried.append(str(path))
        if path.is_file():
            return path
    where = f" (looked at {', '.join(tried)})" if tried else ""
    raise DataError(
        f"site {site!r} has no data{where}. Set {SITE_MANIFEST_ENV}=/path/to/{site}.csv in this site's "
        f"environment (or {SITES_DIR_ENV} to a folder holding {site}.csv); manifests are written by "
        "`fedxr data split ROOT --out DIR`."
    )
