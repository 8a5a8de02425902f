"""The console web application (FastAPI, server-rendered Jinja2 pages, a little plain JavaScript).

Every route but ``/login``, ``/health`` and ``/static`` needs a signed-in session: pages redirect to the
sign-in page, ``/api/…`` answers 401. Who may call what is declared with FastAPI dependencies
(``security.py``: signed in, coordinator, may see this site) and what a hospital user may see is one policy
(``visibility.py``); the routes live in one router per area (``routes/``). Every form POST carries the
session's CSRF token (API POSTs send it as ``X-CSRF-Token``); the sign-in form uses a double-submit cookie.
Uploads are read into memory with a size cap and never written to disk; downloads serve only files an
export manifest lists.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from fedxr import __version__
from fedxr.console import data
from fedxr.console.jobs import RunLauncher
from fedxr.console.markdown import markdown_to_html
from fedxr.console.pages import MAX_FORM_BYTES, Console
from fedxr.console.routes import auth, docs, models, sites
from fedxr.console.routes import runs as run_pages
from fedxr.console.security import Forbidden, NeedsSignIn, session_of
from fedxr.console.store import Store

__all__ = ["create_app", "markdown_to_html"]

HERE = Path(__file__).parent
PUBLIC = ("/login", "/health", "/static")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'",
}


def create_app(runs: str | Path, db: str | Path, exports: str | Path = "export", recipes: str | Path = "recipes",
               startup_kit: str | Path | None = None, secure_cookies: bool = False, warm_up: bool = False) -> FastAPI:
    runs, exports = Path(runs), Path(exports)
    federation = None
    if startup_kit:
        from fedxr.console.flare import Federation

        federation = Federation(startup_kit)
    app = FastAPI(title="fedxr console", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    templates = Jinja2Templates(directory=HERE / "templates")
    # A model card is Markdown written by the exporter: rendered like the report, escaped, without images.
    templates.env.filters["card_html"] = lambda text: Markup(markdown_to_html(text, lambda _: None))
    console = Console(runs=runs, exports=exports, store=Store(db), launcher=RunLauncher(Path(recipes), runs, exports),
                      templates=templates, federation=federation, secure_cookies=secure_cookies)
    app.state.console = console
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if warm_up:  # `fedxr console` loads the models for /try in the background; pages answer meanwhile
        from fedxr.console.predict import warm_up as warm

        ok = [m for m in data.list_models(exports) if m["ok"]]
        app.state.warm_up = warm([exports / m["folder"] for m in ok], [m.get("checkpoint") for m in ok])

    _add_middleware(app)
    _add_error_pages(app, console)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    app.include_router(auth.public)
    for router in (auth.router, run_pages.router, sites.router, models.router, docs.router):
        app.include_router(router)
    return app


def _add_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def openapi_needs_sign_in(request: Request, call_next):
        if request.url.path == app.openapi_url and session_of(request) is None:
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return await call_next(request)

    @app.middleware("http")  # added last, so it runs first: its headers go on every answer, refusals included
    async def headers(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if (request.method == "POST" and request.url.path != "/api/predict"
                and (not length.isdigit() or int(length) > MAX_FORM_BYTES)):
            # Forms are small; anything else (or a streamed body of unknown size) is refused before parsing.
            response = JSONResponse({"detail": "request body missing its length or larger than a form"}, status_code=413)
            response.headers.update(SECURITY_HEADERS)
            return response
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith("/static"):
            response.headers["Cache-Control"] = "no-store"
        return response


def _add_error_pages(app: FastAPI, console: Console) -> None:
    """The API answers JSON with a status; pages answer the sign-in redirect or an error page."""

    @app.exception_handler(NeedsSignIn)
    async def needs_sign_in(request: Request, exc: NeedsSignIn):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.message}, status_code=403)
        return console.page(request, "error.html", session_of(request), 403, title="Not allowed", message=exc.message)

    @app.exception_handler(data.NotFound)
    async def not_found(request: Request, exc: data.NotFound):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return console.page(request, "error.html", session_of(request), 404, title="Not found", message=str(exc))
