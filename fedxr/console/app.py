"""The console web application (FastAPI, server-rendered Jinja2 pages, a little plain JavaScript).

Every route but ``/login``, ``/health`` and ``/static`` needs a signed-in session: pages redirect to the
sign-in page, ``/api/…`` answers 401. A hospital user sees its own site only (others: 403). Every form
POST carries the session's CSRF token (API POSTs send it as ``X-CSRF-Token``); the sign-in form uses a
double-submit cookie. Uploads are read into memory with a size cap and never written to disk; downloads
serve only files an export manifest lists.
"""

from __future__ import annotations

import html
import re
import secrets
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from fedxr import __version__
from fedxr.console import data
from fedxr.console.jobs import RunLauncher
from fedxr.console.predict import MAX_UPLOAD_BYTES, predict_upload
from fedxr.console.store import LockedOut, Session, Store
from fedxr.errors import FedxrError

HERE = Path(__file__).parent
SESSION_COOKIE, LOGIN_CSRF_COOKIE = "fedxr_session", "fedxr_login_csrf"
PUBLIC = ("/login", "/health", "/static")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'",
}


#: Forms are a few short fields: no files, a bounded number of small parts.
FORM_LIMITS = dict(max_files=0, max_fields=8, max_part_size=16_384)
MAX_FORM_BYTES = 64 * 1024


class NeedsSignIn(Exception):
    pass


class Forbidden(Exception):
    def __init__(self, message: str):
        self.message = message


