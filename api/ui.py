"""The managers' dashboard at /ui, served by the API itself: the funnel per channel and
cohort with its KPIs against the sources' benchmarks, the SLA board, the lead list and a
lead's page. Rendered on the server (Jinja2, SVG from api/ui_charts.py); no script, no CDN.

Sign-in takes an API key (the same keys, the same roles) and opens a session held in this
process: the browser keeps only a random token, in an HttpOnly, SameSite=strict cookie. The
pages read; the only thing the UI writes is its own sign-out."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.routing import APIRoute
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from temporalio.service import RPCError

import client as leads
from funnel.kpis import ReportWindows
from funnel.models import LEAD_ID_PATTERN, OutboundKind, Role, Stage
from funnel.personal_data import mask_view, scrub_entry, scrub_payload
from funnel.report import MAIN_PATH

from api import ui_charts
from api.backends import backends_of, history_page, NoAnswer, reads_personal_data, temporal_call, Unavailable
from api.keys import authenticate, KeyRing, may, Principal
from api.limits import ANSWER_TIMEOUT
from api.schemas import describe_errors, LeadQuery

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")  # autoescaped: lead data is shown as text, never markup
templates.env.filters.update(
    pct=lambda v: "–" if v is None else f"{v:.0%}",
    num=lambda v, digits=1: "–" if v is None else f"{v:.{digits}f}",
    when=lambda t: "–" if t is None else t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M"),
)

SESSION_COOKIE = "leadflow_session"
SESSION_SECONDS = 8 * 3600  # a working day; then sign in again
HISTORY_PAGE = 500  # audit entries on a lead's page at a time
OPEN_SLAS_SHOWN = 100  # open deadlines on the SLA board, of the oldest leads, their due times asked of the leads

# Pages by role, as the API's table says: the funnel report is for managers; every role reads leads.
MANAGERS = frozenset({Role.MANAGER})
READERS = frozenset({Role.MARKETING, Role.PRESALES, Role.SALES, Role.MANAGER})
PAGES = [("funnel", "Funnel", MANAGERS), ("slas", "SLA board", MANAGERS), ("leads", "Leads", READERS),
         ("accounts", "Accounts", READERS)]

# The browser may load nothing but this origin's own files: no script at all, styles from
# /ui/static only (no inline styles), forms post here only, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class _PageRoute(APIRoute):
    """A dashboard route: Temporal or the store away, or a lead not answering, is an error
    page saying so (the API answers these as JSON problems)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (Unavailable, leads.TemporalUnavailable, RPCError) as err:
                raise PageError(503, f"Not available right now: {err}. Try again in a moment.") from None
            except NoAnswer as err:
                raise PageError(504, f"No answer in time: {err}") from None

        return route


ui = APIRouter(prefix="/ui", include_in_schema=False, route_class=_PageRoute)


# =========================================================================== sessions


class UiSessions:
    """Signed-in browsers: random token -> (the key's digest, expiry), in this process (a
    restart signs everyone out). A session lasts while its key does: revoke the key and its
    sessions end with it. Bounded: the oldest session goes when the table is full."""

    def __init__(self, seconds: float = SESSION_SECONDS, limit: int = 10_000):
        self.seconds, self.limit = seconds, limit
        self._sessions: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def open(self, key_digest: bytes) -> str:
        token = secrets.token_urlsafe(32)
        if len(self._sessions) >= self.limit:
            self._sessions.popitem(last=False)
        self._sessions[token] = (key_digest, time.monotonic() + self.seconds)
        return token

    def principal(self, token: str | None, keys: KeyRing) -> Principal | None:
        found = self._sessions.get(token or "")
        if found is None:
            return None
        principal = keys.owner(found[0])
        if found[1] <= time.monotonic() or principal is None:
            del self._sessions[token]  # type: ignore[arg-type]
            return None
        return principal

    def close(self, token: str | None) -> None:
        self._sessions.pop(token or "", None)


