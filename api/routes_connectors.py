"""Vendor webhooks, as the vendors send them: Mautic and HubSpot cannot send an API key,
so each connector is authenticated by the vendor's own signature with a shared secret
(LEADFLOW_MAUTIC_SECRET, LEADFLOW_HUBSPOT_SECRET) and a replay window. What a vendor event
means comes from the mapping table (connectors/default.toml); the events and facts then
take the same road as `POST /events/batch` and `POST /leads/{id}/profile`.

A vendor's contact becomes a lead through the external-id table: the first webhook of a
contact links it to lead `<vendor>-<contact id>` (or to the lead an integrator linked it to
before, `PUT /leads/{id}/external/{system}/{external id}`)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from pydantic import BaseModel

import client as leads
from activities.store import AuditStore
from connectors import hubspot, mautic
from connectors.items import VendorItem
from connectors.mapping import DEFAULT_CONNECTORS, Connectors, load_connectors
from funnel.lead import FUTURE_TOLERANCE
from funnel.models import LEAD_ID_PATTERN, ActivityEvent, Actor, ProfileUpdate, Role

from api.backends import backends_of, edge_model, Unavailable
from api.keys import allow, failed_authentication, Principal
from api.routes_ingest import event_problem, take_events, take_profile, time_problem
from api.schemas import ERRORS, invalid, PathLeadId, Problem, problem_response

log = logging.getLogger("leadflow.connectors")

connectors = APIRouter(tags=["connectors (Mautic, HubSpot)"], responses=ERRORS)

System = Annotated[str, PathParam(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="e.g. mautic, hubspot, crm")]
ExternalId = Annotated[str, PathParam(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@-]+$")]
_LEAD_ID = re.compile(LEAD_ID_PATTERN)


class ItemResult(BaseModel):
    vendor_type: str
    vendor_id: str | None = None
    lead_id: str | None = None
    outcome: Literal["accepted", "duplicate", "ignored", "rejected", "conflict"]
    reason: str | None = None


class ConnectorResult(BaseModel):
    connector: str
    accepted: int
    duplicates: int
    ignored: int
    rejected: int
    results: list[ItemResult]


class ExternalLink(BaseModel):
    system: str
    external_id: str
    lead_id: str


class ConnectorLogEntry(BaseModel):
    id: int
    received_at: datetime
    vendor_type: str
    vendor_id: str | None
    contact_id: str | None
    lead_id: str | None
    outcome: str
    reason: str | None


class ConnectorLogPage(BaseModel):
    entries: list[ConnectorLogEntry]
    next_cursor: int | None = None


@lru_cache(maxsize=4)
def _mapping(path: Path) -> Connectors:
    return load_connectors(path)


def mapping_of(request: Request) -> Connectors:
    return _mapping(backends_of(request).settings.connectors_path or DEFAULT_CONNECTORS)


def _secret(request: Request, vendor: str) -> str:
    secret = getattr(backends_of(request).settings, f"{vendor}_secret")
    if not secret:
        raise leads.LeadNotFound(f"the {vendor} connector is not configured: set LEADFLOW_{vendor.upper()}_SECRET")
    return secret


_RESPONSES = {
    401: {"model": Problem, "description": "signature missing or wrong, or the request is older than the window"},
    404: {"model": Problem, "description": "this connector is not configured (no secret)"},
}


@connectors.post(
    "/connectors/mautic", response_model=ConnectorResult, summary="Mautic webhook (Webhook-Signature)",
    description=(
        "Takes a Mautic webhook body as Mautic sends it (`{\"mautic.page_on_hit\": [...], ...}`), verified by "
        "`Webhook-Signature` (base64 HMAC-SHA256 of the raw body with the webhook's secret). Its newest event "
        "`timestamp` must be within the mapping's `max_age_hours` (Mautic signs no time). Each event is "
        "mapped by the mapping table: accepted, duplicate (a redelivery: Mautic's ids are the event ids), "
        "ignored (no rule maps it: recorded, not refused, so Mautic does not retry for ever) or rejected "
        "(unusable, with the reason). 200 with one result per event; 503 asks Mautic to retry. No API key."
    ),
    responses=_RESPONSES,
)
async def mautic_webhook(request: Request) -> ConnectorResult:
    body = await request.body()
    secret = _secret(request, "mautic")
    if not mautic.signature_ok(body, request.headers.get("webhook-signature"), secret):
        raise failed_authentication(request, 401, "Webhook-Signature missing or not the body's signature "
                                                  "with the Mautic connector's secret")
    payload = _json(body, dict, "a Mautic webhook body is a JSON object of event types")
    mapping = mapping_of(request).mautic
    newest = mautic.newest_time(payload)
    if newest is None or datetime.now(timezone.utc) - newest > timedelta(hours=mapping.max_age_hours):
        raise failed_authentication(request, 401, f"stale or replayed: the newest event timestamp "
                                                  f"({newest.isoformat() if newest else 'none'}) is older than "
                                                  f"{mapping.max_age_hours} h")
    return await _take(request, "mautic", mautic.items(payload, mapping))


@connectors.post(
    "/connectors/hubspot", response_model=ConnectorResult, summary="HubSpot webhook (X-HubSpot-Signature-v3)",
    description=(
        "Takes a HubSpot Webhooks API body as HubSpot sends it (a JSON array of events), verified by "
        "`X-HubSpot-Signature-v3` over method, URL, body and `X-HubSpot-Request-Timestamp` with the app's "
        "client secret; a request older than the mapping's window (5 minutes) is refused. Events are mapped "
        "as for Mautic; HubSpot's `eventId` is the event id, so its retries are duplicates. Behind a proxy "
        "set LEADFLOW_PUBLIC_URL to the address HubSpot calls. No API key."
    ),
    responses=_RESPONSES,
)
async def hubspot_webhook(request: Request) -> ConnectorResult:
    body = await request.body()
    secret = _secret(request, "hubspot")
    public = backends_of(request).settings.public_url
    url = str(request.url) if public is None else public + request.url.path + (
        f"?{request.url.query}" if request.url.query else "")
    stamp = request.headers.get("x-hubspot-request-timestamp")
    if not hubspot.signature_ok(request.method, url, body, stamp, request.headers.get("x-hubspot-signature-v3"),
                                secret):
        raise failed_authentication(request, 401, "X-HubSpot-Signature-v3 missing or not this request's "
                                                  "signature with the HubSpot connector's secret")
    mapping = mapping_of(request).hubspot
    sent = hubspot.request_time(stamp)
    now = datetime.now(timezone.utc)
    window = timedelta(hours=mapping.max_age_hours)
    if sent is None or now - sent > window or sent - now > FUTURE_TOLERANCE:
        raise failed_authentication(request, 401, f"stale or replayed: X-HubSpot-Request-Timestamp {stamp} is "
                                                  f"not within {round(window.total_seconds())} s of now")
    payload = _json(body, list, "a HubSpot webhook body is a JSON array of events")
    return await _take(request, "hubspot", hubspot.items(payload, mapping))


def _json(body: bytes, kind: type, what: str):
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unprocessable(f"body is not JSON: {err}") from None
    if not isinstance(payload, kind):
        raise _unprocessable(what)
    return payload


def _unprocessable(detail: str):
    return invalid(("body",), detail)


async def _take(request: Request, vendor: str, items: list[VendorItem]) -> ConnectorResult:
    """Find or link each contact's lead, check, send and log the events and facts."""
    backends = backends_of(request)
    model, now = await edge_model(request), datetime.now(timezone.utc)
    results = [ItemResult(vendor_type=i.vendor_type, vendor_id=i.vendor_id, outcome="accepted") for i in items]
    usable = []
    for item, result in zip(items, results):
        if item.ignored:
            result.outcome, result.reason = "ignored", item.ignored
        elif item.problem:
            result.outcome, result.reason = "rejected", item.problem
        elif (problem := _edge_problem(item, model, now)) is not None:
            result.outcome, result.reason = "rejected", problem
        else:
            usable.append((item, result))
    contacts = sorted({item.contact_id for item, _ in usable})
    if contacts:
        known = await backends.in_store(AuditStore.leads_by_external, vendor, contacts)
        new = {c: _lead_id(vendor, c) for c in contacts if c not in known}
        if new:
            known |= await backends.in_store(AuditStore.link_external, vendor, new, f"connector:{vendor}")
    events: list[tuple[ActivityEvent, ItemResult]] = []
    updates: list[tuple[ProfileUpdate, ItemResult]] = []
    for item, result in usable:
        result.lead_id = lead_id = known[item.contact_id]
        if item.event_type is not None:
            events.append((ActivityEvent(
                event_id=item.vendor_id, lead_id=lead_id, type=item.event_type, occurred_at=item.occurred_at,
                channel=item.channel, campaign=_campaign(item.campaign), source=f"connector:{vendor}"), result))
        else:
            updates.append((ProfileUpdate(update_id=item.vendor_id, lead_id=lead_id, facts=item.facts,
                                          actor=Actor(name=f"connector:{vendor}", role=Role.MARKETING),
                                          observed_at=item.occurred_at), result))
    if events:
        outcomes = await take_events(request, [event for event, _ in events])
        for position, (_, result) in enumerate(events):
            if position in outcomes:
                result.outcome, result.reason = outcomes[position]
                if result.outcome == "conflict":
                    result.outcome = "rejected"
    for update, result in updates:
        try:
            result.outcome = await take_profile(request, update)
        except leads.LeadClosed as err:
            result.outcome, result.reason = "rejected", str(err)
    await _record(backends, vendor, items, results)
    counts = {o: sum(1 for r in results if r.outcome == o) for o in ("accepted", "duplicate", "ignored", "rejected")}
    return ConnectorResult(connector=vendor, accepted=counts["accepted"], duplicates=counts["duplicate"],
                           ignored=counts["ignored"], rejected=counts["rejected"], results=results)