def create_app(runs: str | Path, db: str | Path, exports: str | Path = "export", recipes: str | Path = "recipes",
               startup_kit: str | Path | None = None, secure_cookies: bool = False, warm_up: bool = False) -> FastAPI:
    runs, exports = Path(runs), Path(exports)
    store = Store(db)
    launcher = RunLauncher(Path(recipes), runs, exports)
    federation = None
    if startup_kit:
        from fedxr.console.flare import Federation

        federation = Federation(startup_kit)
    app = FastAPI(title="fedxr console", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.store, app.state.launcher = store, launcher
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    # A model card is Markdown written by the exporter: rendered like the report, escaped, without images.
    templates.env.filters["card_html"] = lambda text: Markup(markdown_to_html(text, lambda _: None))
    if warm_up:  # `fedxr console` loads the models for /try in the background; pages answer meanwhile
        from fedxr.console.predict import warm_up as warm

        ok = [m for m in data.list_models(exports) if m["ok"]]
        app.state.warm_up = warm([exports / m["folder"] for m in ok], [m.get("checkpoint") for m in ok])

    # --- sessions -------------------------------------------------------------------------------------
    def session_of(request: Request) -> Session | None:
        return store.session(request.cookies.get(SESSION_COOKIE))

    def signed_in(request: Request) -> Session:
        s = session_of(request)
        if s is None:
            raise NeedsSignIn()
        return s

    def coordinator(request: Request) -> Session:
        s = signed_in(request)
        if not s.user.is_coordinator:
            raise Forbidden("only coordinators may do this")
        return s

    def check_csrf(s: Session, token: str | None) -> None:
        if not token or not secrets.compare_digest(token, s.csrf):
            raise Forbidden("the form's security token is missing or stale; reload the page and try again")

    def page(request: Request, name: str, s: Session | None, status: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"session": s, "version": __version__, **context},
                                          status_code=status)

    @app.middleware("http")
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

    @app.exception_handler(NeedsSignIn)
    async def needs_sign_in(request: Request, exc: NeedsSignIn):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.message}, status_code=403)
        return page(request, "error.html", session_of(request), 403, title="Not allowed", message=exc.message)

    @app.exception_handler(data.NotFound)
    async def not_found(request: Request, exc: data.NotFound):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=404)
        return page(request, "error.html", session_of(request), 404, title="Not found", message=str(exc))

    # --- public ---------------------------------------------------------------------------------------
    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/"):
        token = secrets.token_urlsafe(24)
        response = page(request, "login.html", None, csrf=token, next=_safe_next(next), error=None)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request):
        form = await request.form(**FORM_LIMITS)
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        nxt = _safe_next(str(form.get("next", "/")))
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
        if not cookie or not secrets.compare_digest(cookie, str(form.get("csrf", ""))):
            raise Forbidden("the sign-in form expired; reload the page and sign in again")
        try:
            # argon2 is deliberately slow: off the event loop, so other requests go on meanwhile.
            token, _ = await run_in_threadpool(store.sign_in, name, password,
                                               request.client.host if request.client else "")
        except LockedOut as exc:
            return _login_again(request, str(exc), nxt, 429)
        except FedxrError as exc:
            return _login_again(request, str(exc), nxt, 401)
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    def _login_again(request: Request, error: str, nxt: str, status: int) -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        response = page(request, "login.html", None, status, csrf=token, next=nxt, error=error)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    # --- signed in ------------------------------------------------------------------------------------
    # Every route from here on sits on a router whose dependency demands a session before the route runs: a
    # route added here cannot forget it (tests/test_console.py checks the route table). Routes still take the
    # session with signed_in(request) where they use it (FastAPI asks the store once per dependency call).
    protected = APIRouter(dependencies=[Depends(signed_in)])
    @protected.post("/logout")
    async def logout(request: Request):
        s = signed_in(request)
        check_csrf(s, str((await request.form(**FORM_LIMITS)).get("csrf", "")))
        store.sign_out(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @protected.get("/", response_class=HTMLResponse)
    def index(request: Request):
        s = signed_in(request)
        return page(request, "index.html", s, runs=data.list_runs(runs), federation=federation.status() if federation else None,
                    launched=launcher.status(), sites=_visible_sites(s))

    @protected.get("/api/runs")
    def api_runs(request: Request) -> list[dict]:
        signed_in(request)
        return data.list_runs(runs)

    @protected.get("/api/federation")
    def api_federation(request: Request) -> dict:
        signed_in(request)
        return federation.status() if federation else {"error": "no --startup-kit given: only local run folders are shown"}

    @protected.get("/runs/new", response_class=HTMLResponse)
    def new_run_page(request: Request):
        s = coordinator(request)
        return page(request, "new_run.html", s, recipes=launcher.recipe_names(), launched=launcher.status(), error=None)

    @protected.post("/runs/new", response_class=HTMLResponse)
    async def new_run(request: Request):
        s = coordinator(request)
        form = await request.form(**FORM_LIMITS)
        check_csrf(s, str(form.get("csrf", "")))
        overrides = [line.strip() for line in str(form.get("overrides", "")).splitlines() if line.strip()]
        try:
            started = await run_in_threadpool(launcher.start, str(form.get("recipe", "")), overrides,
                                              str(form.get("env", "sim")), s.user.name)
        except FedxrError as exc:
            status = 409 if "already going" in str(exc) else 400
            return page(request, "new_run.html", s, status, recipes=launcher.recipe_names(), launched=launcher.status(),
                        error=str(exc))
        store.audit(s.user.name, "run-started", f"{started['recipe']} {' '.join(overrides)} ({started['env']})")
        return RedirectResponse(f"/runs/{quote(started['name'])}", status_code=303)

    @protected.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(request: Request, name: str):
        s = signed_in(request)
        detail = _visible(s, data.run_detail(runs, name))
        return page(request, "run.html", s, run=detail, report_html=_markdown(detail["report"], name),
                    launched=_launched(name, s))

    @protected.get("/api/runs/{name}")
    def api_run(request: Request, name: str) -> dict:
        s = signed_in(request)
        return {**_visible(s, data.run_detail(runs, name)), "launched": _launched(name, s)}

    @protected.get("/api/runs/{name}/progress")
    def api_progress(request: Request, name: str) -> dict:
        """What the run page polls: stages, the round table so far, and a console-started run's state."""
        s = signed_in(request)
        layout = data.run_layout(runs, name)
        launched = _launched(name, s)
        failed = (_failed_stage(layout) if s.user.is_coordinator and launched and not launched["running"]
                  and launched["returncode"] else None)
        return {"stages": data.stages(layout), "rounds": _visible(s, {"rounds": data.rounds(layout)})["rounds"],
                "launched": launched, "failed": failed}

    @protected.get("/runs/{name}/image/{key}")
    def run_image(request: Request, name: str, key: str):
        s = signed_in(request)
        if not s.user.is_coordinator and key in data.PER_SITE_IMAGES:
            raise Forbidden("that picture shows every site's data; it is for the coordinators")
        return FileResponse(data.run_image(runs, name, key), media_type="image/png")

    @protected.get("/sites/{site}", response_class=HTMLResponse)
    def site_page(request: Request, site: str):
        s = signed_in(request)
        _may_see(s, site)
        return page(request, "site.html", s, site=data.site_detail(runs, site))

    @protected.get("/api/sites/{site}")
    def api_site(request: Request, site: str) -> dict:
        s = signed_in(request)
        _may_see(s, site)
        return data.site_detail(runs, site)

    @protected.get("/models", response_class=HTMLResponse)
    def models_page(request: Request):
        s = signed_in(request)
        return page(request, "models.html", s, models=data.list_models(exports))

    @protected.get("/api/models")
    def api_models(request: Request) -> list[dict]:
        signed_in(request)
        return data.list_models(exports)

    @protected.get("/models/{folder}/{file}")
    def download(request: Request, folder: str, file: str):
        s = signed_in(request)
        path = data.model_file(exports, folder, file)
        store.audit(s.user.name, "model-downloaded", f"{folder}/{file}")
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)

    @protected.get("/try", response_class=HTMLResponse)
    def try_page(request: Request):
        s = signed_in(request)
        return page(request, "try.html", s, models=[m for m in data.list_models(exports) if m["ok"]],
                    max_mb=MAX_UPLOAD_BYTES // 2**20)

    @protected.post("/api/predict")
    async def api_predict(request: Request, model: str = ""):
        """The request body is the image file itself (PNG, JPEG or DICOM); ``X-Filename`` names it."""
        s = signed_in(request)
        check_csrf(s, request.headers.get("x-csrf-token"))
        folder = data.model_folder(exports, model)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            return _too_large()
        body = bytearray()
        async for chunk in request.stream():  # read into memory, never to disk, and stop at the cap
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:
                return _too_large()
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.headers.get("x-filename", "upload"))[:100]
        manifest = next((m for m in data.list_models(exports) if m["folder"] == folder.name), {})
        try:
            # In a worker thread: decoding, inference and Grad-CAM must not hold up other requests.
            result = await run_in_threadpool(predict_upload, bytes(body), name, folder, manifest.get("checkpoint"))
        except FedxrError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        store.audit(s.user.name, "prediction", f"{folder.name}: {len(body)} bytes")
        return result

    @protected.get("/docs", response_class=HTMLResponse)
    def docs(request: Request):
        s = signed_in(request)
        schema = app.openapi()
        endpoints = [(method.upper(), path, op.get("summary") or op.get("description", "").split("\n")[0])
                     for path, ops in schema["paths"].items() for method, op in ops.items()]
        return page(request, "docs.html", s, endpoints=endpoints)

    app.include_router(protected)

    @app.middleware("http")
    async def openapi_needs_sign_in(request: Request, call_next):
        if request.url.path == app.openapi_url and session_of(request) is None:
            return JSONResponse({"detail": "sign in first"}, status_code=401)
        return await call_next(request)

    # --- helpers --------------------------------------------------------------------------------------
    def _visible_sites(s: Session) -> list[str]:
        return [x for x in data.sites(runs) if s.user.may_see_site(x)]

    def _may_see(s: Session, site: str) -> None:
        if not s.user.may_see_site(site):
            raise Forbidden(f"{s.user.name} is a user of {s.user.site}; the page of {site} is for that hospital "
                            "and the coordinators")

    def _launched(name: str, s: Session) -> dict | None:
        status = launcher.status()
        if not status or status["name"] != name:
            return None
        keys = ("running", "returncode", "recipe", "env", "user") + (("output_tail",) if s.user.is_coordinator else ())
        return {k: status[k] for k in keys}

    def _visible(s: Session, detail: dict) -> dict:
        """What a hospital user sees of a run: the federation's aggregate and its own site, not the others'
        per-site figures, the report (which has every site's data) or logs. Coordinators see everything."""
        if s.user.is_coordinator:
            return detail
        own = s.user.site
        rounds = [{**r, "sites": {k: v for k, v in r.get("sites", {}).items() if k == own}} for r in detail["rounds"]]
        cross = detail.get("cross_site")
        return {**detail, "rounds": rounds, "report": None,
                "cross_site": {own: cross[own]} if cross and own in cross else None,
                "images": {k: v for k, v in detail.get("images", {}).items() if k not in data.PER_SITE_IMAGES}}

    def _failed_stage(layout) -> dict | None:
        logs = sorted(layout.root.glob("logs/*.log"), key=lambda p: p.stat().st_mtime)
        return {"stage": logs[-1].stem, "log_tail": data.tail(logs[-1], 3000)} if logs else None

    def _markdown(text: str | None, run: str) -> str | None:
        return markdown_to_html(text, lambda src: _image_url(run, src)) if text else None

    def _image_url(run: str, src: str) -> str | None:
        key = next((k for k, v in data.RUN_IMAGES.items() if v == src), None)
        return f"/runs/{quote(run)}/image/{key}" if key else None

    return app


