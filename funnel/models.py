"""The nouns of the funnel: inputs (events, facts, commands), the lead's state and
its audit entries.

Everything here is plain pydantic: it travels through Temporal as a payload
(pydantic data converter), is validated at the edge (CLI, API), and is what the
pure core in this package reads and writes. No clock, no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# Lead ids become workflow ids and search attributes are derived from leads, so
# an id must be an opaque key: no e-mail addresses, no spaces, bounded length.
LEAD_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
EVENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


def _aware_utc(value: datetime) -> datetime:
    """Naive timestamps are ambiguous; we refuse them rather than guess. One that cannot be
    said in UTC (year 1 at +14:00, year 9999 at -14:00) is out of range, not a crash."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must carry a timezone (e.g. 2026-11-22T10:00:00Z)")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError(f"timestamp {value.isoformat()} is out of range once in UTC") from None


def _not_a_number(value: object) -> object:
    """A bare number is not a time here: seconds or milliseconds since 1970 is a guess (HubSpot
    sends milliseconds), and pydantic would take either as seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) or (
            isinstance(value, str) and _NUMBER.fullmatch(value.strip())):
        raise ValueError("a time is ISO 8601 with a timezone (e.g. 2026-11-22T10:00:00Z), not a number")
    return value


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
AwareDatetime = Annotated[datetime, BeforeValidator(_not_a_number), AfterValidator(_aware_utc)]
LeadId = Annotated[str, StringConstraints(pattern=LEAD_ID_PATTERN)]
EventId = Annotated[str, StringConstraints(pattern=EVENT_ID_PATTERN)]
ActorName = Annotated[str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True)]
ReasonCode = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Channel = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
FactValue = Union[bool, int, float, str]
M = TypeVar("M", bound=BaseModel)


_object_setattr = object.__setattr__


def built(cls: type[M], values: dict[str, Any]) -> M:
    """`cls.model_construct(**values)` where `values` gives every field of `cls`, in the
    order the class declares them (nothing to default, no aliases, extras or private
    attributes: tests/test_models_built.py pins that it is the same model). For data
    validated already, in the core's hot paths: model_construct looks at every field in
    Python and costs three times what validating would."""
    model = cls.__new__(cls)
    _object_setattr(model, "__dict__", values)
    _object_setattr(model, "__pydantic_fields_set__", set(values))
    _object_setattr(model, "__pydantic_extra__", None)
    _object_setattr(model, "__pydantic_private__", None)
    return model


def assign(model: BaseModel, **values: Any) -> None:
    """`setattr(model, name, value)` for each of `values`, as pydantic does it for a field of
    a model that validates no assignment (the value in `__dict__`, the name in the fields
    set), without its `__setattr__`: the core sets a few fields of its state per event, and
    that dispatch cost more than the rest of the write (tests/test_models_built.py pins it)."""
    model.__dict__.update(values)
    model.__pydantic_fields_set__.update(values)


class Strict(BaseModel):
    """Inputs reject unknown fields so a typo is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage(StrEnum):
    IQL = "iql"
    MQL = "mql"
    SAL = "sal"
    SQL = "sql"
    WON = "won"
    LOST = "lost"
    DISQUALIFIED = "disqualified"
    RECYCLED = "recycled"


class Role(StrEnum):
    """Who may cause a transition. `system` is Leadflow itself (scores, timers)."""

    SYSTEM = "system"
    MARKETING = "marketing"
    PRESALES = "presales"
    SALES = "sales"
    MANAGER = "manager"


class Trigger(StrEnum):
    SCORE_THRESHOLD = "score_threshold"
    FAST_TRACK = "fast_track"
    AUTO_ACCEPT = "auto_accept"
    ACCEPT = "accept"
    REJECT_DISQUALIFY = "reject_disqualify"
    REJECT_RECYCLE = "reject_recycle"
    QUALIFY = "qualify"
    WON = "won"
    LOST = "lost"
    DECAY_BELOW_THRESHOLD = "decay_below_threshold"
    NEGATIVE_CRITERIA = "negative_criteria"
    COOL_OFF_ENDED = "cool_off_ended"
    REQUALIFY = "requalify"
    REOPEN = "reopen"