def sessions_of(request: Request) -> UiSessions:
    return request.app.state.ui_sessions


class SignInRequired(Exception):
    """No valid session: the browser is sent to the sign-in page, and back here after."""

    def __init__(self, back_to: str):
        self.back_to = back_to


class PageError(Exception):
    """A page that cannot be shown (unknown lead, a role that may not, a bad filter): an
    error page with this status and message, inside the dashboard's frame."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _session_principal(request: Request) -> Principal | None:
    return sessions_of(request).principal(request.cookies.get(SESSION_COOKIE), request.app.state.keys)


def signed_in(request: Request) -> Principal:
    principal = _session_principal(request)
    if principal is None:
        raise SignInRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    request.state.caller = principal.name  # for the access log
    return principal


def signed_in_as(roles: frozenset[Role]):
    def check(principal: Annotated[Principal, Depends(signed_in)]) -> Principal:
        if not may(principal, roles):
            raise PageError(403, f"Your role ({principal.role.value}) may not see this page: "
                                 f"{', '.join(sorted(r.value for r in roles))} only.")
        return principal

    return check


def page(request: Request, template: str, principal: Principal | None, status: int = 200, **context) -> Response:
    nav = [(name, title) for name, title, roles in PAGES if principal is not None and may(principal, roles)]
    response = templates.TemplateResponse(request, template, {"principal": principal, "nav": nav, **context},
                                          status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def install_ui(app) -> None:
    """Mount the dashboard, its static files and its error pages on the API."""
    from fastapi.staticfiles import StaticFiles

    app.state.ui_sessions = UiSessions()
    app.include_router(ui)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")

    @app.exception_handler(SignInRequired)
    async def to_sign_in(request: Request, exc: SignInRequired) -> Response:
        return RedirectResponse(f"/ui/sign-in?{urlencode({'next': exc.back_to})}", status_code=303,
                                headers=SECURITY_HEADERS)

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        return page(request, "error.html", _session_principal(request), status=exc.status, message=str(exc))


def _safe_next(target: str | None) -> str:
    """Where to go after sign-in: a dashboard page only (no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


# =========================================================================== sign-in and out


@ui.get("/")
async def home(principal: Annotated[Principal, Depends(signed_in)]) -> Response:
    return RedirectResponse("/ui/funnel" if may(principal, MANAGERS) else "/ui/leads", status_code=303)


@ui.get("/sign-in")
async def sign_in_form(request: Request, next: str | None = None) -> Response:
    return page(request, "sign_in.html", None, next=_safe_next(next), error=None)


@ui.post("/sign-in")
async def sign_in(request: Request) -> Response:
    body = await request.body()
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
    key, target = (form.get("key") or [""])[0].strip(), _safe_next((form.get("next") or [None])[0])
    try:
        authenticate(request, key)  # 401/429 unless the key is configured (and a dev key on loopback)
    except HTTPException as err:
        response = page(request, "sign_in.html", None, status=err.status_code, next=target, error=err.detail)
        if err.headers and "Retry-After" in err.headers:
            response.headers["Retry-After"] = err.headers["Retry-After"]
        return response
    token = sessions_of(request).open(KeyRing.digest(key))
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_SECONDS, path="/ui", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@ui.post("/sign-out")
async def sign_out(request: Request) -> Response:
    sessions_of(request).close(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/ui/sign-in", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


# =========================================================================== the funnel


@ui.get("/funnel")
async def funnel_page(
    request: Request, principal: Annotated[Principal, Depends(signed_in_as(MANAGERS))],
    channel: Annotated[str, Query(max_length=64)] = "all",
    cohort: Annotated[str, Query(pattern="^(month|week)$")] = "month",
    opportunity_days: Annotated[int, Query(ge=1, le=3650)] = 84,
    won_days: Annotated[int, Query(ge=1, le=3650)] = 18,
) -> Response:
    windows = ReportWindows(lead_to_opportunity_days=opportunity_days, opportunity_to_won_days=won_days,
                            cohort=cohort)  # type: ignore[arg-type]
    report = await backends_of(request).in_store(lambda store: store.funnel_report(datetime.now(timezone.utc), windows))
    accounts = await backends_of(request).in_store(lambda store: store.account_summary())
    channels = {c.channel: c for c in report.by_channel}
    shown = report.overall if channel == "all" else channels.get(channel)
    if shown is None:
        raise PageError(404, f"No leads from channel {channel!r} in the report.")
    opp = report.opportunities
    bench = report.benchmarks
    opportunity_bars = ui_charts.rate_bars([(row.group, row.opportunity_rate_within) for row in opp.by_channel],
                                           float(bench["lead_to_opportunity"]["rate"]))
    rejection_bars = ui_charts.rate_bars([(row.group, row.rejection_rate) for row in report.presales.by_channel],
                                         float(bench["presales_rejection"]["rate"]))
    return page(request, "funnel.html", principal, report=report, accounts=accounts, shown=shown, channel=channel,
                channels=sorted(channels), windows=windows, funnel=ui_charts.funnel_bars(shown.stages),
                cohorts=ui_charts.cohort_funnels(opp.by_cohort),
                opportunity_bars=opportunity_bars, rejection_bars=rejection_bars, main_path=MAIN_PATH)


# =========================================================================== the SLA board


@dataclass
class OpenSla:
    lead_id: str
    name: str
    owner: str
    started_at: datetime | None
    breached: bool  # breached, and nobody has contacted or moved the lead since
    due_at: datetime | None = None  # asked of the lead (None: it did not answer)


async def _due_times(request: Request, items: list[OpenSla]) -> bool:
    """Fill in each running SLA's due time from its lead's state; False if Temporal is away."""
    try:
        temporal = await backends_of(request).temporal()
    except Unavailable:
        return False
    gate = asyncio.Semaphore(8)

    async def one(item: OpenSla) -> None:
        async with gate:
            try:
                view = await temporal_call(leads.get_view(temporal, item.lead_id), ANSWER_TIMEOUT / 3, "query")
            except (Unavailable, NoAnswer, leads.LeadNotFound, leads.LeadStarting):
                return
            item.due_at = next((d.due_at for d in view.deadlines if d.name == item.name), None)

    await asyncio.gather(*(one(item) for item in items if not item.breached))
    return True


@ui.get("/slas")
async def sla_board(request: Request, principal: Annotated[Principal, Depends(signed_in_as(MANAGERS))]) -> Response:
    now = datetime.now(timezone.utc)
    backends = backends_of(request)
    slas = await backends.in_store(lambda store: store.sla_report())
    total, rows = await backends.in_store(lambda store: store.open_slas(OPEN_SLAS_SHOWN))
    shown = [OpenSla(lead_id, name, owner, started_at, breached) for lead_id, name, owner, breached, started_at in rows]
    live = await _due_times(request, shown)
    by_owner: dict[str, list[OpenSla]] = defaultdict(list)
    for item in shown:
        by_owner[item.owner].append(item)
    return page(request, "slas.html", principal, slas=slas, open_total=total, by_owner=dict(sorted(by_owner.items())),
                shown=len(shown), live=live, now=now)


# =========================================================================== leads


@ui.get("/leads")
async def lead_list(request: Request, principal: Annotated[Principal, Depends(signed_in_as(READERS))]) -> Response:
    raw = {k: v for k, v in request.query_params.items() if v != ""}
    for name in ("created_from", "created_to"):  # a date field gives a day: midnight UTC
        if name in raw and len(raw[name]) == 10:
            raw[name] += "T00:00:00+00:00"
    try:
        query = LeadQuery.model_validate({**raw, "limit": raw.get("limit", 50)})
    except ValidationError as err:
        raise PageError(422, f"Invalid filter: {describe_errors(err)}") from None
    temporal = await backends_of(request).temporal()
    try:
        found = await temporal_call(leads.lead_page(temporal, query.filters(), query.cursor, query.limit),
                                    ANSWER_TIMEOUT, "query")
    except ValueError as err:
        raise PageError(422, str(err)) from None
    keep = {k: v for k, v in request.query_params.items() if v != "" and k != "cursor"}
    next_url = f"/ui/leads?{urlencode({**keep, 'cursor': found.next_cursor})}" if found.next_cursor else None
    first_url = f"/ui/leads?{urlencode(keep)}" if query.cursor else None
    return page(request, "leads.html", principal, query=query, leads=found.leads, next_url=next_url,
                first_url=first_url, stages=[s.value for s in Stage], form=request.query_params)


@ui.get("/accounts")
async def account_list(
    request: Request, principal: Annotated[Principal, Depends(signed_in_as(READERS))],
    cursor: Annotated[str | None, Query(max_length=4000, pattern=r"^[A-Za-z0-9_=-]+$")] = None,
) -> Response:
    """Buying teams: each account's score against its threshold, its roles, its contacts."""
    temporal = await backends_of(request).temporal()
    try:
        accounts, following = await temporal_call(leads.account_page(temporal, backends_of(request).settings.task_queue, cursor, 50), ANSWER_TIMEOUT * 2, "query")
    except ValueError as err:
        raise PageError(422, str(err)) from None
    total, mqa = await temporal_call(leads.account_counts(temporal, backends_of(request).settings.task_queue), ANSWER_TIMEOUT, "query")
    next_url = f"/ui/accounts?{urlencode({'cursor': following})}" if following else None
    return page(request, "accounts.html", principal, accounts=accounts, total=total, mqa=mqa, next_url=next_url,
                first_url="/ui/accounts" if cursor else None)


@ui.get("/leads/{lead_id}")
async def lead_page(
    request: Request, lead_id: str, principal: Annotated[Principal, Depends(signed_in_as(READERS))],
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Response:
    if not re.fullmatch(LEAD_ID_PATTERN, lead_id):
        raise PageError(404, "No such lead.")
    backends = backends_of(request)
    now = datetime.now(timezone.utc)
    notice, view = None, None
    try:
        temporal = await backends.temporal()
        view = await temporal_call(leads.get_view(temporal, lead_id), ANSWER_TIMEOUT, "query")
    except leads.LeadNotFound:
        pass
    except (Unavailable, NoAnswer, leads.LeadStarting) as err:
        notice = f"The lead's live state is not available ({err}); its stored history is shown."
    total, entries, complete = await history_page(backends, lead_id, offset, HISTORY_PAGE)
    if view is None and total == 0:
        raise PageError(404, f"No lead {lead_id}.")
    messages = await backends.in_store(lambda store: store.outbox_of(lead_id))
    handovers = [m for m in messages if m.kind == OutboundKind.HANDOVER]
    if not reads_personal_data(request, principal.role):
        view = mask_view(view) if view is not None else None
        entries = [scrub_entry(e) for e in entries]
        handovers = [m.model_copy(update={"payload": scrub_payload(m.payload)}) for m in handovers]
    scores = [(e.at, e.score_total) for e in entries if e.score_total is not None]  # entries are in seq order
    visits = ([(v.stage, v.entered_at) for v in view.history] if view is not None else
              [(e.to_stage, e.happened_at) for e in entries if e.to_stage is not None])
    return page(request, "lead.html", principal, lead_id=lead_id, view=view, entries=entries, total=total,
                offset=offset, page_size=HISTORY_PAGE, complete=complete, notice=notice, handovers=handovers,
                score_chart=ui_charts.score_chart(scores), timeline=ui_charts.stage_timeline(visits, now), now=now)
