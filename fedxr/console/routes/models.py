"""Exported models: the list with their cards, downloads of the files a manifest lists, and trying a model on
an uploaded radiograph (read into memory, never written to disk)."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from fedxr.console import data
from fedxr.console.pages import ConsoleState
from fedxr.console.predict import MAX_UPLOAD_BYTES, predict_upload
from fedxr.console.routes import protected_router
from fedxr.console.security import SignedIn, check_csrf
from fedxr.errors import FedxrError

router = protected_router()


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, s: SignedIn, c: ConsoleState):
    return c.page(request, "models.html", s, models=data.list_models(c.exports))


@router.get("/api/models")
def api_models(c: ConsoleState) -> list[dict]:
    return data.list_models(c.exports)


@router.get("/models/{folder}/{file}")
def download(folder: str, file: str, s: SignedIn, c: ConsoleState):
    path = data.model_file(c.exports, folder, file)
    c.store.audit(s.user.name, "model-downloaded", f"{folder}/{file}")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.get("/try", response_class=HTMLResponse)
def try_page(request: Request, s: SignedIn, c: ConsoleState):
    return c.page(request, "try.html", s, models=[m for m in data.list_models(c.exports) if m["ok"]],
                  max_mb=MAX_UPLOAD_BYTES // 2**20)


@router.post("/api/predict")
async def api_predict(request: Request, s: SignedIn, c: ConsoleState, model: str = ""):
    """The request body is the image file itself (PNG, JPEG or DICOM); ``X-Filename`` names it."""
    check_csrf(s, request.headers.get("x-csrf-token"))
    folder = data.model_folder(c.exports, model)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        return too_large()
    body = bytearray()
    async for chunk in request.stream():  # read into memory, never to disk, and stop at the cap
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES:
            return too_large()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.headers.get("x-filename", "upload"))[:100]
    manifest = next((m for m in data.list_models(c.exports) if m["folder"] == folder.name), {})
    try:
        # In a worker thread: decoding, inference and Grad-CAM must not hold up other requests.
        result = await run_in_threadpool(predict_upload, bytes(body), name, folder, manifest.get("checkpoint"))
    except FedxrError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)
    c.store.audit(s.user.name, "prediction", f"{folder.name}: {len(body)} bytes")
    return result


def too_large() -> JSONResponse:
    return JSONResponse({"detail": f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload one radiograph "
                                   "(PNG, JPEG or DICOM)"}, status_code=413)