class Actor(Strict):
    name: ActorName
    role: Role


SYSTEM = Actor(name="leadflow", role=Role.SYSTEM)


# --------------------------------------------------------------------------- inputs


class ActivityEvent(Strict):
    """One thing a lead did, as marketing automation reports it.

    `event_id` is the sender's id: the same id delivered twice is applied once.
    `type` is checked against the scoring model by the lead (an unknown type is
    recorded and ignored there); edges check it earlier for a clear error.
    """

    event_id: EventId
    lead_id: LeadId
    type: Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
    occurred_at: AwareDatetime
    channel: Channel | None = None
    campaign: Channel | None = None  # the marketing campaign it belongs to, when the sender knows
    attributes: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN)], FactValue] = Field(
        default_factory=dict, max_length=50
    )
    # Which integration sent it (the API key's name, "cli"): set by the edge, recorded on
    # the event's score change, never taken from a request body.
    source: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None


CONSENT_FACT = "email_consent"  # true: opted in; false: objected
CONSENT_AT_FACT = "email_consent_at"  # ISO 8601 with a timezone: when the person said so
CONSENT_SOURCE_FACT = "email_consent_source"  # e.g. the form or double opt-in mail


def parse_fact_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 timestamp with a timezone, as a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 timestamp") from None
    return _aware_utc(parsed)


def event_digest(event: "ActivityEvent") -> str:
    """What makes two deliveries of one event id the same event: its content, not who sent it."""
    content = event.model_dump(mode="json", include={"lead_id", "type", "occurred_at", "channel", "campaign",
                                                      "attributes"})
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ProfileUpdate(Strict):
    """Profile (fit) facts about a lead.

    A later value for a field replaces the earlier, "later" by `observed_at` (when the
    facts were true; ties by update id), so the order updates arrive in does not matter.
    Without `observed_at` the lead's receive time stands in. Consent travels as facts too:
    `email_consent` (bool) with optional `email_consent_at` and `email_consent_source`.
    """

    update_id: EventId
    lead_id: LeadId
    facts: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN)], FactValue] = Field(
        min_length=1, max_length=50
    )
    actor: Actor = SYSTEM
    observed_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _consent_facts(self) -> "ProfileUpdate":
        if CONSENT_FACT in self.facts and not isinstance(self.facts[CONSENT_FACT], bool):
            raise ValueError(f"facts.{CONSENT_FACT} must be true or false")
        if CONSENT_AT_FACT in self.facts:
            try:
                parse_fact_time(self.facts[CONSENT_AT_FACT])
            except ValueError as err:
                raise ValueError(f"facts.{CONSENT_AT_FACT}: {err}") from None
        return self


class TakenInput(BaseModel):
    """Input a lead took in one round, and when: what it writes to the store's event log
    with its audit (the log a backtest replays holds what the lead applied)."""

    received_at: datetime
    items: list[ActivityEvent | ProfileUpdate]


class Accept(Strict):
    kind: Literal["accept"] = "accept"
    by: Actor
    note: str | None = Field(default=None, max_length=1000)


class Reject(Strict):
    kind: Literal["reject"] = "reject"
    by: Actor
    reason: ReasonCode
    recycle: bool = False
    note: str | None = Field(default=None, max_length=1000)


class Bant(Strict):
    budget: bool = False
    authority: bool = False
    need: bool = False
    timing: bool = False


class Meddic(Strict):
    metrics: bool = False
    economic_buyer: bool = False
    decision_criteria: bool = False
    decision_process: bool = False
    identify_pain: bool = False
    champion: bool = False


class Qualify(Strict):
    kind: Literal["qualify"] = "qualify"
    by: Actor
    framework: Literal["bant", "meddic"] = "bant"
    bant: Bant | None = None
    meddic: Meddic | None = None
    note: str | None = Field(default=None, max_length=1000)


