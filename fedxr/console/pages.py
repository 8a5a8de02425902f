"""What every route of the console shares: the folders it serves, its services, and how a page is drawn.

``create_app`` builds one :class:`Console` and keeps it in ``app.state.console``; routes take it with the
``ConsoleState`` dependency instead of closing over ``create_app``'s locals, so each area of the console
lives in its own router module (``routes/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from fedxr import __version__
from fedxr.console.jobs import RunLauncher
from fedxr.console.store import Session, Store

#: Forms are a few short fields: no files, a bounded number of small parts.
FORM_LIMITS: dict[str, Any] = dict(max_files=0, max_fields=8, max_part_size=16_384)
MAX_FORM_BYTES = 64 * 1024


@dataclass
class Console:
    runs: Path
    exports: Path
    store: Store
    launcher: RunLauncher
    templates: Jinja2Templates
    federation: Any = None          # fedxr.console.flare.Federation with --startup-kit, else None
    secure_cookies: bool = False

    def page(self, request: Request, name: str, s: Session | None, status: int = 200, **context) -> HTMLResponse:
        return self.templates.TemplateResponse(request, name, {"session": s, "version": __version__, **context},
                                               status_code=status)


def console(request: Request) -> Console:
    return request.app.state.console


ConsoleState = Annotated[Console, Depends(console)]