def _edge_problem(item: VendorItem, model, now: datetime) -> str | None:
    """The API's own edge checks (routes_ingest): an event's type and time, facts' time."""
    if item.event_type is not None:
        problem = event_problem(item.event_type, item.occurred_at, model, now)
        return None if problem is None else f"{problem[0]}: {problem[1]}"
    problem = time_problem(item.occurred_at, now)
    return None if problem is None else f"occurred_at: {problem}"


def _lead_id(vendor: str, contact_id: str) -> str:
    """The lead a new contact gets: `<vendor>-<contact id>`; an id too long for a lead id gets
    a digest of it instead (the same in every process, so concurrent first webhooks agree)."""
    lead_id = f"{vendor}-{re.sub(r'[^A-Za-z0-9_.:-]', '_', contact_id)}"
    if len(lead_id) <= 128 and _LEAD_ID.match(lead_id):
        return lead_id
    return f"{vendor}-{hashlib.sha256(contact_id.encode()).hexdigest()[:32]}"


def _campaign(campaign: str | None) -> str | None:
    if not campaign:
        return None
    cleaned = re.sub(r"[^a-z0-9_.-]", "-", campaign.lower()).strip("-.")[:64]
    return cleaned or None


async def _record(backends, vendor: str, items: list[VendorItem], results: list[ItemResult]) -> None:
    """The connector log (what each item became); best effort: the leads have the events."""
    now = datetime.now(timezone.utc)
    rows = [{"connector": vendor, "received_at": now, "vendor_type": item.vendor_type[:100],
             "vendor_id": item.vendor_id, "contact_id": item.contact_id, "lead_id": result.lead_id,
             "outcome": result.outcome, "reason": (result.reason or "")[:500] or None}
            for item, result in zip(items, results)]
    try:
        await backends.in_store(AuditStore.log_connector, rows)
    except Unavailable as err:
        log.warning("connector log not written: %s", err)