class LogContact(Strict):
    kind: Literal["contact"] = "contact"
    by: Actor
    channel: Literal["phone", "email", "meeting", "chat", "other"] = "phone"
    note: str | None = Field(default=None, max_length=1000)


class Close(Strict):
    kind: Literal["close"] = "close"
    by: Actor
    outcome: Literal["won", "lost"]
    reason: ReasonCode | None = None
    note: str | None = Field(default=None, max_length=1000)


class Reopen(Strict):
    kind: Literal["reopen"] = "reopen"
    by: Actor
    reason: ReasonCode
    note: str | None = Field(default=None, max_length=1000)


Command = Annotated[
    Union[Accept, Reject, Qualify, LogContact, Close, Reopen], Field(discriminator="kind")
]


# --------------------------------------------------------------------------- state


class Score(BaseModel):
    """Fit + engagement, with the points per rule that make them up."""

    fit: float = 0.0
    engagement: float = 0.0
    breakdown: dict[str, float] = Field(default_factory=dict)

    @property
    def total(self) -> float:
        return round(self.fit + self.engagement, 2)


class OpenSla(BaseModel):
    name: str
    started_at: datetime
    due_at: datetime
    met_by: Literal["contact", "stage_exit"]
    stage: Stage | None = None  # the stage whose exit meets a stage_exit SLA
    escalate_to: str | None = None
    cause: str  # e.g. "stage mql" or "event e-19"


# The reason of an SLA_SET and SLA_MET pair for an event that arrived after the contact that
# met its deadline (funnel.lead.Lead `meets_late_slas`): one deadline, set and met. And of an
# SLA_SET and SLA_CANCELLED pair for one that arrived after the stage change that cancelled it.
MET_BEFORE_ARRIVAL = "met_before_arrival"
CANCELLED_BEFORE_ARRIVAL = "cancelled_before_arrival"


class LoggedContact(BaseModel):
    """A contact sales or presales logged: it meets the follow-up of an event that occurred
    before it, even one that arrives after it (version 13 on)."""

    at: datetime
    by: Actor


class EndedSla(BaseModel):
    """A deadline an event started, and when it ended (version 13 on): an event of the same
    kind that occurred while it ran, and arrives later, starts none of its own."""

    name: str
    started_at: datetime
    ended_at: datetime
    met: bool  # True: met by a contact (an event at that very moment came before it); False: breached or cancelled
    cancelled: bool = False  # by a stage change (recycled, closed)

    def covers(self, at: datetime) -> bool:
        return self.started_at <= at and (at <= self.ended_at if self.met else at < self.ended_at)


class NurtureProgress(BaseModel):
    track: str
    next_step: int  # index into the track's steps
    next_at: datetime


class StageVisit(BaseModel):
    stage: Stage
    entered_at: datetime
    trigger: Trigger | None = None


# --------------------------------------------------------------------------- engagement state
# What a lead keeps to recompute its engagement from its events in time order; the fold
# itself is in funnel/engagement.py.


class WindowEvent(BaseModel):
    """An applied event, as the fold needs it (and as the handover shows it)."""

    event_id: str
    type: str
    occurred_at: datetime
    channel: str | None = None
    attributes: dict[str, FactValue] = Field(default_factory=dict)


class Anchor(BaseModel):
    """A stage change that touches engagement: `clock` (MQL entry) or `reset` (recycled)."""

    at: datetime
    kind: Literal["clock", "reset"]


class TypeTally(BaseModel):
    """What the fold remembers of one event type."""

    counted: int = 0  # events of this type so far (since a reset, for positive types)
    last_at: datetime | None = None
    cancelled_at: datetime | None = None  # last time a `cancels` event took this type back
    cap_from: datetime | None = None  # the current cap window opened here
    cap_points: float = 0.0  # points added within it
    recent: list[datetime] = Field(default_factory=list)  # latest times, for frequency weighting


class ConsentRecord(BaseModel):
    """Whether the lead may be mailed, since when and because of what."""

    email: bool
    since: datetime
    source: str  # "unsubscribe e-9", "profile update p-3 (form-7)"


