"""The FastAPI application: routers, error handlers, middleware and the offline docs."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import ValidationError
from temporalio.client import Client
from temporalio.service import RPCError

import client as leads
from activities.store import AuditStore
from api_codec import router as codec_router
from payload_codec import KeyConfigError, PayloadKeyring
from config import Settings
from funnel.scoring_model import ModelError

from api.limits import BEHIND_RETRY_AFTER, DOCS_ASSETS, MAX_BATCH, MAX_BODY_BYTES
from api.keys import ConfigError, FailedAuthLimiter, KeyRing
from api.schemas import describe_errors, error_message, Problem, problem_response
from api.backends import ActiveModel, Backends, Behind, first_line, NoAnswer, Unavailable
from api.routes_health import health
from api.routes_ingest import ingest
from api.routes_commands import commands
from api.routes_reads import outbox, personal, reads
from api.routes_models import models
from api.routes_connectors import check_mapping, connectors
from api.routes_subscriptions import subscriptions
from api.routes_accounts import accounts
from connectors.mapping import MappingError
from api.ui import install_ui

log = logging.getLogger("leadflow.api")


# =========================================================================== errors and middleware


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": error_message(e),
             "type": str(e.get("type", "value_error"))}
            for e in exc.errors()
        ]
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": errors, "message": message}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Allow: every method of the path, not just one route's
            headers["Allow"] = ", ".join(_methods_of(request))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(leads.LeadNotFound)
    async def not_found(request: Request, exc: leads.LeadNotFound) -> JSONResponse:
        return problem_response(404, str(exc))

    @app.exception_handler(leads.LeadStarting)
    async def starting(request: Request, exc: leads.LeadStarting) -> JSONResponse:
        return problem_response(503, str(exc), headers={"Retry-After": "2"})

    @app.exception_handler(leads.CommandRefused)
    async def refused(request: Request, exc: leads.CommandRefused) -> JSONResponse:
        return problem_response(409, f"refused: {exc}")

    @app.exception_handler(leads.LeadClosed)
    async def closed(request: Request, exc: leads.LeadClosed) -> JSONResponse:
        return problem_response(410, str(exc))

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return problem_response(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(leads.TemporalUnavailable)
    async def temporal_unavailable(request: Request, exc: leads.TemporalUnavailable) -> JSONResponse:
        return problem_response(503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(Behind)
    async def behind(request: Request, exc: Behind) -> JSONResponse:
        return problem_response(503, str(exc), headers={"Retry-After": str(BEHIND_RETRY_AFTER)})

    @app.exception_handler(NoAnswer)
    async def no_answer(request: Request, exc: NoAnswer) -> JSONResponse:
        return problem_response(504, str(exc), headers=exc.headers)

    @app.exception_handler(RPCError)
    async def temporal_error(request: Request, exc: RPCError) -> JSONResponse:
        return problem_response(503, f"Temporal error: {first_line(exc)}", headers={"Retry-After": "5"})


def _methods_of(request: Request) -> list[str]:
    """The methods the API documents for the request's path (several routes may share it)."""
    methods: set[str] = set()
    for route in request.app.routes:
        if getattr(route, "include_in_schema", False) and getattr(route, "methods", None):
            match, _ = route.matches({**request.scope, "method": next(iter(route.methods))})
            if match is Match.FULL:
                methods |= route.methods
    return sorted(methods - {"HEAD"})


class BodyLimit:
    """Refuses bodies over `limit` bytes with 413: by Content-Length before reading, and
    by counting while reading (chunked uploads, lying headers)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body larger than {self.limit} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _send_problem(send, 400, "invalid Content-Length header")
            if int(length) > self.limit:
                return await _send_problem(send, 413, too_large)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI passes HTTPExceptions raised while reading the body through.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
access_log = logging.getLogger("leadflow.api.access")


class RequestIds:
    """Every answer carries X-Request-Id (the caller's own, when it sent a sane one, else a
    new one), and every request is logged with it, the key's name, status and duration: one
    id to find a call in the logs of the API, whatever the caller saw."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status, started = 500, time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info("%s %s %s %d %.1fms key=%s", request_id, scope.get("method"), scope.get("path"), status,
                            1000 * (time.perf_counter() - started), state.get("caller", "-"))


