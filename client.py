"""How callers reach lead workflows: the CLI, the HTTP API, the benchmark and the tests.

Events and profile facts go in by signal-with-start, so the first one creates
the lead; commands are workflow updates whose refusals come back as
`CommandRefused` with the lead's reason; reads are queries (live state) or the
audit store (history). Errors are translated into three plain exceptions so
no caller has to know Temporal's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from datetime import datetime, timedelta, timezone

from pydantic import BaseModel
from temporalio.common import WorkflowIDConflictPolicy

from activities.store import AuditStore, ModelVersion
from config import Settings
from funnel.accounts import ACCOUNT_KEY_PREFIX, AccountView
from workflows.account_input import account_workflow_id
from funnel.lead import Lead, LeadView
from funnel.models import (
    ActivityEvent,
    Actor,
    AuditEntry,
    Command,
    FactValue,
    LeadState,
    Outbound,
    ProfileUpdate,
    WindowEvent,
    event_digest,
)
from funnel.personal_data import EraseRequest, ErasureReport
from funnel.scoring_model import ScoringModel, parse_model
from workflows import search_attributes as sa
from workflows.lead import UPDATE_FOR_COMMAND, LeadInput, LeadWorkflow, new_lead, workflow_id
from workflows.lead_input import CURRENT_VERSION
from workflows.rollout import ModelRolloutWorkflow, RolloutInput, RolloutProgress, rollout_id

log = logging.getLogger(__name__)

# One signal carries at most this many events (payloads stay far below 2 MB).
SIGNAL_BATCH = 100
PREVIEW_TIMEOUT = 5.0  # s for one lead to answer a dry run's query
NOT_READY_RETRIES = 5
# How far beyond a creation-time bound visibility is asked (LeadFilters.query): its
# comparison is off by up to a millisecond; the leads in the margin are filtered here.
VISIBILITY_TIME_MARGIN = timedelta(milliseconds=10)


class LeadNotFound(LookupError):
    pass


class LeadClosed(RuntimeError):
    """The lead's workflow has ended: won (completed), or, rarely, ended abnormally
    (terminated by an operator or the server); either way it takes no more input, and
    the message says which."""


class LeadStarting(RuntimeError):
    """The lead exists but has not started its work yet (its worker is behind): ask again soon."""


class TemporalUnavailable(ConnectionError):
    """Temporal could not be reached or did not take the call; retrying may help."""


class CommandRefused(ValueError):
    """The lead refused a command; the message is the lead's reason."""


@dataclass
class LeadSummary:
    lead_id: str
    stage: str | None
    score: float | None
    owner: str | None
    channel: str | None
    created_at: datetime | None = None  # None: a lead whose run predates version 6 (see LeadCreated)
    closed: bool = False  # won: its workflow has completed


@dataclass(frozen=True)
class LeadFilters:
    """Which leads a list shows, as a Temporal visibility query over the lead's search
    attributes (workflows/search_attributes.py)."""

    stage: str | None = None
    owner: str | None = None
    channel: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    closed: bool = False  # won leads as well as running ones
    lead_ids: list[str] | None = None  # only these (polling by time: AuditStore.changed_leads)

    def query(self) -> str:
        statuses = "'Running', 'Completed'" if self.closed else "'Running'"
        parts = [f"WorkflowType = '{LeadWorkflow.__name__}'", f"ExecutionStatus IN ({statuses})"]
        if self.lead_ids is not None:
            parts.append("WorkflowId IN (" + ", ".join(f"'{_quote(workflow_id(lead))}'" for lead in self.lead_ids) + ")")
        for key, value in ((sa.LEAD_STAGE, self.stage), (sa.LEAD_OWNER, self.owner), (sa.LEAD_CHANNEL, self.channel)):
            if value:
                parts.append(f"{key.name} = '{_quote(value)}'")
        for op, value in ((">=", self.min_score), ("<=", self.max_score)):
            if value is not None:
                parts.append(f"{sa.LEAD_SCORE.name} {op} {float(value)!r}")
        # Visibility compares LeadCreated at about a millisecond, rounding (the dev server's
        # SQLite listed a lead created at .001500 from .002000, and not one created at .999999
        # from that very instant): it is asked with a margin, and `admits` keeps what the
        # filter says, to the microsecond.
        for op, at, margin in ((">=", self.created_from, -VISIBILITY_TIME_MARGIN),
                               ("<", self.created_to, VISIBILITY_TIME_MARGIN)):
            if at is None:
                continue
            try:
                wide = (at + margin).astimezone(timezone.utc)
            except OverflowError:  # a bound within the margin of the first or last instant: none
                continue
            parts.append(f"{sa.LEAD_CREATED.name} {op} '{wide.isoformat()}'")
        return " AND ".join(parts)

    def admits(self, lead: LeadSummary) -> bool:
        """Whether a lead visibility listed is within the creation times asked, exactly."""
        if self.created_from is None and self.created_to is None:
            return True
        created = lead.created_at
        return created is not None and (self.created_from is None or created >= self.created_from) \
            and (self.created_to is None or created < self.created_to)


