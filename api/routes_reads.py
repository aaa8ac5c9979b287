"""Reads: lead states, histories, command outcomes, lists, personal data (GDPR), the
funnel report and the outbox."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

import client as leads
from funnel.lead import LeadView
from funnel.models import AwareDatetime, OutboundKind, Role
from funnel.personal_data import ErasureReport, mask_view, scrub_entry, scrub_payload
from funnel.report import CSV_TABLES, FunnelReport, ReportWindows, report_csv

from api.limits import ANSWER_TIMEOUT, MAX_PAGE
from api.keys import allow, Principal
from api.schemas import (
    invalid,
    AckIn, AckResult, after_outbox_cursor, ERRORS, HistoryPage, LeadList, LeadQuery, LeadSummaryOut, outbox_cursor,
    OutboxPage, PathLeadId, Problem,
)
from api.backends import backends_of, history_page, MASKED_NOTE, reads_personal_data, temporal_call, Unavailable


reads = APIRouter(tags=["reads"], responses=ERRORS)
outbox = APIRouter(prefix="/outbox", tags=["outbox"], responses=ERRORS)

# --------------------------------------------------------------------------- reads

_READERS = (Role.MARKETING, Role.PRESALES, Role.SALES)


@reads.get(
    "/leads/{lead_id}", response_model=LeadView, summary="A lead's current state and score breakdown",
    description="Live state from the lead's workflow (works for won leads too). Roles: all." + MASKED_NOTE,
    responses={404: {"model": Problem, "description": "no such lead"},
               504: {"model": Problem, "description": "the lead did not answer in time"}},
)
async def get_lead(lead_id: PathLeadId, request: Request,
                   caller: Annotated[Principal, Depends(allow(*_READERS))]) -> LeadView:
    temporal = await backends_of(request).temporal()
    view = await temporal_call(leads.get_view(temporal, lead_id), ANSWER_TIMEOUT, "query")
    return view if reads_personal_data(request, caller.role) else mask_view(view)


@reads.get(
    "/leads/{lead_id}/history", response_model=HistoryPage, summary="A lead's audit history, oldest first",
    description=(
        "Every score change, stage change, profile update, duplicate, SLA and contact, with its actor: the "
        "audit store, then the entries the lead has not written there yet (score changes reach the store "
        "within LEADFLOW_AUDIT_MAX_LAG). Complete for closed leads and across continue-as-new. Paginated by "
        "offset/limit; `total` is the whole history's length. 404 if there is nothing for the lead. Roles: all."
        + MASKED_NOTE
    ),
    responses={404: {"model": Problem, "description": "no history for this lead"}},
)
async def get_history(
    lead_id: PathLeadId, request: Request, caller: Annotated[Principal, Depends(allow(*_READERS))],
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> HistoryPage:
    total, entries, complete = await history_page(backends_of(request), lead_id, offset, limit)
    if total == 0:
        raise leads.LeadNotFound(f"no lead {lead_id} (no history yet)")
    if not reads_personal_data(request, caller.role):
        entries = [scrub_entry(entry) for entry in entries]
    return HistoryPage(lead_id=lead_id, total=total, offset=offset, limit=limit, entries=entries,
                       complete=complete, next_offset=offset + len(entries) if offset + len(entries) < total else None)


@reads.get(
    "/leads/{lead_id}/commands/{key}", response_model=leads.CommandOutcome,
    summary="What became of a command, by its idempotency key",
    description="applied (with its history entries), refused (with the lead's reason) or unknown (never received, "
                "or still waiting for the lead). Roles: all." + MASKED_NOTE,
)
async def get_command_outcome(
    lead_id: PathLeadId, request: Request, caller: Annotated[Principal, Depends(allow(*_READERS))],
    key: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")],
) -> leads.CommandOutcome:
    backends = backends_of(request)
    temporal = await backends.temporal()
    store = await run_in_threadpool(backends.store)
    outcome = await leads.command_outcome(temporal, store, lead_id, key)
    if not reads_personal_data(request, caller.role):
        outcome.entries = [scrub_entry(entry) for entry in outcome.entries]
    return outcome


@reads.get(
    "/leads", response_model=LeadList, summary="Leads by stage, owner, channel, score and creation time",
    description=(
        "From Temporal visibility: running leads (and won ones with `closed=true`), newest first, a page at a "
        "time: pass `next_cursor` back as `cursor` for the next. Visibility follows the lead's audit writes: "
        "stage changes within about a second, a new lead, its owner and its latest score within "
        "LEADFLOW_AUDIT_MAX_LAG. For polling tools, `updated_since` lists the leads with a change recorded "
        "since then, oldest change first, with `updated_at`: entries reach the store within the audit lag, so "
        "poll from a little before your last poll's newest `updated_at`. Roles: all."
    ),
)
async def list_leads(
    request: Request, caller: Annotated[Principal, Depends(allow(*_READERS))],
    filters: Annotated[LeadQuery, Query()],
) -> LeadList:
    if filters.updated_since is not None:
        return await _changed_leads(request, filters)
    temporal = await backends_of(request).temporal()
    try:
        page = await temporal_call(leads.lead_page(temporal, filters.filters(), filters.cursor, filters.limit),
                                   ANSWER_TIMEOUT, "query")
    except ValueError as err:
        raise invalid(("query", "cursor"), str(err)) from None
    return LeadList(count=len(page.leads), leads=[LeadSummaryOut(**vars(lead)) for lead in page.leads],
                    next_cursor=page.next_cursor)


async def _changed_leads(request: Request, filters: LeadQuery) -> LeadList:
    """Polling: a page of the leads changed since, from the audit store (oldest change first,
    keyset cursor), shown as visibility has them and filtered by the other filters there (a
    page may then hold fewer than `limit`; `next_cursor` goes on)."""
    try:
        after = after_outbox_cursor(filters.cursor) if filters.cursor else None
    except ValueError as err:
        raise invalid(("query", "cursor"), str(err)) from None
    backends = backends_of(request)
    changed = await backends.in_store(lambda store: store.changed_leads(filters.updated_since, filters.limit, after))
    if not changed:
        return LeadList(count=0, leads=[])
    when = dict(changed)
    query = dataclasses.replace(filters.filters(), lead_ids=list(when))
    temporal = await backends.temporal()
    page = await temporal_call(leads.lead_page(temporal, query, None, len(changed)), ANSWER_TIMEOUT, "query")
    shown = sorted((LeadSummaryOut(**vars(lead), updated_at=when[lead.lead_id]) for lead in page.leads
                    if lead.lead_id in when), key=lambda lead: (lead.updated_at, lead.lead_id))
    last = changed[-1]
    return LeadList(count=len(shown), leads=shown,
                    next_cursor=outbox_cursor((last[1], last[0])) if len(changed) == filters.limit else None)


personal = APIRouter(prefix="/leads/{lead_id}/personal-data", tags=["personal data (GDPR)"],
                     responses={**ERRORS, 404: {"model": Problem, "description": "no such lead"}})


@personal.get(
    "", response_model=leads.PersonalDataExport, summary="Everything kept about the person (GDPR Art. 15)",
    description=(
        "The lead's profile facts (with when each was observed and by which update), its events with their "
        "attributes (those it keeps: its last year), its state, its whole audit history, every outbound message "
        "(acknowledged or not) and its erasures. Facts and events come from the lead's workflow: without "
        "Temporal or a worker, `complete` is false and `notes` says what is missing. Roles: manager."
    ),
)
async def export_personal_data(lead_id: PathLeadId, request: Request,
                               caller: Annotated[Principal, Depends(allow())]) -> leads.PersonalDataExport:
    backends = backends_of(request)
    try:
        temporal = await backends.temporal()
    except Unavailable:
        temporal = None
    store = await run_in_threadpool(backends.store)
    return await leads.export_person(temporal, store, lead_id)


@personal.delete(
    "", response_model=ErasureReport, summary="Erase the person's data (GDPR Art. 17)",
    description=(
        "Removes the person's data: profile fact values (but each matched fit rule's own category, so the score "
        "survives), event attributes, notes and the free-text consent source, from the lead's state, the audit "
        "history's details and the outbox; the lead's Temporal history so far is crypto-shredded (its key is "
        "destroyed shortly after: see `history`). Keeps the anonymous funnel facts: stages and times, scores "
        "and rule names, event types, ids and times, channel, owners, consent yes/no. Recorded with the key's "
        "owner as who and when. The lead goes on; data sent after this is new data. Roles: manager."
    ),
    responses={504: {"model": Problem, "description": "the lead did not answer in time (is the worker running?)"}},
)
async def erase_personal_data(lead_id: PathLeadId, request: Request,
                              caller: Annotated[Principal, Depends(allow())]) -> ErasureReport:
    backends = backends_of(request)
    temporal = await backends.temporal()
    store = await run_in_threadpool(backends.store)
    return await temporal_call(leads.erase_person(temporal, store, lead_id, caller.actor), ANSWER_TIMEOUT * 2,
                                "erasure")


@reads.get(
    "/report", response_model=FunnelReport,
    summary="Funnel report: stages per channel, opportunities, presales decisions, SLA compliance",
    description="From the audit store's summary tables (optionally the leads created since a time) and the event "
    "log (first touch); "
    "`format=csv` gives one `table` for a spreadsheet. Roles: manager.",
    responses={200: {"content": {"text/csv": {}}}},
)
async def get_report(
    request: Request, caller: Annotated[Principal, Depends(allow())],
    since: Annotated[AwareDatetime | None, Query(description="leads created at or after (ISO 8601 with a timezone)")] = None,
    format: Annotated[Literal["json", "csv"], Query(description="csv: one table for a spreadsheet")] = "json",
    table: Annotated[Literal[CSV_TABLES], Query(description="the table `format=csv` gives")] = "stages",  # type: ignore[valid-type]
    opportunity_days: Annotated[int, Query(ge=1, le=3650, description="lead -> opportunity window, days")] = 84,
    won_days: Annotated[int, Query(ge=1, le=3650, description="opportunity -> won window, days")] = 18,
    cohort: Annotated[Literal["month", "week"], Query(description="cohorts by creation month or week")] = "month",
) -> FunnelReport:
    windows = ReportWindows(lead_to_opportunity_days=opportunity_days, opportunity_to_won_days=won_days, cohort=cohort)
    report = await backends_of(request).in_store(
        lambda store: store.funnel_report(datetime.now(timezone.utc), windows, since))
    if format == "csv":
        return Response(report_csv(report, table), media_type="text/csv; charset=utf-8",  # type: ignore[return-value]
                        headers={"Content-Disposition": f'attachment; filename="funnel-{table}.csv"'})
    return report


# --------------------------------------------------------------------------- outbox


@outbox.get(
    "", response_model=OutboxPage, summary="Pending handovers, nurture steps, escalations, opportunities",
    description=(
        "Messages nobody has acknowledged yet, oldest first, for tools that poll instead of taking the "
        "webhook. Acknowledge them with POST /outbox/ack. Roles: marketing, manager." + MASKED_NOTE
    ),
)
async def get_outbox(
    request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))],
    kind: OutboundKind | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[str | None, Query(max_length=1000, pattern=r"^[A-Za-z0-9_=-]+$",
                                        description="the previous page's next_cursor")] = None,
    updated_since: Annotated[AwareDatetime | None, Query(description="only messages stored at or after this")] = None,
) -> OutboxPage:
    try:
        after = after_outbox_cursor(cursor) if cursor else None
    except ValueError as err:
        raise invalid(("query", "cursor"), str(err)) from None
    messages, last = await backends_of(request).in_store(
        lambda store: store.outbox_page(kind, limit, after, updated_since))
    next_cursor = outbox_cursor(last) if last else None
    if not reads_personal_data(request, caller.role):
        messages = [m.model_copy(update={"payload": scrub_payload(m.payload)}) for m in messages]
    return OutboxPage(count=len(messages), messages=messages, next_cursor=next_cursor)


@outbox.post(
    "/ack", response_model=AckResult, summary="Acknowledge outbox messages",
    description="Idempotent: acknowledging again (or an unknown id) changes nothing. Roles: marketing, manager.",
)
async def ack_outbox(
    body: AckIn, request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))]
) -> AckResult:
    ids = list(dict.fromkeys(body.message_ids))
    done = await backends_of(request).in_store(lambda store: store.ack_outbox(ids))
    return AckResult(acknowledged=done, unchanged=len(ids) - done)