class FoldState(BaseModel):
    """The folded engagement of a lead up to `at`."""

    at: datetime | None = None
    after_id: str = ""  # of the events at exactly `at`, those with a smaller id are folded in
    positive: float = 0.0  # decays
    negative: float = 0.0  # does not
    clock_from: datetime | None = None  # inactivity clock: last activity, or MQL entry
    last_activity: datetime | None = None
    decay_steps: int = 0  # decay steps since clock_from
    tallies: dict[str, TypeTally] = Field(default_factory=dict)
    breakdown: dict[str, float] = Field(default_factory=dict)
    consent: ConsentRecord | None = None  # the latest consent event
    first_touch: tuple[datetime, str] | None = None  # earliest event with a channel
    newest_activity: datetime | None = None

    @property
    def engagement(self) -> float:
        return round(self.positive + self.negative + 0.0, 2)


class EngagementLog(BaseModel):
    """What a lead keeps to recompute its engagement: checkpoint, window, anchors."""

    checkpoint: FoldState = Field(default_factory=FoldState)
    window: list[WindowEvent] = Field(default_factory=list)  # sorted by (occurred_at, event_id)
    anchors: list[Anchor] = Field(default_factory=list)  # sorted by time, all after the checkpoint

    @property
    def newest(self) -> datetime | None:
        return self.window[-1].occurred_at if self.window else self.checkpoint.at

    @property
    def newest_key(self) -> tuple[datetime, str] | None:
        """(occurred_at, event_id) of the last event in time order: anything before it is late."""
        if self.window:
            return self.window[-1].occurred_at, self.window[-1].event_id
        return (self.checkpoint.at, self.checkpoint.after_id) if self.checkpoint.at else None

    @property
    def horizon_start(self) -> datetime | None:
        """Events older than this are beyond exact re-scoring."""
        return self.checkpoint.at

    def beyond_horizon(self, occurred_at: datetime, event_id: str) -> bool:
        cp = self.checkpoint
        return cp.at is not None and (occurred_at, event_id) < (cp.at, cp.after_id)

    def add(self, event: WindowEvent) -> None:
        key = (event.occurred_at, event.event_id)
        index = len(self.window)
        while index and (self.window[index - 1].occurred_at, self.window[index - 1].event_id) > key:
            index -= 1
        self.window.insert(index, event)

    def add_anchor(self, anchor: Anchor) -> None:
        self.anchors.append(anchor)
        self.anchors.sort(key=lambda a: a.at)