class JsonBodies:
    """A body the API reads is JSON: another Content-Type is 415, said plainly, before any
    route parses it. Browser forms excepted: the dashboard's (/ui/) and the codec server's
    sign-in (/codec/login)."""

    FORMS = ("/ui/", "/codec/login")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH", "DELETE") \
                or scope.get("path", "").startswith(self.FORMS):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        has_body = headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers
        media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if has_body and not (media == "application/json" or media.endswith("+json")):
            return await _send_problem(send, 415, f"Content-Type must be application/json, not {media or 'none'}")
        await self.app(scope, receive, send)


async def _send_problem(send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class StartupMessage:
    """A configuration error at startup is one clear line in uvicorn's log, not a traceback."""

    def __init__(self, app, state):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def clean_send(message):
            problem = getattr(self.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and problem:
                message = {**message, "message": f"leadflow api cannot start: {problem}"}
            await send(message)

        await self.app(scope, receive, clean_send)


# =========================================================================== the app

DESCRIPTION = f"""
One HTTP service for the tools around Leadflow's funnel (IQL -> MQL -> SAL -> SQL -> won/lost); each
lead is a durable Temporal workflow.

**Authentication**: an API key, as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Each key is
bound to a name and a role in the configuration; the audit history records that name and role as the
actor of everything done with the key (bodies never name an actor). No valid key: 401; a role that may
not: 403.

| role | may |
|---|---|
| marketing | post events and profile facts; read leads and histories; poll and acknowledge the outbox |
| presales | accept, reject, qualify, log contacts; read leads and histories |
| sales | log contacts, qualify, reject (after acceptance), close won/lost; read leads and histories |
| manager | everything, including reopen, the funnel report, a person's data (export, erasure) and the codec server |

**Personal data** (profile fact values, event attributes, notes) is shown to the roles in
`LEADFLOW_PII_READERS` (default: manager, presales, sales); every other role gets it masked as `***`
in lead states, histories and the outbox (names of facts stay). Managers export a person's data
(`GET /leads/{{id}}/personal-data`, GDPR Art. 15) and erase it (`DELETE`, Art. 17). `/codec/decode` and
`/codec/encode` are the codec server of the Temporal web UI (managers only).

The lead itself checks each command against its stage and the role (409 with its reason).

**Webhooks** are at-least-once: events are idempotent by `event_id`, profile updates by `update_id`.
Bodies are at most {MAX_BODY_BYTES} bytes; batches at most {MAX_BATCH} events. `/healthz` and `/readyz` need no key.
"""


def create_app(settings: Settings | None = None, keys: KeyRing | None = None, temporal: Client | None = None,
               store: AuditStore | None = None) -> FastAPI:
    """The API. Without arguments everything comes from the environment at startup
    (`uvicorn api:app`); tests pass their own settings, keys, client and store."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            cfg = settings or Settings.from_env()
            app.state.keys = keys or KeyRing.from_env()
            app.state.auth_failures = FailedAuthLimiter(limit=cfg.auth_failure_limit)
            app.state.scoring_model = ActiveModel(cfg.model_path)
            model = app.state.scoring_model._file
            check_mapping(cfg.connectors_path)
            if temporal is None:
                PayloadKeyring.from_env()  # no payload keys, no start: nothing may reach Temporal in the clear
        except ValidationError as err:
            app.state.startup_error = f"invalid settings in the environment: {describe_errors(err)}"
            raise
        except (ConfigError, ModelError, KeyConfigError, MappingError) as err:
            app.state.startup_error = str(err).replace("\n", " ")
            raise
        app.state.backends = backends = Backends(cfg, temporal, store)
        await backends.warm_up()
        log.info("API with %d key(s), scoring model %s, task queue %r", len(app.state.keys), model.ref,
                 cfg.task_queue)
        try:
            yield
        finally:
            backends.close()

    app = FastAPI(title="Leadflow API", version="1.0", description=DESCRIPTION, lifespan=lifespan,
                  responses={500: {"model": Problem, "description": "a bug: please report it"}},
                  docs_url=None, redoc_url=None)
    for router in (health, ingest, commands, reads, personal, outbox, models, connectors, subscriptions, accounts):
        app.include_router(router)
    app.include_router(codec_router)
    _install_docs(app)
    install_ui(app)
    _install_error_handlers(app)
    app.add_middleware(JsonBodies)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestIds)  # outermost but one: its id is on every answer, 413 and 415 too
    app.add_middleware(StartupMessage, state=app.state)
    return app


def _install_docs(app: FastAPI) -> None:
    """/docs, the interactive documentation, working offline: Swagger UI's files come from
    the swagger-ui-bundle package and are served here (FastAPI's default page loads them
    from a CDN). ReDoc has no such package, so there is no /redoc; /openapi.json feeds any
    other viewer."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - docs",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


