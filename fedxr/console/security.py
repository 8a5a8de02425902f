"""Who may call a route: FastAPI dependencies for "signed in", "a coordinator" and "may see this site".

A route states what it needs in its signature (``s: SignedIn``, ``s: CoordinatorOnly``, ``site: VisibleSite``)
and FastAPI runs the check before the route's own code; the routers also carry ``signed_in`` as a router-level
dependency, so a route added to them cannot forget the session (tests/test_console.py walks the route table).
What a signed-in user may *see* once in (their own site's figures, not the others') is the policy in
``visibility.py``.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from fedxr.console import visibility
from fedxr.console.store import Session, Store

SESSION_COOKIE, LOGIN_CSRF_COOKIE = "fedxr_session", "fedxr_login_csrf"


class NeedsSignIn(Exception):
    """No valid session: pages redirect to the sign-in page, the API answers 401."""


class Forbidden(Exception):
    """Signed in, but not allowed: 403 with a message that says why."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def session_of(request: Request) -> Session | None:
    store: Store = request.app.state.console.store
    return store.session(request.cookies.get(SESSION_COOKIE))


def signed_in(request: Request) -> Session:
    s = session_of(request)
    if s is None:
        raise NeedsSignIn()
    return s


def coordinator(s: Annotated[Session, Depends(signed_in)]) -> Session:
    if not s.user.is_coordinator:
        raise Forbidden("only coordinators may do this")
    return s


def visible_site(site: str, s: Annotated[Session, Depends(signed_in)]) -> str:
    """The route's ``{site}`` path parameter, once the user may see that site."""
    if not visibility.may_see_site(s.user, site):
        raise Forbidden(f"{s.user.name} is a user of {s.user.site}; the page of {site} is for that hospital "
                        "and the coordinators")
    return site


def check_csrf(s: Session, token: str | None) -> None:
    if not token or not secrets.compare_digest(token, s.csrf):
        raise Forbidden("the form's security token is missing or stale; reload the page and try again")


SignedIn = Annotated[Session, Depends(signed_in)]
CoordinatorOnly = Annotated[Session, Depends(coordinator)]
VisibleSite = Annotated[str, Depends(visible_site)]