@dataclass
class LeadPage:
    leads: list[LeadSummary]
    next_cursor: str | None  # pass it back for the next page; None: this was the last


def _start_options(settings: Settings, lead_id: str, attributes: TypedSearchAttributes | None = None) -> dict:
    return dict(
        id=workflow_id(lead_id),
        task_queue=settings.task_queue,
        # A won lead's workflow has completed; new input must not start a fresh lead.
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        **({"search_attributes": attributes} if attributes else {}),
    )


def _input(settings: Settings, lead_id: str, model: ScoringModel | None = None) -> LeadInput:
    return LeadInput(lead_id=lead_id, model=model, max_history_events=settings.max_history_events, version=CURRENT_VERSION,
                     quiet_history_events=settings.quiet_history_events, quiet_after_seconds=settings.quiet_after_seconds,
                     audit_max_lag_seconds=settings.audit_max_lag_seconds,
                     decision_delay_seconds=settings.decision_delay_seconds,
                     shred_delay_seconds=settings.shred_delay_seconds,
                     created_at=datetime.now(timezone.utc) if model is not None else None)


def _start_attributes(inp: LeadInput, first: list[ActivityEvent | ProfileUpdate]) -> TypedSearchAttributes | None:
    """The search attributes a new lead will have after its first input, computed by the same
    core at its creation time (`LeadInput.created_at`), for its start: it then upserts only
    what differs (RunBehaviour.starts_with_attributes), so most new leads cost no visibility
    write of their own. Only where the starter passes the model (a lead that already runs
    ignores start attributes); a wrong guess costs that upsert, nothing else."""
    if inp.model is None or inp.created_at is None:
        return None
    try:
        lead = new_lead(inp, inp.model, first, inp.created_at, timedelta(seconds=inp.decision_delay_seconds))
        lead.take(first, inp.created_at)
        return sa.typed(sa.of_lead(lead.state))
    except Exception:  # noqa: BLE001 - a guess must never keep input from its lead
        log.exception("start attributes of lead %s not predicted; the lead upserts them itself", inp.lead_id)
        return None


async def send_events(client: Client, settings: Settings, events: list[ActivityEvent],
                      model: ScoringModel | None = None) -> None:
    """Deliver events to their leads (creating them), one signal per lead and batch.
    A lead created here starts on `model`, the active scoring model (or loads it itself).

    Raises LeadClosed if a lead has ended (saying how); events for other leads are still
    sent. Raises TemporalUnavailable if Temporal did not take them (retry: events
    already taken are applied once).
    """
    by_lead: dict[str, list[ActivityEvent]] = defaultdict(list)
    for event in events:
        by_lead[event.lead_id].append(event)
    closed = []
    for lead_id, lead_events in by_lead.items():
        for i in range(0, len(lead_events), SIGNAL_BATCH):
            chunk = lead_events[i : i + SIGNAL_BATCH]
            inp = _input(settings, lead_id, model if i == 0 else None)  # (only the first chunk may start it)
            options = _start_options(settings, lead_id, _start_attributes(inp, list(chunk)))
            try:
                if len(chunk) == 1:
                    await client.start_workflow(LeadWorkflow.run, inp, **options,
                                                start_signal="event", start_signal_args=[chunk[0]])
                else:
                    await client.start_workflow(LeadWorkflow.run, inp, **options,
                                                start_signal="events", start_signal_args=[chunk])
            except WorkflowAlreadyStartedError:
                closed.append(await _how_it_ended(client, lead_id))
                break
            except RPCError as err:
                raise TemporalUnavailable(f"Temporal did not take the events of lead {lead_id}: {err.message}") from None
    if closed:
        raise LeadClosed("; ".join(closed) + ": events not applied")


