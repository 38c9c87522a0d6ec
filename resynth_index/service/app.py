"""The routes: the JSON API under ``/v1``, the pages beside it, and the lifespan around them.

API (every answer JSON; an error is ``{"error": "one line"}``):
  GET  /healthz                 {"ok": true} when the worker is ready and the database answers
                                (503 otherwise, saying which)
  POST /v1/query                multipart: image, caption, candidates (a,b), resyntheses, method,
                                generate (0 for stored resyntheses only); the answer exactly as
                                ``rsx query --json`` prints it. With ``async=1``: 202 {"job": id}.
                                A full queue: 503 with Retry-After
  GET  /v1/jobs/{id}            a job's stage (captioning / generating k of n / embedding), then
                                its answer or error
  GET  /v1/queries/{id}         an audit record (the answer as recorded; ``?pretty=1`` indents)
  GET  /v1/queries              history: ?q= (SHA-256 prefix or caption text) &verdict=
                                &limit= &offset= (entries carry their margin)
  GET  /v1/generators           ``rsx generator list --all --json`` and the pending work orders
  GET  /v1/work-orders.csv      the ``rsx export-prompts`` CSV (?generator= for one)
  GET  /v1/images/{sha256}      a stored image, by its validated hash only
  GET  /v1/worker               the worker: ready, queue, batches so far
  GET  /v1/stats                the worker's counts and the service's (requests, refusals)
Pages: / (query), /query (its form post without script), /queries/{id}, /history, /generators,
/login, /logout, /static/{rsx.js,rsx.css}.

Nothing a client sends makes a traceback: a malformed number or id is 400 or 404 naming the
field, a client that hangs up mid-upload is counted, a failing database is 503 in one line. Only a
bug of the service itself logs a traceback (and answers 500).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections import Counter
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
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from resynth_index.errors import RsxError
from resynth_index.service import page, records, security
from resynth_index.service.jobs import JOB_ID_CHARS, JobBoard, QueryJob
from resynth_index.service.responses import (
    BadField,
    error_response,
    json_response,
    public_message,
    record_id,
    whole_number,
)
from resynth_index.service.uploads import (
    INLINE_BYTES,
    UploadRejected,
    display_name,
    image_size,
    private_upload_folder,
    read_upload,
)
from resynth_index.service.worker import (
    BATCH_LIMIT,
    BATCH_PIXELS,
    GATHER_S,
    JOB_TTL_S,
    LOADING,
    QUEUE_LIMIT,
    STOP_TIMEOUT_S,
    QueryWorker,
    ServiceBusy,
    ServiceClosing,
)

if TYPE_CHECKING:
    from resynth_index.lab import Lab

log = logging.getLogger("rsx.serve")

MAX_RESYNTHESES = 64
#: The largest image (decoded pixels) the service takes by default: a quarter of the CLI's
#: 64 megapixels (``rsx serve --max-pixels``).
SERVICE_MAX_PIXELS = 16_000_000
DATABASE_CHECK_S = 5.0
_STATIC = {"rsx.js": "text/javascript; charset=utf-8", "rsx.css": "text/css; charset=utf-8"}
_TRUE = {"1", "true", "yes", "on"}


@dataclass
class ServiceConfig:
    lab_dir: Path
    device: str | None = None
    token: str | None = None
    max_upload_bytes: int = 50 * 1024 * 1024
    max_pixels: int = SERVICE_MAX_PIXELS
    gather_s: float = GATHER_S
    batch_limit: int = BATCH_LIMIT
    queue_limit: int = QUEUE_LIMIT
    job_ttl_s: float = JOB_TTL_S
    batch_pixels: int = BATCH_PIXELS
    stop_timeout_s: float = STOP_TIMEOUT_S

    def worker(self) -> QueryWorker:
        """The model worker these settings describe."""
        return QueryWorker(
            self.lab_dir,
            self.device,
            gather_s=self.gather_s,
            batch_limit=self.batch_limit,
            queue_limit=self.queue_limit,
            job_ttl_s=self.job_ttl_s,
            batch_pixels=self.batch_pixels,
        )


class Service:
    """What the routes share: the worker, a lab for reading, the jobs, the upload folder, the
    login sessions and the counters."""

    def __init__(
        self,
        config: ServiceConfig,
        worker: QueryWorker | None = None,
        counts: Counter[str] | None = None,
    ) -> None:
        self.config = config
        self.worker = worker or config.worker()
        self.board = JobBoard()
        self.reader: Lab | None = None
        self.uploads: Path | None = None
        self.sessions = security.Sessions()
        self.logins = security.LoginThrottle()
        self.counts = counts if counts is not None else Counter()  # GET /v1/stats

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        from resynth_index.lab import Lab

        self.reader = Lab.open(self.config.lab_dir, device=self.config.device)
        self.uploads = private_upload_folder(self.reader.root)  # mode 0700, inside the lab
        self.worker.start()
        try:
            yield
        finally:
            # queued queries finish and are recorded, within the stop's bound
            await run_in_threadpool(self.worker.stop, self.config.stop_timeout_s)
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
        except ClientDisconnect:  # the client hung up mid-upload: nobody is left to answer
            self.counts["client hung up"] += 1
            return error_response(400, "the client hung up before the upload ended")
        assert upload.path is not None
        given_csrf = request.headers.get("x-csrf-token") or upload.text("csrf")
        try:
            if not security.csrf_ok(request.scope, self.sessions, given_csrf):
                raise UploadRejected(403, "the form's CSRF token is missing or wrong")
            job = QueryJob(
                path=upload.path,
                name=display_name(upload.filename),
                caption=(upload.text("caption") or "").strip() or None,
                candidates=_candidates(upload.fields),
                resyntheses=whole_number(
                    upload.text("resyntheses"), "resyntheses", 1, MAX_RESYNTHESES, None
                ),
                generate=(upload.text("generate") or "1").strip().lower() in _TRUE,
                method=_method(upload.text("method")),
                pixels=await self._pixels(upload.path, upload.size),
            )
            self.worker.submit(job)
            self.board.add(job)  # for GET /v1/jobs/{id} (a job that ended already is kept too)
        except (UploadRejected, BadField) as refusal:
            upload.discard()
            return error_response(refusal.status, refusal.message)
        except ServiceBusy as busy:
            upload.discard()
            self.counts["refused: queue full"] += 1
            retry = {"retry-after": str(max(1, int(busy.retry_after)))}
            return error_response(503, str(busy), retry)
        except ServiceClosing as closing:
            upload.discard()
            return error_response(503, str(closing))
        return job, (upload.text("async") or "").strip().lower() in _TRUE

    async def _pixels(self, path: Path, upload_size: int) -> int:
        """The image's pixel count from its header (nothing decoded); refused (413) past the
        service's budget, before the image waits in the queue. A small file's header is read
        on the event loop (cheaper than a hop to a thread), a large one's beside it."""
        if upload_size <= INLINE_BYTES:
            size = image_size(path)
        else:
            size = await run_in_threadpool(image_size, path)
        if size is None:
            return 0  # an unreadable header: the hostile-file loader says why, later
        width, height = size
        if width * height > self.config.max_pixels:
            raise UploadRejected(
                413,
                f"the image is {width} x {height} pixels, more than the"
                f" {self.config.max_pixels:,} this service decodes",
            )
        return width * height

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
        shown = job.snapshot()
        if "error" in shown:
            shown["error"] = public_message(shown["error"])
        return json_response(shown)

    # ------------------------------------------------------------------ reading the lab
    async def _record(self, text: str) -> dict[str, Any] | None:
        """The audit record a URL names, or None (an id that cannot be one is none either)."""
        query_id = record_id(text)
        if query_id is None:
            return None
        found: dict[str, Any] | None = await self.read(records.audit_record, self.lab, query_id)
        return found

    async def api_record(self, request: Request) -> Response:
        text = request.path_params["query_id"]
        found = await self._record(text)
        if found is None:
            return error_response(404, f"no query {text[:20]} in this lab's audit")
        pretty = request.query_params.get("pretty", "") in _TRUE
        return json_response(found, pretty=pretty)

    async def api_history(self, request: Request) -> Response:
        limit, offset, q, verdict = _paging(request)
        found = await self.read(
            records.history, self.lab, q, limit=limit, offset=offset, verdict=verdict
        )
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
        """Healthy only when both are: the worker (models loaded, its thread alive) and the
        database (a statement answered within ``DATABASE_CHECK_S``)."""
        ready, why = self.worker.health()
        if not ready:
            loading = why == LOADING
            shown = {"ok": False, "loading": True} if loading else {"ok": False, "error": why}
            return json_response(shown, 503)
        problem = await self._database_problem()
        if problem is not None:
            return json_response({"ok": False, "error": public_message(problem)}, 503)
        return json_response({"ok": True})

    async def _database_problem(self) -> str | None:
        from resynth_index.store.engine import database_failure, database_name
        from resynth_index.store.repository import database_answers

        try:
            await asyncio.wait_for(self.read(database_answers, self.lab.engine), DATABASE_CHECK_S)
        except TimeoutError:
            return f"the lab's database did not answer within {DATABASE_CHECK_S:g} s"
        except Exception as error:  # any failure of the database is ill health, said once
            return database_failure(error, database_name(self.lab.engine))
        return None

    async def api_worker(self, _request: Request) -> Response:
        return json_response(self.worker.stats())

    async def api_stats(self, _request: Request) -> Response:
        """The worker's counts and the service's: requests by status, refusals before and
        after authentication (connections, header blocks, timeouts, a full queue, logins)."""
        return json_response({"worker": self.worker.stats(), "service": dict(self.counts)})

    # ------------------------------------------------------------------ pages
    def _who(self, request: Request) -> dict[str, Any]:
        """What every page needs to render its forms: the CSRF token, the log-out button."""
        return {
            "csrf": self.sessions.csrf(request.scope.get("rsx_session")),
            "logout": request.scope.get("rsx_auth") == "cookie",
        }

    async def _query_page(self, request: Request, error: str | None = None) -> str:
        """The query form: the lab's default candidates (else the calibrated set) ticked."""
        form = await self.read(records.query_form, self.lab)
        return page.query_page(
            form.candidates,
            checked=form.checked,
            calibration_note=form.calibration_note,
            error=error,
            **self._who(request),
        )

    async def page_query(self, request: Request) -> Response:
        return HTMLResponse(await self._query_page(request))

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
        return HTMLResponse(await self._query_page(request, error), accepted.status_code)

    async def page_answer(self, request: Request) -> Response:
        text = request.path_params["query_id"]
        found = await self._record(text)
        if found is None:
            raise HTTPException(404, f"no query {text[:20]} in this lab's audit")
        return HTMLResponse(page.answer_page(found, **self._who(request)))

    async def page_history(self, request: Request) -> Response:
        limit, offset, q, verdict = _paging(request)
        found = await self.read(
            records.history, self.lab, q, limit=limit, offset=offset, verdict=verdict
        )
        return HTMLResponse(page.history_page(found, **self._who(request)))

    async def page_generators(self, request: Request) -> Response:
        listing = await self.read(records.generators, self.lab)
        return HTMLResponse(page.generators_page(listing, **self._who(request)))

    async def page_login(self, request: Request) -> Response:
        if self.config.token is None:
            return RedirectResponse("/", 303)
        if request.method == "GET":
            return HTMLResponse(page.login_page())
        client = request.client.host if request.client else "-"
        wait = self.logins.retry_after(client)
        if wait:
            self.counts["refused: login attempts"] += 1
            message = f"too many failed logins from this address; try again in {wait} s"
            return HTMLResponse(page.login_page(message), 429, {"retry-after": str(wait)})
        form = await _small_form(request)
        given = (form.get("token") or [""])[0]
        if not security.same_secret(given, self.config.token):
            self.logins.failed(client)
            return HTMLResponse(page.login_page("wrong token"), 401)
        response = RedirectResponse("/", 303)
        response.headers["set-cookie"] = self.sessions.cookie(self.sessions.issue())
        return response

    async def page_logout(self, request: Request) -> Response:
        form = await _small_form(request)
        if not security.csrf_ok(request.scope, self.sessions, (form.get("csrf") or [""])[0]):
            return error_response(403, "the form's CSRF token is missing or wrong")
        if request.scope.get("rsx_auth") == "cookie":
            self.sessions.end_all()  # every cookie issued so far is worth nothing from now on
        response = RedirectResponse("/login" if self.config.token else "/", 303)
        response.headers["set-cookie"] = security.cleared_cookie()
        return response

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return error_response(404, "no such file")
        text = files("resynth_index.service").joinpath("static").joinpath(name).read_text("utf-8")
        return Response(text, media_type=_STATIC[name], headers={"cache-control": "no-cache"})


