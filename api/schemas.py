"""Request and response models (pydantic): what the API takes and answers, with the
error shapes; FastAPI derives the OpenAPI document from them."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError

import base64
import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StringConstraints, ValidationError,
    WithJsonSchema, WrapValidator,
)

import client as leads
from funnel.models import (
    LEAD_ID_PATTERN, NAME_PATTERN, ActivityEvent, AuditEntry, AwareDatetime, Bant, Channel, EventId, LeadId,
    Meddic, Outbound, ReasonCode, Stage,
)
from workflows.rollout import RolloutProgress

from api.limits import MAX_BATCH, MAX_BODY_BYTES, MAX_PAGE


def _plain_text(value: str) -> str:
    """Free text goes into histories, payloads and SQL: no control characters, valid Unicode."""
    if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", value):
        raise ValueError("must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _fact_value(value: Any) -> bool | int | float | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("integer out of range (64-bit)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    if isinstance(value, str):
        if len(value) > 1000:
            raise ValueError("must be at most 1000 characters")
        return _plain_text(value)
    raise ValueError("must be a boolean, a number or a string")


Note = Annotated[str, StringConstraints(max_length=1000), AfterValidator(_plain_text)]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
FactValue = Annotated[
    bool | int | float | str,
    PlainValidator(_fact_value),  # one clear message instead of one per member of the union
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "integer"}, {"type": "number"},
                              {"type": "string", "maxLength": 1000}]}),
]
Facts = Annotated[dict[Name, FactValue], Field(max_length=50)]
OwnerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.@:-]{0,99}$")]
MessageId = Annotated[str, StringConstraints(min_length=1, max_length=300), AfterValidator(_plain_text)]
PathLeadId = Annotated[str, PathParam(pattern=LEAD_ID_PATTERN, description="lead id (an opaque key)")]


class _Request(BaseModel):
    """Request bodies refuse unknown fields: a typo is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class EventIn(_Request):
    """One activity of a lead, as marketing automation reports it. The same `event_id`
    delivered again is applied once."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "event_id": "mautic-84121", "lead_id": "L-1042", "type": "webinar_attended",
            "occurred_at": "2026-11-22T10:00:00Z", "channel": "webinar", "attributes": {"webinar": "q4-launch"},
        }]},
    )

    event_id: EventId = Field(description="the sender's id of this event; redeliveries are applied once")
    lead_id: LeadId = Field(description="an opaque key (never an e-mail address): 1-128 of A-Z a-z 0-9 _ . : -")
    type: Name = Field(description="an event type of the scoring model, e.g. webinar_attended")
    occurred_at: AwareDatetime = Field(
        description="ISO 8601 with a timezone; not before 1970 and not more than 5 minutes in the future"
    )
    channel: Channel | None = Field(default=None, description="e.g. webinar, website, email (first touch of a lead)")
    attributes: Facts = Field(default_factory=dict)

    def to_event(self, source: str | None = None) -> ActivityEvent:
        """The event, recorded as sent by `source` (the API key's name)."""
        return ActivityEvent(**self.model_dump(), source=source)


class RejectedItem:
    """A batch item that failed validation: kept in place so the others go on."""

    def __init__(self, errors: list[dict]):
        self.errors = errors


def _keep_invalid(value: Any, handler) -> Any:
    """An invalid item stays in place as a RejectedItem: the valid ones around it go on."""
    try:
        return handler(value)
    except ValidationError as err:
        return RejectedItem(err.errors(include_url=False, include_input=False))


class EventBatchIn(_Request):
    events: list[Annotated[EventIn, WrapValidator(_keep_invalid)]] = Field(
        min_length=1, max_length=MAX_BATCH,
        description=f"1 to {MAX_BATCH} events, for any leads, each an object as `POST /events` takes it "
                    "(EventIn). Each is validated on its own: an invalid one is answered `rejected` with its "
                    "reason while the others go on, so the body itself takes any items.",
        json_schema_extra={"items": {}},
    )


Outcome = Literal["accepted", "duplicate", "rejected", "conflict"]


class EventResult(BaseModel):
    index: int = Field(description="position in the batch")
    event_id: str | None = None
    lead_id: str | None = None
    outcome: Outcome = Field(
        description="accepted: Temporal holds it for the lead, applied once; duplicate: this id was taken before "
                    "with the same content (or repeats an id of this batch), changes nothing; conflict: this id was "
                    "taken with other content, not applied (a new event needs a new id); rejected: not applied, "
                    "see reason"
    )
    reason: str | None = None


class BatchResult(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    conflicts: int = 0
    results: list[EventResult]


class EventAccepted(BaseModel):
    event_id: str
    lead_id: str
    outcome: Literal["accepted", "duplicate"]
    detail: str


class ProfileIn(_Request):
    update_id: EventId | None = Field(
        default=None, description="the sender's id of this update, applied once; default: a fresh id"
    )
    facts: Annotated[dict[Name, FactValue], Field(min_length=1, max_length=50)] = Field(
        description="profile (fit) facts; a later value of a fact replaces the earlier",
        examples=[{"target_account": True, "company_size": 250, "industry": "software"}],
    )


class ProfileAccepted(BaseModel):
    update_id: str
    lead_id: str
    outcome: Literal["accepted", "duplicate"]
    detail: str


class AcceptIn(_Request):
    note: Note | None = None


class RejectIn(_Request):
    reason: ReasonCode = Field(description="reason code, e.g. no_budget, wrong_audience")
    recycle: bool = Field(default=False, description="true: back to nurturing (recycled); false: disqualified")
    note: Note | None = None


class QualifyIn(_Request):
    framework: Literal["bant", "meddic"] = "bant"
    bant: Bant | None = None
    meddic: Meddic | None = None
    note: Note | None = None


class ContactIn(_Request):
    channel: Literal["phone", "email", "meeting", "chat", "other"] = "phone"
    note: Note | None = None


class CloseIn(_Request):
    outcome: Literal["won", "lost"]
    reason: ReasonCode | None = Field(default=None, description="required for lost")
    note: Note | None = None


class ReopenIn(_Request):
    reason: ReasonCode
    note: Note | None = None


class HistoryPage(BaseModel):
    lead_id: str
    total: int = Field(description="entries in the lead's whole history")
    offset: int
    limit: int
    entries: list[AuditEntry]
    next_offset: int | None = Field(default=None, description="the next page's offset (a history only grows, so an "
                                    "offset is a stable cursor); None: this page reaches the end")
    complete: bool = Field(
        default=True,
        description="false when Temporal could not be asked for the lead's entries not yet in the store "
        "(score changes reach the store within LEADFLOW_AUDIT_MAX_LAG): the page is the store's alone",
    )


class LeadSummaryOut(BaseModel):
    lead_id: str
    stage: str | None
    score: float | None
    owner: str | None
    channel: str | None
    created_at: datetime | None = None  # None: not yet known to visibility (a lead older than this version)
    closed: bool = False
    updated_at: datetime | None = Field(default=None, description="its latest change (lists with updated_since)")


class LeadQuery(BaseModel):
    """Filters and paging of lead lists (GET /leads, the dashboard's lead list)."""

    stage: Stage | None = None
    owner: Annotated[OwnerName | None, Field(description="e.g. presales-1")] = None
    channel: Channel | None = None
    min_score: Annotated[float | None, Field(ge=-1e9, le=1e9)] = None
    max_score: Annotated[float | None, Field(ge=-1e9, le=1e9)] = None
    created_from: Annotated[AwareDatetime | None, Field(description="created at or after (ISO 8601 with a timezone)")] = None
    created_to: Annotated[AwareDatetime | None, Field(description="created before (ISO 8601 with a timezone)")] = None
    closed: Annotated[bool, Field(description="won leads as well as running ones")] = False
    updated_since: Annotated[AwareDatetime | None, Field(
        description="only leads with a change recorded at or after this time, oldest change first")] = None
    cursor: Annotated[str | None, Field(max_length=4000, pattern=r"^[A-Za-z0-9_=-]+$",
                                        description="the previous page's next_cursor")] = None
    limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = 100

    def filters(self) -> leads.LeadFilters:
        return leads.LeadFilters(stage=self.stage.value if self.stage else None, owner=self.owner,
                                 channel=self.channel, min_score=self.min_score, max_score=self.max_score,
                                 created_from=self.created_from, created_to=self.created_to, closed=self.closed)


class LeadList(BaseModel):
    count: int
    leads: list[LeadSummaryOut]
    next_cursor: str | None = None  # pass as `cursor` for the next page; None: no more


class OutboxPage(BaseModel):
    count: int
    messages: list[Outbound]
    next_cursor: str | None = Field(default=None, description="pass as `cursor` for the next page; None: no more")


def outbox_cursor(key: tuple[datetime, str]) -> str:
    """An opaque cursor after the message with this key (AuditStore.outbox_page)."""
    return base64.urlsafe_b64encode(json.dumps([key[0].isoformat(), key[1]]).encode()).decode()


def after_outbox_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        at, message_id = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
        when = datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, str(message_id)
    except (ValueError, TypeError, UnicodeError):
        raise ValueError("invalid cursor: pass back the next_cursor of the previous page") from None


class AckIn(_Request):
    message_ids: list[MessageId] = Field(min_length=1, max_length=MAX_PAGE)


class AckResult(BaseModel):
    acknowledged: int = Field(description="messages acknowledged now")
    unchanged: int = Field(description="already acknowledged, or unknown")


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    temporal: Check
    store: Check
    workers: Check = Field(description="a worker polls the lead task queue")
    behind: leads.QueueHealth | None = Field(
        default=None, description="how far behind the workers are (approximate, from Temporal)")


def invalid(where: tuple[str | int, ...], message: str) -> RequestValidationError:
    """A 422 in the shape every 422 has (ValidationProblem), for checks made in a route."""
    return RequestValidationError([{"loc": where, "msg": message, "type": "value_error"}])


def problem_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Problem(BaseModel):
    detail: str


class FieldProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationProblem(BaseModel):
    detail: list[FieldProblem]
    message: str


def describe_errors(err: ValidationError | list[dict], prefix: tuple = ()) -> str:
    errors = err.errors(include_url=False) if isinstance(err, ValidationError) else err
    return "; ".join(
        f"{'.'.join(str(p) for p in (*prefix, *e['loc'])) or 'value'}: {error_message(e)}" for e in errors
    )


def error_message(error: dict) -> str:
    msg = str(error["msg"]).removeprefix("Value error, ")
    detail = (error.get("ctx") or {}).get("error")
    if error["type"] == "json_invalid" and isinstance(detail, str):
        msg = f"{msg}: {detail}"
    return msg


# =========================================================================== backends



# =========================================================================== routes

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "malformed request: conflicting credentials (Authorization and "
                                           "X-API-Key with different keys), an invalid Content-Length"},
    401: {"model": Problem, "description": "no or invalid API key"},
    403: {"model": Problem, "description": "the key's role may not do this"},
    413: {"model": Problem, "description": f"body larger than {MAX_BODY_BYTES} bytes"},
    415: {"model": Problem, "description": "a body that is not JSON (Content-Type: application/json)"},
    422: {"model": ValidationProblem, "description": "invalid input; each problem names its field"},
    429: {"model": Problem, "description": "too many failed authentications from this address; see Retry-After"},
    503: {"model": Problem, "description": "Temporal or the audit store cannot be reached; retry later"},
}
LEAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": Problem, "description": "no such lead"},
    409: {"model": Problem, "description": "the lead refused: not in a stage (or role) that allows it"},
    410: {"model": Problem, "description": "the lead is closed (won) and takes no more input"},
    504: {"model": Problem, "description": "the lead did not answer in time (is the worker running?)"},
}


# --------------------------------------------------------------------------- scoring model versions

MAX_MODEL_BYTES = 256 * 1024


class ModelIn(_Request):
    toml: Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_BYTES)] = Field(
        description="the scoring model file's text (TOML), with a new `version`")
    dry_run: bool = Field(default=False, description="only say how many running leads would change score and stage")
    rate_per_second: float = Field(default=20.0, gt=0, le=1000, description="leads told per second by the rollout")


class ModelVersionOut(BaseModel):
    ref: str
    sha256: str
    applied_by: str
    applied_at: datetime
    active: bool


class ModelApplied(ModelVersionOut):
    rollout: RolloutProgress | None = Field(description="the rollout to running leads (GET /models/{ref} follows it)")


class ModelDetail(ModelVersionOut):
    text: str
    rollout: RolloutProgress | None = None