def sort_out(events: list[ActivityEvent], logged: dict[tuple[str, str], str]) -> tuple[list[ActivityEvent], dict]:
    """Split events by what the event log knows of their ids: (new ones to send,
    {position: (outcome, why)} for the others). Same content: a duplicate, which changes
    nothing; other content under a taken id: a conflict (a new event needs a new id)."""
    fresh, known = [], {}
    first: dict[tuple[str, str], str] = {}
    for position, event in enumerate(events):
        key, digest = (event.lead_id, event.event_id), event_digest(event)
        if key in logged or key in first:
            same = (logged.get(key) or first.get(key)) == digest
            where = "was taken" if key in logged else "comes earlier in this request"
            known[position] = ("duplicate", f"{'already taken' if key in logged else 'repeated'}: changes nothing") if same else (
                "conflict", f"event id {event.event_id} of lead {event.lead_id} {where} with other content; "
                            "a new event needs a new id")
        else:
            first[key] = digest
            fresh.append(event)
    return fresh, known


async def _how_it_ended(client: Client, lead_id: str) -> str:
    """'lead L closed (won)' or, for a run that did not complete, what ended it."""
    try:
        described = await client.get_workflow_handle(workflow_id(lead_id)).describe()
    except RPCError:
        return f"lead {lead_id} closed"
    status = described.status
    if status is None or status.name == "COMPLETED":
        return f"lead {lead_id} closed (won)"
    return (f"lead {lead_id} ended abnormally ({status.name.lower().replace('_', ' ')}), not won: "
            "an operator must look at its workflow")


async def send_profile(client: Client, settings: Settings, update: ProfileUpdate,
                       model: ScoringModel | None = None) -> None:
    inp = _input(settings, update.lead_id, model)
    try:
        await client.start_workflow(
            LeadWorkflow.run, inp, **_start_options(settings, update.lead_id, _start_attributes(inp, [update])),
            start_signal="profile", start_signal_args=[update],
        )
    except WorkflowAlreadyStartedError:
        raise LeadClosed(f"{await _how_it_ended(client, update.lead_id)}: profile not applied") from None
    except RPCError as err:
        raise TemporalUnavailable(f"Temporal did not take the profile of lead {update.lead_id}: {err.message}") from None


class CommandTimedOut(TimeoutError):
    """The lead did not answer the command in time; it may still be applied. Send it again
    with the same idempotency key to get its outcome (it is applied at most once)."""


async def run_command(client: Client, lead_id: str, command: Command, key: str | None = None) -> LeadView:
    """Execute a presales/sales/manager command as a workflow update, once per idempotency
    `key` (the update's id): sent again with the same key, it is answered with its outcome."""
    handle = client.get_workflow_handle(workflow_id(lead_id))
    update = UPDATE_FOR_COMMAND[command.kind]
    try:
        return await _update(handle, update, command, result_type=LeadView, update_id=key)
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError):
            raise CommandRefused(cause.message) from None
        raise
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise CommandTimedOut(f"lead {lead_id} did not answer the {command.kind} command in time; it may still be "
                              f"applied: send it again with the same idempotency key ({key}) for its outcome") from None
    except RPCError as err:
        # A lead that ended answers NOT_FOUND too, with "already completed".
        if "completed" in err.message.lower():
            raise LeadClosed(f"{await _how_it_ended(client, lead_id)}: it takes no more commands") from None
        _raise_not_found(err, lead_id)
        raise


class CommandOutcome(BaseModel):
    key: str
    outcome: str  # applied, refused, unknown (never received, or still waiting for the lead)
    detail: str
    entries: list[AuditEntry]


async def command_outcome(client: Client, store: AuditStore, lead_id: str, key: str) -> CommandOutcome:
    """What became of a command: the lead's memory of its key, and its entries in the store."""
    entries = await asyncio.to_thread(store.command_entries, lead_id, key)
    known = None
    try:
        known = await asyncio.wait_for(client.get_workflow_handle(workflow_id(lead_id)).query(
            LeadWorkflow.command_outcome, key, result_type=str | None), TAIL_TIMEOUT)
    except (RPCError, WorkflowQueryFailedError, TimeoutError):
        pass  # ended (won), or no worker: the store answers
    if known is None and entries:
        known = "applied"
    if known is None:
        return CommandOutcome(key=key, outcome="unknown", detail="no command with this key has been applied (yet): "
                              "it may still be waiting for the lead, or it was refused when sent (a refusal changes "
                              "nothing and is judged anew when the command is sent again)", entries=[])
    outcome = "refused" if known.startswith("refused") else "applied"
    return CommandOutcome(key=key, outcome=outcome, detail=known.removeprefix("refused: "), entries=entries)