def create_app(
    config: ServiceConfig, worker: QueryWorker | None = None, counts: Counter[str] | None = None
) -> security.ASGIApp:
    """The ASGI application of ``rsx serve``, wrapped in its ``security.Guard``. ``counts``:
    the service's counters (``GET /v1/stats``), shared with the connection guard's refusals."""
    counts = counts if counts is not None else Counter()
    service = Service(config, worker, counts)
    routes = [
        Route("/healthz", service.healthz),
        Route("/v1/query", service.api_query, methods=["POST"]),
        Route("/v1/jobs/{job_id}", service.api_job),
        Route("/v1/queries", service.api_history),
        Route("/v1/queries/{query_id}", service.api_record),
        Route("/v1/generators", service.api_generators),
        Route("/v1/work-orders.csv", service.api_work_orders),
        Route("/v1/images/{sha256}", service.api_image),
        Route("/v1/worker", service.api_worker),
        Route("/v1/stats", service.api_stats),
        Route("/", service.page_query),
        Route("/query", service.page_query_post, methods=["POST"]),
        Route("/queries/{query_id}", service.page_answer),
        Route("/history", service.page_history),
        Route("/generators", service.page_generators),
        Route("/login", service.page_login, methods=["GET", "POST"]),
        Route("/logout", service.page_logout, methods=["POST"]),
        Route("/static/{name}", service.static),
    ]
    app = Starlette(
        routes=routes,
        lifespan=service.lifespan,
        middleware=[Middleware(_Unexpected)],
        exception_handlers={HTTPException: _http_error, BadField: _bad_field},
    )
    app.state.service = service
    return security.Guard(
        app,
        token=config.token,
        sessions=service.sessions,
        render_login=page.login_page,
        counts=counts,
    )


