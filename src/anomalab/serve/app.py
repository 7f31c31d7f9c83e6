"""The FastAPI application of `anomalab serve` (see anomalab.serve for the endpoints and the rules)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomalab import scoring
from anomalab.serve.batcher import Batcher, Busy
from anomalab.serve.model import ServedModel, clean_name
from anomalab.serve.page import PAGE, SCRIPT_HASH, STYLE_HASH

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 2**20  # a larger request body is refused (413) before it is parsed
MAX_IMAGES = 256  # files per request
WINDOW_S = 0.005  # how long the worker waits for more images once one is queued
PAGE_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src '{SCRIPT_HASH}'; style-src '{STYLE_HASH}'; "
                               "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
}
API_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, from its Content-Length before anything
    is read, or as soon as the bytes received pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"the request is over the limit of {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": too_large}, status_code=413, headers=API_HEADERS)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, too_large)
            return message

        return await self.app(scope, limited, send)


def create_app(run_dir: str | Path, onnx: bool = False, token: str | None = None, *,
               batch_size: int = scoring.SCORE_BATCH, window_s: float = WINDOW_S,
               max_request_bytes: int = MAX_REQUEST_BYTES, max_images: int = MAX_IMAGES,
               threads: int | None = None) -> FastAPI:
    """The app serving the detector saved in `run_dir` (a run folder or a saved detector folder).

    onnx: score with ONNX Runtime (the detector exported at start-up) instead of torch. token: when set,
    every request except the page itself (GET /, static, no model data) needs `Authorization: Bearer
    <token>` (401 otherwise). batch_size: rows per scoring call (padded); window_s: how long the worker
    collects concurrent requests into one batch; max_request_bytes, max_images: limits of one request."""
    model = ServedModel(run_dir, onnx=onnx, batch_size=batch_size, threads=threads)
    batcher = Batcher(model.score_batch, model.stack, model.pad, batch_size, window_s,
                      max_pending=max(64 * batch_size, max_images))
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            model.close()

    app = FastAPI(title="anomalab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.model, app.state.batcher = model, batcher
    expected = f"Bearer {token}".encode() if token else None

    def authorise(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong token: send the header Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers={**API_HEADERS, **(exc.headers or {})})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=PAGE_HEADERS)

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        authorise(request)
        return JSONResponse({"status": "ok", "waiting": batcher.pending, **batcher.stats}, headers=API_HEADERS)

    @app.get("/v1/model")
    async def model_info(request: Request) -> JSONResponse:
        authorise(request)
        import fastapi
        import uvicorn

        info = model.describe()
        info["versions"].update(fastapi=fastapi.__version__, uvicorn=uvicorn.__version__)
        info["limits"] = {"max_request_bytes": max_request_bytes, "max_images": max_images,
                          "max_pixels": _max_pixels(), "max_overlay_side": model.max_overlay_side}
        return JSONResponse(info, headers=API_HEADERS)

    @app.post("/v1/score")
    async def score(request: Request, maps: bool = False) -> JSONResponse:
        """Multipart upload of one or more image files (field `images`); maps=true adds the overlays."""
        authorise(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send the images as multipart/form-data, each file in the field 'images'")
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except StarletteHTTPException as e:
            if e.status_code == 413:
                raise
            if "too many files" in str(e.detail).lower():
                raise HTTPException(413, f"more than {max_images} files in one request") from None
            raise HTTPException(400, f"the multipart body could not be read: {e.detail}") from None
        try:
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise HTTPException(400, "no images: send one or more image files in the multipart field 'images'")
            if len(files) > max_images:
                raise HTTPException(413, f"{len(files)} files is over the limit of {max_images} per request")
            names = [clean_name(f.filename, i) for i, f in enumerate(files)]
            blobs = [await f.read() for f in files]
        finally:
            await form.close()
        decoded = await run_in_threadpool(_decode_all, model, blobs, names)
        try:
            future = batcher.submit([prepared for _, prepared in decoded], maps=maps)
        except Busy as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
        try:
            scores, amaps = await asyncio.wrap_future(future)
        except Exception as e:  # a bug in scoring: this request fails, the server carries on
            log.exception("scoring failed")
            raise HTTPException(500, f"scoring failed ({type(e).__name__}: {e})") from None
        if maps and model.overlays:  # PNG encoding: off the event loop
            results = await run_in_threadpool(_results, model, names, decoded, scores, amaps, maps)
        else:
            results = _results(model, names, decoded, scores, amaps, maps)
        body: dict[str, Any] = {"detector": model.det.name, "engine": model.engine,
                                "threshold": None if model.threshold is None else model.threshold.value,
                                "results": results}
        if maps and not model.overlays:
            body["notes"] = model.notes
        return JSONResponse(body, headers=API_HEADERS)

    app.add_middleware(_BodyLimit, limit=max_request_bytes)
    return app


def _max_pixels() -> int:
    from anomalab.data import folder

    return int(folder.MAX_PIXELS)


def _decode_all(model: ServedModel, blobs: list[bytes], names: list[str]) -> list:
    from anomalab.serve.model import Rejected

    out = []
    for data, name in zip(blobs, names):
        try:
            out.append(model.decode(data, name))
        except Rejected as e:
            raise HTTPException(e.status, str(e)) from None
    return out


def _results(model: ServedModel, names, decoded, scores, amaps, maps: bool) -> list[dict[str, Any]]:
    out = []
    for name, (image, _), score, amap in zip(names, decoded, scores, amaps):
        row: dict[str, Any] = {"name": name, "score": score, "verdict": model.verdict(score),
                               "threshold": None if model.threshold is None else model.threshold.value,
                               "size": list(image.shape[1:])}
        if maps:
            row["overlay"] = None if amap is None else model.overlay_png(image, amap)
        out.append(row)
    return out