# --------------------------------------------------------------------------- external ids

@connectors.get(
    "/leads/by-external/{system}/{external_id}", response_model=ExternalLink,
    summary="The lead linked to an external id (a CRM or marketing automation contact id)",
    description="Roles: all. Then `GET /leads/{lead_id}` for its state.",
    responses={404: {"model": Problem, "description": "no lead has this external id"}},
)
async def lead_by_external(system: System, external_id: ExternalId, request: Request,
                           caller: Annotated[Principal, Depends(allow(Role.MARKETING, Role.PRESALES, Role.SALES))]
                           ) -> ExternalLink:
    found = await backends_of(request).in_store(AuditStore.leads_by_external, system, [external_id])
    if external_id not in found:
        raise leads.LeadNotFound(f"no lead has {system} id {external_id}")
    return ExternalLink(system=system, external_id=external_id, lead_id=found[external_id])


@connectors.put(
    "/leads/{lead_id}/external/{system}/{external_id}", response_model=ExternalLink,
    summary="Link a lead to its id in another system",
    description=(
        "So a connector's webhooks for that contact reach this lead (a lead made by the API before the "
        "contact existed in the CRM). Idempotent; an external id already linked to another lead is 409 (one "
        "external id names one lead for ever). Roles: marketing, manager."
    ),
    responses={409: {"model": Problem, "description": "the external id is linked to another lead"}},
)
async def link_external(lead_id: PathLeadId, system: System, external_id: ExternalId, request: Request,
                        caller: Annotated[Principal, Depends(allow(Role.MARKETING))]) -> ExternalLink:
    linked = await backends_of(request).in_store(AuditStore.link_external, system, {external_id: lead_id},
                                                 caller.name)
    if linked[external_id] != lead_id:
        return problem_response(409, f"{system} id {external_id} is linked to lead {linked[external_id]}")
    return ExternalLink(system=system, external_id=external_id, lead_id=lead_id)


@connectors.get(
    "/connectors/{vendor}/log", response_model=ConnectorLogPage,
    summary="What each vendor webhook item became, newest first",
    description="Accepted, duplicate, ignored, rejected, with the reason; no personal data. Roles: manager.",
)
async def connector_log(
    vendor: Literal["mautic", "hubspot"], request: Request, caller: Annotated[Principal, Depends(allow())],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="next_cursor of the previous page")] = None,
) -> ConnectorLogPage:
    rows = await backends_of(request).in_store(AuditStore.connector_log, vendor, limit, cursor)
    entries = [ConnectorLogEntry.model_validate(row, from_attributes=True) for row in rows]
    return ConnectorLogPage(entries=entries, next_cursor=entries[-1].id if len(entries) == limit else None)


def check_mapping(path: Path | None) -> None:
    """At startup: a broken mapping file is a start error, not a 500 at the first webhook."""
    _mapping(path or DEFAULT_CONNECTORS)

