"""The home page, run pages and their live progress, and starting a run (coordinators)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from fedxr.console import data, visibility
from fedxr.console.markdown import markdown_to_html
from fedxr.console.pages import FORM_LIMITS, ConsoleState
from fedxr.console.routes import protected_router
from fedxr.console.security import CoordinatorOnly, Forbidden, SignedIn, check_csrf
from fedxr.errors import FedxrError

router = protected_router()


@router.get("/", response_class=HTMLResponse)
def index(request: Request, s: SignedIn, c: ConsoleState):
    return c.page(request, "index.html", s, runs=data.list_runs(c.runs),
                  federation=c.federation.status() if c.federation else None, launched=c.launcher.status(),
                  sites=visibility.visible_sites(s.user, data.sites(c.runs)))


@router.get("/api/runs")
def api_runs(c: ConsoleState) -> list[dict]:
    return data.list_runs(c.runs)


@router.get("/api/federation")
def api_federation(c: ConsoleState) -> dict:
    if c.federation is None:
        return {"error": "no --startup-kit given: only local run folders are shown"}
    return c.federation.status()


@router.get("/runs/new", response_class=HTMLResponse)
def new_run_page(request: Request, s: CoordinatorOnly, c: ConsoleState):
    return c.page(request, "new_run.html", s, recipes=c.launcher.recipe_names(), launched=c.launcher.status(),
                  error=None)


@router.post("/runs/new", response_class=HTMLResponse)
async def new_run(request: Request, s: CoordinatorOnly, c: ConsoleState):
    form = await request.form(**FORM_LIMITS)
    check_csrf(s, str(form.get("csrf", "")))
    overrides = [line.strip() for line in str(form.get("overrides", "")).splitlines() if line.strip()]
    try:
        started = await run_in_threadpool(c.launcher.start, str(form.get("recipe", "")), overrides,
                                          str(form.get("env", "sim")), s.user.name)
    except FedxrError as exc:
        status = 409 if "already going" in str(exc) else 400
        return c.page(request, "new_run.html", s, status, recipes=c.launcher.recipe_names(),
                      launched=c.launcher.status(), error=str(exc))
    c.store.audit(s.user.name, "run-started", f"{started['recipe']} {' '.join(overrides)} ({started['env']})")
    return RedirectResponse(f"/runs/{quote(started['name'])}", status_code=303)


@router.get("/runs/{name}", response_class=HTMLResponse)
def run_page(request: Request, name: str, s: SignedIn, c: ConsoleState):
    detail = visibility.run_detail(s.user, data.run_detail(c.runs, name))
    report = detail["report"]
    return c.page(request, "run.html", s, run=detail,
                  report_html=markdown_to_html(report, lambda src: _image_url(name, src)) if report else None,
                  launched=visibility.launched_run(s.user, c.launcher.status(), name))


@router.get("/api/runs/{name}")
def api_run(name: str, s: SignedIn, c: ConsoleState) -> dict:
    return {**visibility.run_detail(s.user, data.run_detail(c.runs, name)),
            "launched": visibility.launched_run(s.user, c.launcher.status(), name)}


@router.get("/api/runs/{name}/progress")
def api_progress(name: str, s: SignedIn, c: ConsoleState) -> dict:
    """What the run page polls: stages, the round table so far, and a console-started run's state."""
    layout = data.run_layout(c.runs, name)
    launched = visibility.launched_run(s.user, c.launcher.status(), name)
    failed = (_failed_stage(layout) if visibility.may_see_logs(s.user) and launched and not launched["running"]
              and launched["returncode"] else None)
    return {"stages": data.stages(layout), "rounds": visibility.rounds(s.user, data.rounds(layout)),
            "run_state": visibility.run_state(s.user, data.run_state(layout)), "launched": launched, "failed": failed}


@router.get("/runs/{name}/image/{key}")
def run_image(name: str, key: str, s: SignedIn, c: ConsoleState):
    if not visibility.may_see_image(s.user, key):
        raise Forbidden("that picture shows every site's data; it is for the coordinators")
    return FileResponse(data.run_image(c.runs, name, key), media_type="image/png")


def _failed_stage(layout) -> dict | None:
    logs = sorted(layout.root.glob("logs/*.log"), key=lambda p: p.stat().st_mtime)
    return {"stage": logs[-1].stem, "log_tail": data.tail(logs[-1], 3000)} if logs else None


def _image_url(run: str, src: str) -> str | None:
    key = next((k for k, v in data.RUN_IMAGES.items() if v == src), None)
    return f"/runs/{quote(run)}/image/{key}" if key else None
