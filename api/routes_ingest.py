"""Marketing automation's routes: activity events (one, or a batch) and profile facts,
checked at the edge, logged, and signalled to the leads."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError

import client as leads
from activities.store import AuditStore
from funnel.lead import FUTURE_TOLERANCE
from funnel.models import ActivityEvent, AuditKind, ProfileUpdate, Role
from funnel.scoring_model import ScoringModel

from api import limits
from api.limits import EARLIEST_EVENT, MAX_BATCH, MAX_BODY_BYTES, SEND_TIMEOUT
from api.keys import allow, Principal
from api.schemas import (
    BatchResult, describe_errors, ERRORS, EventAccepted, EventBatchIn, EventIn, EventResult, PathLeadId, Problem,
    problem_response, ProfileAccepted, ProfileIn, RejectedItem,
)
from api.backends import (
    ActiveModel, Backends, backends_of, edge_model, first_line, is_temporal_trouble, NoAnswer, temporal_call,
    Unavailable,
)

log = logging.getLogger("leadflow.api")

ingest = APIRouter(tags=["events and profile facts"], responses=ERRORS)

# =========================================================================== edge checks


def event_problem(event_type: str, occurred_at: datetime, model: ScoringModel, now: datetime
                  ) -> tuple[str, str] | None:
    """(field, message) if an event of this type and time cannot be applied, as the CLI
    checks it (the API's events and the vendor connectors' alike)."""
    if event_type not in model.events:
        return "type", (
            f"unknown event type {event_type!r} in scoring model {model.ref}; known types: "
            + ", ".join(sorted(model.events))
        )
    problem = time_problem(occurred_at, now)
    return ("occurred_at", problem) if problem is not None else None


def time_problem(at: datetime, now: datetime) -> str | None:
    """Why a time is out of range for input (too far in the future, before the earliest)."""
    if at > now + FUTURE_TOLERANCE:
        minutes = int(FUTURE_TOLERANCE.total_seconds() // 60)
        return (f"{at.isoformat()} is more than {minutes} minutes in the future "
                f"(now {now.replace(microsecond=0).isoformat()})")
    if at < EARLIEST_EVENT:
        return f"{at.isoformat()} is before {EARLIEST_EVENT.date().isoformat()}"
    return None


async def _logged(backends: Backends, events: list[ActivityEvent]) -> dict[tuple[str, str], str]:
    """What the event log knows of these ids. Best effort: with the store down, events are
    still taken, and the lead applies each id once regardless."""
    try:
        return await backends.in_store(AuditStore.logged_digests, events)
    except Unavailable as err:
        log.warning("event log not read: %s", err)
        return {}


async def _log(backends: Backends, events: list[ActivityEvent]) -> None:
    """Log events Temporal has taken; best effort (a redelivery of one missing here is sent
    again, and the lead still applies it once)."""
    try:
        await backends.in_store(AuditStore.log_events, events, datetime.now(timezone.utc))
    except Unavailable as err:
        log.warning("events taken but not logged: %s", err)


async def _log_facts(backends: Backends, updates: list[ProfileUpdate]) -> None:
    """Log profile updates Temporal has taken, for replay; best effort, as events."""
    try:
        await backends.in_store(AuditStore.log_facts, updates, datetime.now(timezone.utc))
    except Unavailable as err:
        log.warning("profile update taken but not logged: %s", err)


async def _applied_hint(backends: Backends, kind: AuditKind, wanted: dict[str, list[str]]) -> set[tuple[str, str]]:
    """Best effort: with the store down, events are still taken (and de-duplicated by the lead)."""
    try:
        return await backends.in_store(AuditStore.applied_ids, kind, wanted)
    except Unavailable as err:
        log.warning("duplicate hint skipped: %s", err)
        return set()


async def _deliver(request: Request, events: list[ActivityEvent]) -> dict[str, str]:
    """Signal-with-start the events into their leads, one call per lead, in occurred_at
    order; a new lead starts on the active model. Returns {lead: reason} for closed (won)
    leads; raises Unavailable if Temporal did not take some lead's events (the caller
    retries: delivered events apply once)."""
    backends = backends_of(request)
    temporal = await backends.temporal()
    active: ActiveModel = request.app.state.scoring_model
    by_lead: dict[str, list[ActivityEvent]] = defaultdict(list)
    for event in events:
        by_lead[event.lead_id].append(event)
    gate = asyncio.Semaphore(limits.SEND_CONCURRENCY)

    async def send(lead_events: list[ActivityEvent]) -> None:
        async with gate:
            lead_events.sort(key=lambda e: e.occurred_at)
            lead_id = lead_events[0].lead_id
            model = await active.for_starting(backends, lead_id)
            await asyncio.wait_for(leads.send_events(temporal, backends.settings, lead_events, model), SEND_TIMEOUT)
            active.sent(lead_id)

    results = await asyncio.gather(*(send(items) for items in by_lead.values()), return_exceptions=True)
    closed: dict[str, str] = {}
    failed: list[BaseException] = []
    for lead_id, result in zip(by_lead, results):
        if isinstance(result, leads.LeadClosed):
            closed[lead_id] = f"lead {lead_id} is closed (won): it takes no more events"
        elif isinstance(result, BaseException):
            if not is_temporal_trouble(result):
                raise result
            failed.append(result)
    if failed:
        raise Unavailable(
            f"Temporal did not take the events of {len(failed)} of {len(by_lead)} lead(s) "
            f"({first_line(failed[0])}); retry: events already taken are applied once"
        )
    return closed


async def take_events(request: Request, events: list[ActivityEvent]) -> dict[int, tuple[str, str]]:
    """Send checked events to their leads and log them: {position: (outcome, why)} for those
    not simply accepted (duplicate, conflict, or rejected for a closed lead). Raises
    Unavailable (503) when behind or when Temporal did not take them all: the sender retries."""
    backends = backends_of(request)
    await backends.check_not_behind()
    fresh, known = leads.sort_out(events, await _logged(backends, events))
    closed = await _deliver(request, fresh)
    await _log(backends, [e for e in fresh if e.lead_id not in closed])
    outcomes = dict(known)
    for position, event in enumerate(events):
        if position not in outcomes and event.lead_id in closed:
            outcomes[position] = ("rejected", closed[event.lead_id])
    return outcomes


async def take_profile(request: Request, update: ProfileUpdate) -> str:
    """Send a profile update to its lead and log it: "accepted" or "duplicate" (applied
    before). Raises LeadClosed (410) for a closed lead, Unavailable (503) as take_events."""
    backends = backends_of(request)
    await backends.check_not_behind()
    seen = await _applied_hint(backends, AuditKind.PROFILE_UPDATED, {update.lead_id: [update.update_id]})
    duplicate = (update.lead_id, update.update_id) in seen
    temporal = await backends.temporal()
    active: ActiveModel = request.app.state.scoring_model
    model = await active.for_starting(backends, update.lead_id)
    try:
        await temporal_call(leads.send_profile(temporal, backends.settings, update, model), SEND_TIMEOUT,
                             "profile update")
        active.sent(update.lead_id)
        await _log_facts(backends, [update])
    except leads.LeadClosed:
        if not duplicate:
            raise
    except NoAnswer as err:
        raise Unavailable(str(err)) from None
    return "duplicate" if duplicate else "accepted"


# --------------------------------------------------------------------------- events and profile facts

_INGEST_ROLES = "Roles: marketing, manager."


@ingest.post(
    "/events", status_code=202, response_model=EventAccepted,
    summary="One activity event (a webhook)",
    description=(
        "Validates the event (fields, type known in the scoring model, occurred_at not more than 5 minutes "
        "in the future) and signals it into its lead's workflow, creating the lead. 202 means Temporal holds "
        "it durably. Idempotent by event_id, for ever: an id taken before with the same content is answered "
        "`duplicate` and changes nothing; with other content it is 409 (a new event needs a new id). "
        "410 if the lead is closed (won). " + _INGEST_ROLES
    ),
    responses={410: {"model": Problem, "description": "the lead is closed (won)"},
               409: {"model": Problem, "description": "this event id was taken with other content"}},
)
async def post_event(
    event: EventIn, request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))]
) -> EventAccepted:
    problem = event_problem(event.type, event.occurred_at, await edge_model(request), datetime.now(timezone.utc))
    if problem is not None:
        field, msg = problem
        raise RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])
    backends = backends_of(request)
    await backends.check_not_behind()
    taken = event.to_event(caller.name)
    fresh, known = leads.sort_out([taken], await _logged(backends, [taken]))
    if known:
        outcome, why = known[0]
        if outcome == "conflict":
            return problem_response(409, why)
        return EventAccepted(event_id=event.event_id, lead_id=event.lead_id, outcome="duplicate", detail=why)
    closed = await _deliver(request, fresh)
    if closed:
        raise leads.LeadClosed(closed[event.lead_id])
    await _log(backends, fresh)
    return EventAccepted(event_id=event.event_id, lead_id=event.lead_id, outcome="accepted",
                         detail="taken; applied once by the lead")


@ingest.post(
    "/events/batch", status_code=202, response_model=BatchResult,
    summary=f"Up to {MAX_BATCH} activity events at once",
    description=(
        f"1 to {MAX_BATCH} events for any leads (body at most {MAX_BODY_BYTES} bytes). Each event is validated "
        "on its own: a bad one is `rejected` with its reason (naming the field) while the good ones are "
        "`accepted`, so the answer is 202 with one result per event, in order. Events of one lead are "
        "delivered together, in occurred_at order, and the lead applies them in time order. An event for a "
        "closed (won) lead is rejected. A repeat of an event_id in the same batch, or an event the audit "
        "store shows applied, is `duplicate`. The whole batch is refused (422) only if the body is not "
        "`{\"events\": [...]}` with 1 to 500 items. 503 if Temporal could not take every lead's events: "
        "retry the batch, events already taken are applied once. " + _INGEST_ROLES
    ),
)
async def post_events(
    batch: EventBatchIn, request: Request, caller: Annotated[Principal, Depends(allow(Role.MARKETING))]
) -> BatchResult:
    model, now = await edge_model(request), datetime.now(timezone.utc)
    results: list[EventResult] = []
    valid: dict[int, EventIn] = {}
    for index, item in enumerate(batch.events):
        if isinstance(item, RejectedItem):
            results.append(EventResult(index=index, outcome="rejected",
                                       reason=describe_errors(item.errors, ("events", index))))
            continue
        result = EventResult(index=index, event_id=item.event_id, lead_id=item.lead_id, outcome="accepted")
        results.append(result)
        if (problem := event_problem(item.type, item.occurred_at, model, now)) is not None:
            result.outcome, result.reason = "rejected", f"events.{index}.{problem[0]}: {problem[1]}"
        else:
            valid[index] = item
    if valid:
        indexes = list(valid)
        taken = await take_events(request, [valid[index].to_event(caller.name) for index in indexes])
        for position, index in enumerate(indexes):
            if position in taken:
                results[index].outcome, results[index].reason = taken[position]
    counts = {outcome: sum(1 for r in results if r.outcome == outcome) for outcome in ("accepted", "duplicate",
                                                                                        "rejected", "conflict")}
    return BatchResult(accepted=counts["accepted"], duplicates=counts["duplicate"], rejected=counts["rejected"],
                       conflicts=counts["conflict"], results=results)


@ingest.post(
    "/leads/{lead_id}/profile", status_code=202, response_model=ProfileAccepted,
    summary="Profile (fit) facts about a lead",
    description=(
        "Signals the facts into the lead (creating it); the lead re-evaluates its fit rules. Idempotent by "
        "update_id (give one for webhook redeliveries). The actor recorded is the API key's owner. "
        "410 if the lead is closed (won). " + _INGEST_ROLES
    ),
    responses={410: {"model": Problem, "description": "the lead is closed (won)"}},
)
async def post_profile(
    lead_id: PathLeadId, body: ProfileIn, request: Request,
    caller: Annotated[Principal, Depends(allow(Role.MARKETING))],
) -> ProfileAccepted:
    update = ProfileUpdate(update_id=body.update_id or f"pu-{uuid.uuid4()}", lead_id=lead_id, facts=body.facts,
                           actor=caller.actor)
    duplicate = await take_profile(request, update) == "duplicate"
    return ProfileAccepted(
        update_id=update.update_id, lead_id=lead_id, outcome="duplicate" if duplicate else "accepted",
        detail="already applied: changes nothing" if duplicate else "taken; applied once by the lead",
    )