async def _update(handle, update, arg, result_type, update_id: str | None = None):
    """Execute an update, sending it again when it met a workflow task that failed (e.g. a
    continue-as-new the server refused because this very update arrived): it was never
    accepted then, so sending it again is safe."""
    for attempt in range(NOT_READY_RETRIES):
        try:
            if arg is None:
                return await handle.execute_update(update, id=update_id, result_type=result_type)
            return await handle.execute_update(update, arg, id=update_id, result_type=result_type)
        except RPCError as err:
            if b"WorkflowNotReadyFailure" not in (err.raw_grpc_status or b"") or attempt == NOT_READY_RETRIES - 1:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


async def get_view(client: Client, lead_id: str) -> LeadView:
    handle = client.get_workflow_handle(workflow_id(lead_id))
    try:
        return await handle.query(LeadWorkflow.view, result_type=LeadView)
    except RPCError as err:
        _raise_not_found(err, lead_id)
        if b"QueryFailedFailure" in (err.raw_grpc_status or b""):  # some servers answer a failed query so
            raise LeadStarting(f"lead {lead_id} exists but is still starting; ask again in a moment") from None
        raise
    except WorkflowQueryFailedError as err:
        raise LeadStarting(f"lead {lead_id} exists but is still starting; ask again in a moment ({err})") from None


async def get_account(client: Client, account_id: str) -> AccountView:
    """An account's state (funnel/accounts.py) from its workflow."""
    handle = client.get_workflow_handle(account_workflow_id(account_id))
    try:
        return await handle.query("account_view", result_type=AccountView)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise LeadNotFound(f"no account {account_id}") from None
        if b"QueryFailedFailure" in (err.raw_grpc_status or b""):
            raise LeadStarting(f"account {account_id} is still starting; ask again in a moment") from None
        raise
    except WorkflowQueryFailedError as err:
        raise LeadStarting(f"account {account_id} is still starting; ask again in a moment ({err})") from None


ACCOUNT_QUERY_TIMEOUT = 5.0  # s per account in a list: one that does not answer is left out, not waited for


def _accounts_query(task_queue: str) -> str:
    if "'" in task_queue or "\\" in task_queue:
        raise ValueError(f"invalid task queue {task_queue!r}")
    return f"WorkflowType = 'AccountWorkflow' AND ExecutionStatus = 'Running' AND TaskQueue = '{task_queue}'"


async def account_counts(client: Client, task_queue: str) -> tuple[int, int]:
    """(accounts, marketing-qualified accounts) of this deployment, counted by visibility."""
    base = _accounts_query(task_queue)
    total = await client.count_workflows(base)
    mqa = await client.count_workflows(f"{base} AND {sa.LEAD_STAGE.name} = 'mqa'")
    return total.count, mqa.count


async def account_page(client: Client, task_queue: str, cursor: str | None = None, size: int = 50
                       ) -> tuple[list[AccountView], str | None]:
    """A page of this deployment's accounts (newest first) with their state, asked of all at
    once; the next page's cursor. An account that does not answer in time is left out."""
    token = _page_token(cursor) if cursor else None
    executions = client.list_workflows(_accounts_query(task_queue), page_size=size, next_page_token=token)
    await executions.fetch_next_page()

    async def view(account_id: str) -> AccountView | None:
        try:
            return await asyncio.wait_for(get_account(client, account_id), ACCOUNT_QUERY_TIMEOUT)
        except (LeadNotFound, LeadStarting, TimeoutError, RPCError):
            return None

    views = await asyncio.gather(*(view(e.id.removeprefix(ACCOUNT_KEY_PREFIX)) for e in executions.current_page or []))
    following = executions.next_page_token
    return [v for v in views if v is not None], _cursor(following) if following else None


TAIL_TIMEOUT = 3.0  # s for a lead to say what it has not written yet; no worker, no answer


class TailUnknown(TimeoutError):
    """The lead did not say what it has not written yet (no worker): the store alone answers."""