def _safe_next(target: str) -> str:
    """Only a path on this site (no scheme, no host, no `//`) may be where sign-in leads."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _too_large() -> JSONResponse:
    return JSONResponse({"detail": f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload one radiograph "
                                   "(PNG, JPEG or DICOM)"}, status_code=413)


def markdown_to_html(text: str, image_url) -> str:
    """The subset of Markdown fedxr's report and model cards use (headings, tables, images, code blocks, bullet
    lists, a quoted banner, paragraphs), escaped; images are shown only when ``image_url`` maps them to a file
    the console serves."""
    out, table, code, items = [], [], None, []

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    def flush_table():
        if table:
            rows = [r for r in table if not re.match(r"^\|[-:|\s]+\|$", r)]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            if not cells:
                table.clear()
                return
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            table.clear()

    def flush_items():
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if code is not None:
            if line.startswith("```"):
                out.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush_items()
        if line.startswith("> "):
            out.append(f'<p class="error banner">{inline(line[2:])}</p>')
        elif line.startswith("```"):
            code = []
        elif m := re.match(r"^(#{1,4}) (.*)$", line):
            level = len(m.group(1)) + 1  # the page has its own h1
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line.strip()):
            url = image_url(m.group(2))
            if url:
                out.append(f'<img src="{html.escape(url)}" alt="{html.escape(m.group(1))}">')
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    flush_items()
    if code is not None:  # an unclosed code block: show what it holds
        out.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
    return "\n".join(out)