def _answer_error(request: Request, status: int, message: str) -> Response:
    """One line: JSON for the API and for clients that are not browsers, else a small page."""
    if request.url.path.startswith("/v1/") or "text/html" not in request.headers.get("accept", ""):
        return error_response(status, message)
    body = f"<!doctype html><title>{status}</title><h1>{status}</h1>"
    return HTMLResponse(body + f"<p>{page._e(public_message(message))}</p>", status)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (404, 405) and the pages' 404s, as one line of JSON or HTML."""
    assert isinstance(exc, HTTPException)
    return _answer_error(request, exc.status_code, exc.detail)


async def _bad_field(request: Request, exc: Exception) -> Response:
    """A parameter that cannot be used (400), named."""
    assert isinstance(exc, BadField)
    return _answer_error(request, exc.status, exc.message)


class _Unexpected:
    """What a route did not expect, answered in one line (``_internal_error``) and not passed
    on: Starlette's outer error middleware would answer in plain text, raise it again to the
    server, which logs it a second time and drops the connection."""

    def __init__(self, app: security.ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: security.Scope, receive: security.Receive, send: security.Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def noting(message: security.Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting)
        except Exception as exc:
            response = _internal_error(Request(scope), exc)
            if not started:
                await response(scope, receive, send)


def _internal_error(request: Request, exc: Exception) -> Response:
    """Anything a route did not expect, as one line and never a traceback to the client: a
    failing database is 503 saying what failed (and one log line); anything else is a bug,
    answered 500, its traceback in the log."""
    from sqlalchemy.exc import DBAPIError

    if isinstance(exc, DBAPIError | RsxError):
        message = str(exc)
        if isinstance(exc, DBAPIError):
            from resynth_index.store.engine import database_failure, database_name

            service: Service = request.scope["app"].state.service
            message = database_failure(exc, database_name(service.lab.engine))
        log.warning("%s %s: %s", request.method, request.url.path, message)
        return _answer_error(request, 503, message)
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _answer_error(request, 500, f"internal error ({type(exc).__name__}); see the log")


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
    from resynth_index.attribution.combination import QUERY_METHODS

    method = (text or "resynthesis").strip().lower()
    if method not in QUERY_METHODS:
        raise BadField(400, f"method must be one of {', '.join(QUERY_METHODS)}")
    return method


def _paging(request: Request) -> tuple[int, int, str, str | None]:
    """(limit, offset, q, verdict) from the query string, checked (BadField 400 when not)."""
    params = request.query_params
    limit = whole_number(params.get("limit"), "limit", 1, records.MAX_LIMIT, 20)
    offset = whole_number(params.get("offset"), "offset", 0, records.MAX_OFFSET, 0)
    assert limit is not None and offset is not None
    q = params.get("q") or ""
    if len(q) > 200:
        raise BadField(400, "q is at most 200 characters")
    verdict = params.get("verdict") or None
    if verdict is not None and len(verdict) > 128:
        raise BadField(400, "verdict is at most 128 characters")
    return limit, offset, q, verdict


async def _small_form(request: Request, limit: int = 8192) -> dict[str, list[str]]:
    """A small urlencoded form (login, logout), read with a size limit."""
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, "the form is too large")
    return parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
