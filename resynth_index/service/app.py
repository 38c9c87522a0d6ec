"""The routes: the JSON API under ``/v1``, the pages beside it, and the lifespan around them.

API (every answer JSON; an error is ``{"error": "one line"}``):
  GET  /healthz                 {"ok": true} once the models are loaded (503 before)
  POST /v1/query                multipart: image, caption, candidates (a,b), resyntheses, method,
                                generate (0 for stored resyntheses only); the answer exactly as
                                ``rsx query --json`` prints it. With ``async=1``: 202 {"job": id}
  GET  /v1/jobs/{id}            a job's stage (captioning / generating k of n / embedding), then
                                its answer or error
  GET  /v1/queries/{id}         an audit record (the answer as recorded)
  GET  /v1/queries              history: ?q= (SHA-256 prefix or caption text) &limit= &offset=
  GET  /v1/generators           ``rsx generator list --all --json`` and the pending work orders
  GET  /v1/work-orders.csv      the ``rsx export-prompts`` CSV (?generator= for one)
  GET  /v1/images/{sha256}      a stored image, by its validated hash only
  GET  /v1/worker               the worker: ready, queue, batches so far
Pages: / (query), /query (its form post without script), /queries/{id}, /history, /generators,
/login, /logout, /static/{rsx.js,rsx.css}.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from resynth_index.errors import RsxError
from resynth_index.service import page, records, security
from resynth_index.service.jobs import JOB_ID_CHARS, JobBoard, QueryJob
from resynth_index.service.uploads import (
    UploadRejected,
    display_name,
    private_upload_folder,
    read_upload,
)
from resynth_index.service.worker import BATCH_LIMIT, GATHER_S, QueryWorker, ServiceClosing

if TYPE_CHECKING:
    from resynth_index.lab import Lab

MAX_RESYNTHESES = 64
_STATIC = {"rsx.js": "text/javascript; charset=utf-8", "rsx.css": "text/css; charset=utf-8"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass
class ServiceConfig:
    """How ``rsx serve`` runs: the lab, the device, the token, the limits, the batching."""

    lab_dir: Path
    device: str | None = None
    token: str | None = None
    max_upload_bytes: int = 50 * 1024 * 1024
    gather_s: float = GATHER_S
    batch_limit: int = BATCH_LIMIT


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON as ``rsx query --json`` writes it (``json.dumps(..., sort_keys=True)``)."""
    body = json.dumps(data, sort_keys=True)
    return Response(body, status, headers=headers, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    return json_response({"error": " ".join(str(message).split())}, status)


class Service:
    """What the routes share: the worker, a lab for reading, the jobs, the upload folder."""

    def __init__(self, config: ServiceConfig, worker: QueryWorker | None = None) -> None:
        self.config = config
        self.worker = worker or QueryWorker(
            config.lab_dir,
            config.device,
            gather_s=config.gather_s,
            batch_limit=config.batch_limit,
        )
        self.board = JobBoard()
        self.reader: Lab | None = None
        self.uploads: Path | None = None

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        from resynth_index.lab import Lab

        self.reader = Lab.open(self.config.lab_dir, device=self.config.device)
        self.uploads = private_upload_folder(self.reader.root)  # mode 0700, inside the lab
        self.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(self.worker.stop)  # queued queries finish and are recorded
            self.reader.close()
            shutil.rmtree(self.uploads, ignore_errors=True)

    @property
    def lab(self) -> Lab:
        assert self.reader is not None, "the lifespan opens the lab"
        return self.reader

    async def read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store read off the event loop."""
        return await run_in_threadpool(fn, *args, **kwargs)

    # ------------------------------------------------------------------ queries
    async def accept(self, request: Request) -> tuple[QueryJob, bool] | Response:
        """Stream the upload, check its fields, queue its job: (job, async?) or a refusal."""
        assert self.uploads is not None
        try:
            upload = await read_upload(
                request.headers.get("content-type"),
                request.headers.get("content-length"),
                request.stream(),
                self.uploads,
                self.config.max_upload_bytes,
            )
        except UploadRejected as refusal:
            return error_response(refusal.status, refusal.message)
        assert upload.path is not None
        given_csrf = request.headers.get("x-csrf-token") or upload.text("csrf")
        try:
            if not security.csrf_ok(request.scope, self.config.token, given_csrf):
                raise UploadRejected(403, "the form's CSRF token is missing or wrong")
            job = QueryJob(
                path=upload.path,
                name=display_name(upload.filename),
                caption=(upload.text("caption") or "").strip() or None,
                candidates=_candidates(upload.fields),
                resyntheses=_resyntheses(upload.text("resyntheses")),
                generate=(upload.text("generate") or "1").strip().lower() in _TRUE,
                method=_method(upload.text("method")),
            )
            self.worker.submit(job)
            self.board.add(job)  # for GET /v1/jobs/{id} (a job that ended already is kept too)
        except UploadRejected as refusal:
            upload.discard()
            return error_response(refusal.status, refusal.message)
        except ServiceClosing as closing:
            upload.discard()
            return error_response(503, str(closing))
        return job, (upload.text("async") or "").strip().lower() in _TRUE

    async def api_query(self, request: Request) -> Response:
        accepted = await self.accept(request)
        if isinstance(accepted, Response):
            return accepted
        job, in_background = accepted
        if in_background:
            return json_response(job.snapshot(), 202, {"location": f"/v1/jobs/{job.id}"})
        await _finished(job)
        if job.answer is None:
            return error_response(job.status, job.error or "the query failed")
        return json_response(job.answer)

    async def api_job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = self.board.get(job_id) if len(job_id) == JOB_ID_CHARS else None
        if job is None:
            return error_response(404, "no such job (jobs are kept an hour after they end)")
        return json_response(job.snapshot())

    # ------------------------------------------------------------------ reading the lab
    async def api_record(self, request: Request) -> Response:
        query_id = int(request.path_params["query_id"])
        found = (
            await self.read(records.audit_record, self.lab, query_id) if query_id < 2**62 else None
        )
        if found is None:
            return error_response(404, f"no query {query_id} in this lab's audit")
        return json_response(found)

    async def api_history(self, request: Request) -> Response:
        try:
            limit, offset, q = _paging(request)
        except UploadRejected as refusal:
            return error_response(refusal.status, refusal.message)
        found = await self.read(records.history, self.lab, q, limit=limit, offset=offset)
        return json_response(found.to_json())

    async def api_generators(self, _request: Request) -> Response:
        return json_response(await self.read(records.generators, self.lab))

    async def api_work_orders(self, request: Request) -> Response:
        try:
            text = await self.read(
                records.work_orders_csv, self.lab, request.query_params.get("generator")
            )
        except RsxError as error:
            return error_response(400, str(error))
        disposition = 'attachment; filename="work-orders.csv"'
        return Response(
            text, media_type="text/csv; charset=utf-8", headers={"content-disposition": disposition}
        )

    async def api_image(self, request: Request) -> Response:
        found = await self.read(records.blob_file, self.lab, request.path_params["sha256"])
        if found is None:
            return error_response(404, "no stored image has that SHA-256 (64 lowercase hex)")
        path, media_type = found
        cache = {"cache-control": "private, max-age=86400, immutable"}
        return FileResponse(path, media_type=media_type, headers=cache)

    async def healthz(self, _request: Request) -> Response:
        if self.worker.failure is not None:
            return json_response({"ok": False, "error": self.worker.failure}, 503)
        if self.worker.ready.is_set():
            return json_response({"ok": True})
        return json_response({"ok": False, "loading": True}, 503)

    async def api_worker(self, _request: Request) -> Response:
        return json_response(self.worker.stats())

    # ------------------------------------------------------------------ pages
    def _who(self, request: Request) -> dict[str, Any]:
        """What every page needs to render its forms: the CSRF token, the log-out button."""
        return {
            "csrf": security.csrf_value(self.config.token),
            "logout": request.scope.get("rsx_auth") == "cookie",
        }

    async def page_query(self, request: Request) -> Response:
        active = await self.read(self.lab.generators)
        return HTMLResponse(page.query_page([g.name for g in active], **self._who(request)))

    async def page_query_post(self, request: Request) -> Response:
        """The query form posted without script: answer, then show the answer's page."""
        accepted = await self.accept(request)
        if not isinstance(accepted, Response):
            job, _ = accepted
            await _finished(job)
            if job.answer is not None:
                return RedirectResponse(f"/queries/{job.answer['query_id']}", 303)
            accepted = error_response(job.status, job.error or "the query failed")
        error = json.loads(bytes(accepted.body))["error"]
        active = await self.read(self.lab.generators)
        body = page.query_page([g.name for g in active], error=error, **self._who(request))
        return HTMLResponse(body, accepted.status_code)

    async def page_answer(self, request: Request) -> Response:
        query_id = int(request.path_params["query_id"])
        found = (
            await self.read(records.audit_record, self.lab, query_id) if query_id < 2**62 else None
        )
        if found is None:
            raise HTTPException(404, f"no query {query_id} in this lab's audit")
        return HTMLResponse(page.answer_page(found, **self._who(request)))

    async def page_history(self, request: Request) -> Response:
        try:
            limit, offset, q = _paging(request)
        except UploadRejected as refusal:
            raise HTTPException(refusal.status, refusal.message) from None
        found = await self.read(records.history, self.lab, q, limit=limit, offset=offset)
        return HTMLResponse(page.history_page(found, **self._who(request)))

    async def page_generators(self, request: Request) -> Response:
        listing = await self.read(records.generators, self.lab)
        return HTMLResponse(page.generators_page(listing, **self._who(request)))

    async def page_login(self, request: Request) -> Response:
        if self.config.token is None:
            return RedirectResponse("/", 303)
        if request.method == "GET":
            return HTMLResponse(page.login_page())
        form = await _small_form(request)
        given = (form.get("token") or [""])[0]
        if not security.same_secret(given, self.config.token):
            return HTMLResponse(page.login_page("wrong token"), 401)
        response = RedirectResponse("/", 303)
        response.headers["set-cookie"] = security.session_cookie(self.config.token)
        return response

    async def page_logout(self, request: Request) -> Response:
        form = await _small_form(request)
        if not security.csrf_ok(request.scope, self.config.token, (form.get("csrf") or [""])[0]):
            return error_response(403, "the form's CSRF token is missing or wrong")
        response = RedirectResponse("/login" if self.config.token else "/", 303)
        response.headers["set-cookie"] = security.cleared_cookie()
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return error_response(404, "no such file")
        text = files("resynth_index.service").joinpath("static").joinpath(name).read_text("utf-8")
        return Response(text, media_type=_STATIC[name], headers={"cache-control": "no-cache"})


def create_app(config: ServiceConfig, worker: QueryWorker | None = None) -> security.ASGIApp:
    """The ASGI application of ``rsx serve``, wrapped in its ``security.Guard``."""
    service = Service(config, worker)
    routes = [
        Route("/healthz", service.healthz),
        Route("/v1/query", service.api_query, methods=["POST"]),
        Route("/v1/jobs/{job_id}", service.api_job),
        Route("/v1/queries", service.api_history),
        Route("/v1/queries/{query_id:int}", service.api_record),
        Route("/v1/generators", service.api_generators),
        Route("/v1/work-orders.csv", service.api_work_orders),
        Route("/v1/images/{sha256}", service.api_image),
        Route("/v1/worker", service.api_worker),
        Route("/", service.page_query),
        Route("/query", service.page_query_post, methods=["POST"]),
        Route("/queries/{query_id:int}", service.page_answer),
        Route("/history", service.page_history),
        Route("/generators", service.page_generators),
        Route("/login", service.page_login, methods=["GET", "POST"]),
        Route("/logout", service.page_logout, methods=["POST"]),
        Route("/static/{name}", service.static),
    ]
    app = Starlette(
        routes=routes,
        lifespan=service.lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.service = service
    return security.Guard(app, token=config.token, render_login=page.login_page)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405) and the pages' 404s, as one line of JSON or HTML."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/v1/") or "text/html" not in request.headers.get("accept", ""):
        return error_response(exc.status_code, exc.detail)
    body = f"<!doctype html><title>{exc.status_code}</title><h1>{exc.status_code}</h1>"
    return HTMLResponse(body + f"<p>{page._e(exc.detail)}</p>", exc.status_code)


async def _finished(job: QueryJob) -> None:
    """Wait, without holding a thread, until the worker ends ``job``."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()

    def wake(_job: QueryJob) -> None:
        try:
            loop.call_soon_threadsafe(ended.set)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    job.add_done_callback(wake)
    await ended.wait()


def _candidates(fields: dict[str, list[str]]) -> tuple[str, ...] | None:
    """``candidates=a,b`` (the API) and repeated ``candidate`` boxes (the page's form)."""
    names = [n.strip() for text in fields.get("candidates", []) for n in text.split(",")]
    names += [n.strip() for n in fields.get("candidate", [])]
    chosen = tuple(dict.fromkeys(n for n in names if n))
    return chosen or None


def _method(text: str | None) -> str:
    """The form's ``method`` field: what ``rsx query --method`` takes (resynthesis by default)."""
    from resynth_index.pipeline.fusion_query import QUERY_METHODS

    method = (text or "resynthesis").strip().lower()
    if method not in QUERY_METHODS:
        raise UploadRejected(400, f"method must be one of {', '.join(QUERY_METHODS)}")
    return method


def _resyntheses(text: str | None) -> int | None:
    if text is None or not text.strip():
        return None
    value = text.strip()
    if not value.isdigit() or not 1 <= int(value) <= MAX_RESYNTHESES:
        raise UploadRejected(400, f"resyntheses must be a whole number from 1 to {MAX_RESYNTHESES}")
    return int(value)


def _paging(request: Request) -> tuple[int, int, str]:
    """(limit, offset, q) from the query string, checked (UploadRejected 400 when not)."""
    params = request.query_params
    limit = _bounded(params.get("limit"), "limit", 20, 1, records.MAX_LIMIT)
    offset = _bounded(params.get("offset"), "offset", 0, 0, records.MAX_OFFSET)
    q = params.get("q") or ""
    if len(q) > 200:
        raise UploadRejected(400, "q is at most 200 characters")
    return limit, offset, q


def _bounded(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None or text == "":
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise UploadRejected(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


async def _small_form(request: Request, limit: int = 8192) -> dict[str, list[str]]:
    """A small urlencoded form (login, logout), read with a size limit."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, "the form is too large")
    return parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