async def audit_tail(client: Client, lead_id: str, timeout: float = TAIL_TIMEOUT, after_seq: int = 0) -> list[AuditEntry]:
    """Entries the lead has not written to the store yet (none if it has closed), those after
    `after_seq` only if given. Raises TailUnknown when the lead does not answer in time (no
    worker is running): a history read must not hang on that."""
    handle = client.get_workflow_handle(workflow_id(lead_id))
    try:
        return await asyncio.wait_for(
            handle.query(LeadWorkflow.audit_tail, after_seq, result_type=list[AuditEntry]), timeout)
    except TimeoutError:
        raise TailUnknown(f"lead {lead_id} did not answer within {timeout:g} s: is a worker running?") from None
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND or "completed" in err.message.lower():
            return []  # never existed, or won: a won lead writes everything before it completes
        raise
    except WorkflowQueryFailedError:
        return []  # still starting: it has decided nothing yet


def merge_history(tail: list[AuditEntry], stored: int, store_page, offset: int,
                  limit: int) -> tuple[int, list[AuditEntry]]:
    """One page of a lead's whole history: `stored` entries in the store (one writer
    per lead, batches in order, so seqs 1..stored), then the lead's unwritten `tail`.
    `store_page(offset, limit)` reads the store. Returns (total, page)."""
    tail = [entry for entry in tail if entry.seq > stored]
    page = list(store_page(offset, limit)) if offset < stored else []
    if len(page) < limit:
        start = max(offset - stored, 0)
        page += tail[start : start + limit - len(page)]
    return stored + len(tail), page


async def read_history(client: Client, store: AuditStore, lead_id: str, offset: int = 0,
                       limit: int = 100) -> tuple[int, list[AuditEntry]]:
    """A lead's whole audit history, oldest first: the store, then what the lead still
    holds (score changes wait up to LEADFLOW_AUDIT_MAX_LAG for the store)."""
    # The tail first, then the store: whatever the lead writes in between is then in
    # the store (and dropped from the tail), never missing from both.
    tail = await audit_tail(client, lead_id)

    def from_store() -> tuple[int, list[AuditEntry]]:
        return merge_history(tail, store.count_history(lead_id),
                             lambda o, n: store.history(lead_id, offset=o, limit=n), offset, limit)

    return await asyncio.to_thread(from_store)


async def flush_audit(client: Client, lead_id: str) -> int:
    """Have the lead write all its audit entries to the store now; returns the last seq."""
    handle = client.get_workflow_handle(workflow_id(lead_id))
    try:
        return await _update(handle, LeadWorkflow.flush_audit, None, result_type=int)
    except RPCError as err:
        if "completed" in err.message.lower():
            return -1  # won: everything was written before it completed
        _raise_not_found(err, lead_id)
        raise


async def list_leads(client: Client, stage: str | None = None, owner: str | None = None,
                     limit: int = 1000) -> list[LeadSummary]:
    """Running leads from Temporal visibility, optionally by stage and owner, by id."""
    page = await lead_page(client, LeadFilters(stage=stage, owner=owner), size=limit)
    return sorted(page.leads, key=lambda lead: lead.lead_id)


async def lead_page(client: Client, filters: LeadFilters, cursor: str | None = None, size: int = 50) -> LeadPage:
    """One page of leads from Temporal visibility (newest runs first) and the cursor of the
    next: Temporal's page token, opaque to callers, so paging goes on past any count. With a
    creation-time filter a page can hold fewer than `size` leads (those visibility listed
    within its margin of a bound are left out): follow `next_cursor` until it is None."""
    token = _page_token(cursor) if cursor else None
    executions = client.list_workflows(filters.query(), page_size=size, next_page_token=token)
    try:
        await executions.fetch_next_page()
    except RPCError as err:
        if err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise ValueError(f"invalid cursor or filter: {err.message}") from None
        raise
    found = []
    for execution in executions.current_page or []:
        attrs = execution.typed_search_attributes
        lead = LeadSummary(
            lead_id=execution.id.removeprefix("lead-"), stage=attrs.get(sa.LEAD_STAGE), score=attrs.get(sa.LEAD_SCORE),
            owner=attrs.get(sa.LEAD_OWNER), channel=attrs.get(sa.LEAD_CHANNEL), created_at=attrs.get(sa.LEAD_CREATED),
            closed=execution.status is not None and execution.status != WorkflowExecutionStatus.RUNNING,
        )
        if filters.admits(lead):
            found.append(lead)
    token = executions.next_page_token
    return LeadPage(found, _cursor(token) if token else None)


def _cursor(token: bytes) -> str:
    """Temporal's page token with a digest of it: a cursor that was not made here is refused
    as such (a garbled token reaches Temporal as an internal error, not a bad argument)."""
    return base64.urlsafe_b64encode(hashlib.blake2b(token, digest_size=8).digest() + token).decode("ascii")


