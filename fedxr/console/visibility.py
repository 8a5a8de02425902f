"""What a signed-in user may see: the console's one privacy rule, in one place.

A coordinator sees everything. A hospital user sees the federation's aggregate and its own site: its own
site's page, its own row in each round and in the cross-site table, pictures that show no other site's
data — never another site's page or figures, the run report (it tabulates every site's data), a run's
logs or a failed stage's output. Plain functions of the user (no web framework), so every route × role ×
site case is tested as a table (tests/test_console_visibility.py) and the routes only call them.
"""

from __future__ import annotations

from typing import Any, Iterable

from fedxr.console.store import User

#: Run pictures that show every site's data side by side (the round table, the cross-site matrix, each site's
#: label prevalence): for coordinators only.
PER_SITE_IMAGES = ("rounds", "cross_site", "prevalence", "edge_federation")  # the edge plot: one site's scores


def may_see_site(user: User, site: str) -> bool:
    return user.is_coordinator or user.site == site


def visible_sites(user: User, sites: Iterable[str]) -> list[str]:
    return [s for s in sites if may_see_site(user, s)]


def may_see_image(user: User, key: str) -> bool:
    return user.is_coordinator or key not in PER_SITE_IMAGES


def may_see_logs(user: User) -> bool:
    """A run's logs and a failed stage's output name every site's files and figures."""
    return user.is_coordinator


def run_detail(user: User, detail: dict[str, Any]) -> dict[str, Any]:
    """A run as ``user`` may see it: the aggregate and its own site; not the others' per-site figures, the
    report or per-site pictures."""
    if user.is_coordinator:
        return detail
    own = user.site
    rounds = [{**r, "sites": {k: v for k, v in r.get("sites", {}).items() if k == own}}
              for r in detail.get("rounds", [])]
    cross = detail.get("cross_site")
    return {**detail, "rounds": rounds, "report": None, "run_state": run_state(user, detail.get("run_state")),
            "cross_site": {own: cross[own]} if cross and own in cross else None,
            "images": {k: v for k, v in detail.get("images", {}).items() if may_see_image(user, k)}}


def run_state(user: User, status: dict[str, Any] | None) -> dict[str, Any] | None:
    """How `fedxr run` stands: for a hospital user only the state and stage (its error, process and host are the
    coordinators')."""
    if status is None or may_see_logs(user):
        return status
    return {k: status[k] for k in ("state", "stage") if k in status}


def rounds(user: User, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return run_detail(user, {"rounds": table})["rounds"]


def launched_run(user: User, status: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """A console-started run's state on the page of run ``name``; its output only for coordinators."""
    if not status or status.get("name") != name:
        return None
    keys = ("running", "returncode", "recipe", "env", "user") + (("output_tail",) if may_see_logs(user) else ())
    return {k: status[k] for k in keys}
