"""A site's page: its data and its rows in every run — for that hospital's users and the coordinators."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse

from fedxr.console import data
from fedxr.console.pages import ConsoleState
from fedxr.console.routes import protected_router
from fedxr.console.security import SignedIn, VisibleSite

router = protected_router()


@router.get("/sites/{site}", response_class=HTMLResponse)
def site_page(request: Request, site: VisibleSite, s: SignedIn, c: ConsoleState):
    return c.page(request, "site.html", s, site=data.site_detail(c.runs, site))


@router.get("/api/sites/{site}")
def api_site(site: VisibleSite, c: ConsoleState) -> dict:
    return data.site_detail(c.runs, site)