def _page_token(cursor: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raw = b""
    digest, token = raw[:8], raw[8:]
    if not token or hashlib.blake2b(token, digest_size=8).digest() != digest:
        raise ValueError("invalid cursor: pass back the next_cursor of the previous page")
    return token


def _quote(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"invalid filter value {value!r}")
    return value


def _raise_not_found(err: RPCError, lead_id: str) -> None:
    if err.status == RPCStatusCode.NOT_FOUND:
        raise LeadNotFound(f"no lead {lead_id}") from None


# --------------------------------------------------------------------------- personal data (GDPR Art. 15, 17)


async def erase_person(client: Client, store: AuditStore, lead_id: str, by: Actor) -> ErasureReport:
    """Erase the person's data (GDPR Art. 17): see funnel/personal_data.py for what goes and
    what stays. A running lead does it itself (update `erase`: its state, the store, a new key
    generation, its old history crypto-shredded shortly after); for a lead whose workflow has
    ended, the store is scrubbed and every key generation destroyed here at once."""
    handle = client.get_workflow_handle(workflow_id(lead_id))
    try:
        return await _update(handle, LeadWorkflow.erase, EraseRequest(by=by), result_type=ErasureReport)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND and "completed" not in err.message.lower():
            raise TemporalUnavailable(f"Temporal did not take the erasure of lead {lead_id}: {err.message}") from None
    # Not running: ended (won, or ended abnormally), or unknown to Temporal (e.g. past retention).
    from activities.personal_data_activities import lead_keys_of

    keys = lead_keys_of(client)
    try:
        await handle.describe()
        known = True
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise TemporalUnavailable(f"Temporal did not say whether lead {lead_id} exists: {err.message}") from None
        known = await asyncio.to_thread(lambda: bool(store.count_history(lead_id) or store.outbox_of(lead_id)))
    destroyed = await keys.destroy(lead_id)  # also the key that sending the update made for nobody
    if not known:
        raise LeadNotFound(f"no lead {lead_id}")
    now = datetime.now(timezone.utc)
    report = ErasureReport(lead_id=lead_id, erasure_id=f"{lead_id}/ended/{now.isoformat()}", erased_by=by.name,
                           erased_at=now, keys_destroyed_at=now,
                           history=f"crypto-shredded: the lead's workflow has ended; {destroyed} key generation(s) destroyed")
    return await asyncio.to_thread(store.erase_personal_data, report, None)


class LoggedEvent(BaseModel):
    """An event as the event log keeps it: the attributes are the person's (blank after an erasure)."""

    event_id: str
    type: str
    occurred_at: datetime
    received_at: datetime
    channel: str | None
    campaign: str | None
    source: str | None
    attributes: dict


class LoggedProfileUpdate(BaseModel):
    """A profile update as the event log keeps it: the facts are the person's (names only
    after an erasure)."""

    update_id: str
    observed_at: datetime | None
    received_at: datetime
    actor: str
    role: str
    facts: dict


class PersonalDataExport(BaseModel):
    """Everything Leadflow keeps about a person (GDPR Art. 15), as `leadflow export-person` and
    GET /leads/{id}/personal-data give it."""

    lead_id: str
    exported_at: datetime
    complete: bool
    notes: list[str]
    profile: dict[str, FactValue]
    profile_observed: dict[str, dict[str, str]]  # fact -> when it was true and which update said so
    consent: dict
    events: list[WindowEvent]  # the events the lead keeps (its last year), with their attributes
    received_events: list[LoggedEvent] = []  # every event taken for the lead (the event log), oldest first
    received_profile_updates: list[LoggedProfileUpdate] = []  # every profile update taken (the event log)
    lead: LeadView | None
    history: list[AuditEntry]
    outbox: list[Outbound]
    erasures: list[ErasureReport]


EXPORT_TIMEOUT = 15.0  # s for the lead to answer an export's queries (a busy worker is slow, not gone)


async def export_person(client: Client | None, store: AuditStore, lead_id: str,
                        timeout: float = EXPORT_TIMEOUT) -> PersonalDataExport:
    """The lead's state from its workflow (facts, events with attributes), its whole audit
    history, every outbound message and its erasures. Without Temporal (or a worker to
    answer), the store's part alone, and `complete` is false."""
    notes: list[str] = []
    state = view = None
    tail: list[AuditEntry] = []
    if client is not None:
        handle = client.get_workflow_handle(workflow_id(lead_id))

        async def ask() -> tuple[LeadState, LeadView]:
            while True:  # a run that has just continued-as-new answers once it has started
                try:
                    return await asyncio.gather(handle.query(LeadWorkflow.state, result_type=LeadState),
                                                handle.query(LeadWorkflow.view, result_type=LeadView))
                except WorkflowQueryFailedError:
                    await asyncio.sleep(0.2)

        try:
            state, view = await asyncio.wait_for(ask(), timeout)
            tail = await audit_tail(client, lead_id, timeout)
        except (RPCError, WorkflowQueryFailedError, TimeoutError, TailUnknown, LookupError) as err:
            text = getattr(err, "message", None) or str(err) or type(err).__name__
            notes.append(f"the lead's workflow did not answer ({text.splitlines()[0][:200]}): facts and events "
                         "are missing; the rest is the store's")
    else:
        notes.append("Temporal not reached: facts and events are missing; the rest is the store's")

    def from_store():
        stored = store.count_history(lead_id)
        _, history = merge_history(tail, stored, lambda o, n: store.history(lead_id, offset=o, limit=n), 0, 10**9)
        received, updates = [], []
        for row in store.replay_log(lead_id):  # the event log: events and profile updates in one read
            if "event_id" in row._fields:
                received.append(LoggedEvent.model_validate(row, from_attributes=True))
            else:
                updates.append(LoggedProfileUpdate.model_validate(row, from_attributes=True))
        return history, store.outbox_of(lead_id), store.erasures(lead_id), received, updates

    history, outbox, erasures, received, updates = await asyncio.to_thread(from_store)
    if state is None and not history and not outbox and not received:
        raise LeadNotFound(f"no lead {lead_id}")
    consent = {}
    if view is not None:
        consent = dict(view.consent)
    return PersonalDataExport(
        lead_id=lead_id, exported_at=datetime.now(timezone.utc), complete=state is not None, notes=notes,
        profile=dict(state.profile) if state else {},
        profile_observed={name: {"observed_at": seen[0].isoformat(), "update_id": seen[1]}
                          for name, seen in (state.profile_seen.items() if state else [])},
        consent=consent, events=list(state.engagement.window) if state else [], received_events=received, received_profile_updates=updates,
        lead=view,
        history=history, outbox=outbox, erasures=erasures,
    )


# --------------------------------------------------------------------------- scoring model versions


class ModelPreview(BaseModel):
    """What applying a model would change among the running leads (`--dry-run`)."""

    model: str
    leads: int
    score_changes: int
    stage_changes: int
    unreadable: int  # leads that did not answer (starting, or no worker)
    examples: list[dict]


async def apply_model(client: Client, settings: Settings, store: AuditStore, text: str, source: str, by: Actor,
                      rate_per_second: float = 20.0) -> tuple[ModelVersion, RolloutProgress | None]:
    """Validate a model file's text, record it in the store as the active version (who, when,
    digest) and start rolling it out to the running leads (continuing a rollout already
    under way). Raises ModelError for an invalid file, ModelConflict for a reused version."""
    model = parse_model(text, source)
    version = await asyncio.to_thread(store.record_model, model.ref, text, by.name)
    await client.start_workflow(
        ModelRolloutWorkflow.run, RolloutInput(ref=model.ref, by=by, rate_per_second=rate_per_second),
        id=rollout_id(model.ref, settings.task_queue), task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )
    return version, await rollout_progress(client, settings, model.ref)


async def rollout_progress(client: Client, settings: Settings, ref: str) -> RolloutProgress | None:
    handle = client.get_workflow_handle(rollout_id(ref, settings.task_queue))
    try:
        return await handle.query(ModelRolloutWorkflow.progress, result_type=RolloutProgress | None)
    except (RPCError, WorkflowQueryFailedError):
        return None


async def preview_model(client: Client, store: AuditStore, settings: Settings, model: ScoringModel,
                        concurrency: int = 16, examples: int = 10) -> ModelPreview:
    """Try `model` on every running lead's state with the pure core, changing nothing."""
    query = (f"WorkflowType = '{LeadWorkflow.__name__}' AND ExecutionStatus = 'Running' "
             f"AND TaskQueue = '{_quote(settings.task_queue)}'")
    ids = [execution.id async for execution in client.list_workflows(query)]
    models: dict[str, ScoringModel] = {model.ref: model}
    gate = asyncio.Semaphore(concurrency)
    now = datetime.now(timezone.utc)
    results: list[dict | None] = []

    def model_of(ref: str) -> ScoringModel | None:
        if ref not in models:
            version = store.model_version(ref)
            if version is not None:
                models[ref] = parse_model(version.text, ref)
            else:  # a store that never recorded the worker's file model
                from funnel.scoring_model import load_model

                from_file = load_model(settings.model_path)
                models[ref] = from_file if from_file.ref == ref else None  # type: ignore[assignment]
        return models[ref]

    async def one(wf_id: str) -> dict | None:
        async with gate:
            try:  # a lead whose worker does not answer is counted, not waited for
                state = await asyncio.wait_for(
                    client.get_workflow_handle(wf_id).query(LeadWorkflow.state, result_type=LeadState), PREVIEW_TIMEOUT)
            except (RPCError, WorkflowQueryFailedError, TimeoutError):
                return None
        current = await asyncio.to_thread(model_of, state.model_ref)
        if current is None:
            return None
        before = (state.score.total, state.stage)
        lead = Lead(state, current)
        lead.use_model(model, now)
        lead.tick(now + timedelta(seconds=settings.decision_delay_seconds))
        return {"lead_id": state.lead_id, "score": [before[0], lead.state.score.total],
                "stage": [before[1].value, lead.state.stage.value]}

    results = await asyncio.gather(*(one(i) for i in ids))
    changed = [r for r in results if r is not None and (r["score"][0] != r["score"][1] or r["stage"][0] != r["stage"][1])]
    return ModelPreview(
        model=model.ref, leads=len(ids),
        score_changes=sum(1 for r in changed if r["score"][0] != r["score"][1]),
        stage_changes=sum(1 for r in changed if r["stage"][0] != r["stage"][1]),
        unreadable=sum(1 for r in results if r is None),
        examples=sorted(changed, key=lambda r: -abs(r["score"][1] - r["score"][0]))[:examples],
    )


# --------------------------------------------------------------------------- how far behind


class QueueHealth(BaseModel):
    """What Temporal says of the lead task queue: is a worker polling, how far behind is it."""

    task_queue: str
    workers: int  # pollers of the workflow task queue seen lately
    backlog: int  # workflow tasks waiting for a worker (approximate)
    oldest_seconds: float  # how long the oldest has waited (approximate)
    activity_backlog: int = 0
    activity_oldest_seconds: float = 0.0


async def _describe_queue(client: Client, task_queue: str, kind):
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    try:
        return await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=task_queue), task_queue_type=kind, report_stats=True))
    except RPCError as err:
        raise TemporalUnavailable(f"cannot ask Temporal about task queue {task_queue}: {err.message}") from None


