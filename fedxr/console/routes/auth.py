"""Signing in and out. ``/login`` is public; its form is protected by a double-submit cookie (there is no
session yet to hold a CSRF token), and ``next`` may only lead to a path on this site."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from fedxr.console.pages import FORM_LIMITS, ConsoleState
from fedxr.console.routes import protected_router
from fedxr.console.security import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Forbidden, SignedIn, check_csrf
from fedxr.console.store import LockedOut
from fedxr.errors import FedxrError

public = APIRouter()
router = protected_router()


def safe_next(target: str) -> str:
    """Only a path on this site (no scheme, no host, no `//`) may be where sign-in leads."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _login_page(request, c, nxt: str, error: str | None = None, status: int = 200) -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    response = c.page(request, "login.html", None, status, csrf=token, next=nxt, error=error)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=c.secure_cookies)
    return response


@public.get("/login", response_class=HTMLResponse)
def login_page(request: Request, c: ConsoleState, next: str = "/"):
    return _login_page(request, c, safe_next(next))


@public.post("/login", response_class=HTMLResponse)
async def login(request: Request, c: ConsoleState):
    form = await request.form(**FORM_LIMITS)
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    nxt = safe_next(str(form.get("next", "/")))
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not cookie or not secrets.compare_digest(cookie, str(form.get("csrf", ""))):
        raise Forbidden("the sign-in form expired; reload the page and sign in again")
    try:
        # argon2 is deliberately slow: off the event loop, so other requests go on meanwhile.
        token, _ = await run_in_threadpool(c.store.sign_in, name, password,
                                           request.client.host if request.client else "")
    except LockedOut as exc:
        return _login_page(request, c, nxt, str(exc), 429)
    except FedxrError as exc:
        return _login_page(request, c, nxt, str(exc), 401)
    response = RedirectResponse(nxt, status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=c.secure_cookies)
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request, s: SignedIn, c: ConsoleState):
    check_csrf(s, str((await request.form(**FORM_LIMITS)).get("csrf", "")))
    c.store.sign_out(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response
