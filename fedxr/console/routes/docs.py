"""The API's own page: every endpoint with its one-line description (the OpenAPI schema needs a session too)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse

from fedxr.console.pages import ConsoleState
from fedxr.console.routes import protected_router
from fedxr.console.security import SignedIn

router = protected_router()


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request, s: SignedIn, c: ConsoleState):
    schema = request.app.openapi()
    endpoints = [(method.upper(), path, op.get("summary") or op.get("description", "").split("\n")[0])
                 for path, ops in schema["paths"].items() for method, op in ops.items()]
    return c.page(request, "docs.html", s, endpoints=endpoints)