def _backlog(response) -> tuple[int, float]:
    stats = response.stats
    age = stats.approximate_backlog_age.ToTimedelta().total_seconds() if stats.HasField("approximate_backlog_age") else 0.0
    return int(stats.approximate_backlog_count), age


async def queue_health(client: Client, settings: Settings) -> QueueHealth:
    """Workers and backlog of the lead task queue, from Temporal (DescribeTaskQueue)."""
    from temporalio.api.enums.v1 import TaskQueueType

    workflow, activity = await asyncio.gather(
        _describe_queue(client, settings.task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        _describe_queue(client, settings.task_queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY))
    workers = len(workflow.pollers)
    (backlog, age), (act_backlog, act_age) = _backlog(workflow), _backlog(activity)
    return QueueHealth(task_queue=settings.task_queue, workers=workers, backlog=backlog, oldest_seconds=round(age, 1),
                       activity_backlog=act_backlog, activity_oldest_seconds=round(act_age, 1))


@dataclass(frozen=True)
class WorkflowPolling:
    """The lead task queue's workflow side as Temporal sees it: what waits, and when each
    worker (by identity) last polled for it."""

    backlog: int
    oldest_seconds: float
    last_poll_seconds: dict[str, float]  # identity -> seconds since its last poll


async def workflow_polling(client: Client, task_queue: str) -> WorkflowPolling:
    from temporalio.api.enums.v1 import TaskQueueType

    response = await _describe_queue(client, task_queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)
    backlog, age = _backlog(response)
    now = datetime.now(timezone.utc)
    polls = {p.identity: max(0.0, (now - p.last_access_time.ToDatetime(timezone.utc)).total_seconds())
             for p in response.pollers}
    return WorkflowPolling(backlog, age, polls)