class LeadState(BaseModel):
    """Everything a lead needs to go on; carried across continue-as-new.

    Every collection here is bounded: seen ids by `seen_ids_max`, the engagement window
    by the model's `late_events`, stage history by the number of transitions a lead can
    make in practice (each needs a person or a cool-off).
    """

    lead_id: str
    created_at: datetime
    stage: Stage = Stage.IQL
    stage_since: datetime
    channel: str | None = None  # first touch: the channel of the lead's earliest event
    owner: str | None = None
    profile: dict[str, FactValue] = Field(default_factory=dict)
    # field -> (observed at, update id) of the value kept: the latest wins, whatever the order
    profile_seen: dict[str, tuple[datetime, str]] = Field(default_factory=dict)
    consent_fact: ConsentRecord | None = None  # consent given or withdrawn as a profile fact
    event_consent: ConsentRecord | None = None  # the latest consent event (from the engagement fold)
    score: Score = Field(default_factory=Score)
    engagement: EngagementLog = Field(default_factory=EngagementLog)
    evaluated_at: datetime | None = None  # engagement was last folded up to here
    next_decay_at: datetime | None = None
    events_applied: int = 0
    seen_ids: list[str] = Field(default_factory=list)
    slas: list[OpenSla] = Field(default_factory=list)
    contacts: list[LoggedContact] = Field(default_factory=list)  # the latest CONTACTS_KEPT, oldest first
    ended_slas: list[EndedSla] = Field(default_factory=list)  # event-started deadlines, the latest ENDED_SLAS_KEPT
    nurture: NurtureProgress | None = None
    cool_off_until: datetime | None = None
    qualified_by: str | None = None  # "bant 3/4" once qualified
    history: list[StageVisit] = Field(default_factory=list)
    # Decisions of the lead itself (threshold, fast track, below threshold) wait for the
    # lead's decision delay, so input arriving together is decided together.
    decision_due_at: datetime | None = None
    below_threshold_by: list[Literal["decay", "negative"]] = Field(default_factory=list)
    mql_hand_raised: bool = False  # the current MQL came from a hand-raise (fast track)
    fast_track_used_until: datetime | None = None  # fast-track events up to here have been decided on
    # The newest activity for which a threshold handover held back as backfill was audited
    # (once per newest activity, not at every tick).
    withheld_noted_for: datetime | None = None
    consent_noted: ConsentRecord | None = None  # the email consent the history last stated
    audit_seq: int = 0
    outbound_seq: dict[str, int] = Field(default_factory=dict)  # per kind, for message ids
    # Outcome of each command by its idempotency key ("applied", or "refused: <why>"), the
    # latest COMMANDS_MAX: a retry is answered with it instead of being applied again.
    commands: dict[str, str] = Field(default_factory=dict)
    model_ref: str = ""
    duplicates_ignored: int = 0
    handovers: int = 0
    escalations: int = 0
    # The person's data was dropped from this state then (funnel.personal_data); what came after is new.
    personal_data_erased_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_older_code(cls, data: Any) -> Any:
        """State carried over (continue-as-new) from code that added engagement up in
        arrival order: its totals become the checkpoint of the engagement log."""
        if not isinstance(data, dict) or "engagement" in data or "points_by_type" not in data:
            return data
        data = dict(data)
        points = data.pop("points_by_type", {}) or {}
        counts = data.pop("count_by_type", {}) or {}
        data.pop("recent", None)
        last = data.pop("last_activity_at", None)
        steps = data.pop("decay_steps", 0) or 0
        score = data.get("score") or {}
        breakdown = {k: v for k, v in (score.get("breakdown") or {}).items() if not k.startswith("fit:")}
        negative = round(sum(v for v in points.values() if v < 0), 2)
        engagement = float(score.get("engagement", 0.0))
        data["engagement"] = {"checkpoint": {
            "at": last, "positive": round(engagement - negative, 2), "negative": negative,
            "clock_from": last, "last_activity": last, "newest_activity": last, "decay_steps": steps,
            "tallies": {t: {"counted": n} for t, n in counts.items()}, "breakdown": breakdown,
        }}
        return data


# --------------------------------------------------------------------------- outputs


class AuditKind(StrEnum):
    LEAD_CREATED = "lead_created"
    SCORE_CHANGED = "score_changed"
    STAGE_CHANGED = "stage_changed"
    PROFILE_UPDATED = "profile_updated"
    DUPLICATE_IGNORED = "duplicate_ignored"
    EVENT_IGNORED = "event_ignored"
    OWNER_ASSIGNED = "owner_assigned"
    CONTACT_LOGGED = "contact_logged"
    SLA_SET = "sla_set"
    SLA_MET = "sla_met"
    SLA_BREACHED = "sla_breached"
    SLA_CANCELLED = "sla_cancelled"
    NURTURE_STEP_SENT = "nurture_step_sent"
    NURTURE_STEP_SKIPPED = "nurture_step_skipped"
    SLA_LATE_DATA = "sla_late_data"
    FAST_TRACK_BLOCKED = "fast_track_blocked"
    NOT_HANDED_OVER = "not_handed_over"  # backfill: old events scored but are not news
    CONSENT_CHANGED = "consent_changed"  # email consent withdrawn or given again: source and since when
    MODEL_CHANGED = "model_changed"
    PERSONAL_DATA_ERASED = "personal_data_erased"  # GDPR Art. 17: who, when, what (counts only)


class AuditEntry(BaseModel):
    """One line of a lead's durable history; `entry_id` makes writes idempotent."""

    lead_id: str
    seq: int
    at: datetime  # when the lead recorded it
    kind: AuditKind
    actor: str
    role: Role
    detail: str  # human-readable: "+50 webinar_attended (event e-19)"
    channel: str | None = None
    event_id: str | None = None
    rule: str | None = None
    points: float | None = None
    score_total: float | None = None
    score_fit: float | None = None
    score_engagement: float | None = None
    model_ref: str | None = None
    from_stage: Stage | None = None
    to_stage: Stage | None = None
    trigger: Trigger | None = None
    reason: str | None = None
    occurred_at: datetime | None = None  # when its cause happened (event time, due time); None: at `at`
    source: str | None = None  # the integration that sent the event behind it (an API key's name, "cli")
    command_id: str | None = None  # the idempotency key of the command that made this entry
    owner: str | None = None  # the lead's owner when it was recorded (reports per owner: SLAs, decisions)

    @property
    def happened_at(self) -> datetime:
        return self.occurred_at or self.at

    @property
    def entry_id(self) -> str:
        return f"{self.lead_id}/{self.seq}"


class AuditBatch(BaseModel):
    """One write of a lead (version 8): its new audit entries and the input it took since
    its last write, for the store's event log. Older runs write a bare list of entries.
    Version 10: with the handovers the entries announce (`assign`), whose owners the same
    write assigns (activities.lead_activities.record_audit_and_assign)."""

    entries: list[AuditEntry]
    taken: list[TakenInput] = Field(default_factory=list)
    assign: list["Outbound"] = Field(default_factory=list)


class Assigned(BaseModel):
    """What a write that assigned owners returns: each handover's owner (a message whose
    team has no members is missing), and whether a webhook then wants the message posted."""

    written: int
    owners: dict[str, str] = Field(default_factory=dict)
    post: bool = False


@dataclass(frozen=True, slots=True)
class ReportEntry:
    """The part of an audit entry a report reads: what `AuditStore.report_entries` returns
    (a report reads hundreds of thousands; an AuditEntry, even built unvalidated, costs ten
    times as much). The report functions (funnel/report.py, funnel/kpis.py) take AuditEntry lists as well."""

    lead_id: str
    seq: int
    at: datetime
    kind: AuditKind
    actor: str
    role: Role
    channel: str | None = None
    from_stage: Stage | None = None
    to_stage: Stage | None = None
    trigger: Trigger | None = None
    reason: str | None = None
    occurred_at: datetime | None = None
    rule: str | None = None
    owner: str | None = None

    @property
    def happened_at(self) -> datetime:
        return self.occurred_at or self.at


class OutboundKind(StrEnum):
    HANDOVER = "handover"  # MQL to presales
    NURTURE_STEP = "nurture_step"
    ESCALATION = "escalation"
    OPPORTUNITY = "opportunity"  # SQL: create the CRM opportunity, hand to sales
    REVIEW = "review"  # a hand-raiser that a fit rule keeps from presales: someone should look
    ACCOUNT_HANDOVER = "account_handover"  # a marketing-qualified account, with its contacts (funnel/accounts.py)


class Outbound(BaseModel):
    """A message for the world outside (CRM, marketing automation, people)."""

    message_id: str  # "<lead>/<kind>/<n>": idempotent delivery
    lead_id: str
    kind: OutboundKind
    at: datetime
    payload: dict[str, Any] = Field(default_factory=dict)
    # The team whose next member in turn owns the lead before this message goes out.
    assign_to: Literal["presales", "sales"] | None = None

    def with_owner(self, owner: str) -> "Outbound":
        """The message naming the owner it hands the lead to (as outbox and webhook carry it)."""
        return self.model_copy(update={"payload": {**self.payload, "owner": owner}})


AuditBatch.model_rebuild()  # it names Outbound, defined after it


class Refused(Exception):
    """A command or input the lead cannot take in its current state; says why."""


def check_lead_id(value: str) -> str:
    if not re.match(LEAD_ID_PATTERN, value):
        raise ValueError(
            f"invalid lead id {value!r}: use 1-128 characters of letters, digits, '_', '.', ':', '-'"
            " (an opaque key, never an e-mail address or name)"
        )
    return value
