"""The nouns of the funnel: inputs (events, facts, commands), the lead's state and
its audit entries.

Everything here is plain pydantic: it travels through Temporal as a payload
(pydantic data converter), is validated at the edge (CLI, API), and is what the
pure core in this package reads and writes. No clock, no I/O.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
)

# Lead ids become workflow ids and search attributes are derived from leads, so
# an id must be an opaque key: no e-mail addresses, no spaces, bounded length.
LEAD_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
EVENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$"
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"


def _aware_utc(value: datetime) -> datetime:
    """Naive timestamps are ambiguous; we refuse them rather than guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must carry a timezone (e.g. 2026-11-22T10:00:00Z)")
    return value.astimezone(timezone.utc)


AwareDatetime = Annotated[datetime, AfterValidator(_aware_utc)]
LeadId = Annotated[str, StringConstraints(pattern=LEAD_ID_PATTERN)]
EventId = Annotated[str, StringConstraints(pattern=EVENT_ID_PATTERN)]
ActorName = Annotated[str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True)]
ReasonCode = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Channel = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
FactValue = Union[bool, int, float, str]


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
    attributes: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN)], FactValue] = Field(
        default_factory=dict, max_length=50
    )


class ProfileUpdate(Strict):
    """Profile (fit) facts about a lead; a later value for a field replaces the earlier."""

    update_id: EventId
    lead_id: LeadId
    facts: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN)], FactValue] = Field(
        min_length=1, max_length=50
    )
    actor: Actor = SYSTEM


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


class NurtureProgress(BaseModel):
    track: str
    next_step: int  # index into the track's steps
    next_at: datetime


class StageVisit(BaseModel):
    stage: Stage
    entered_at: datetime
    trigger: Trigger | None = None


class RecentEvent(BaseModel):
    """Kept for frequency weighting only; bounded by the model's window."""

    type: str
    occurred_at: datetime


class LeadState(BaseModel):
    """Everything a lead needs to go on; carried across continue-as-new.

    Every collection here is bounded: seen ids by `seen_ids_max`, recent events
    by the frequency window, stage history by the number of transitions a lead
    can make in practice (each needs a person or a cool-off).
    """

    lead_id: str
    created_at: datetime
    stage: Stage = Stage.IQL
    stage_since: datetime
    channel: str | None = None  # first-touch channel, for funnel reports
    owner: str | None = None
    profile: dict[str, FactValue] = Field(default_factory=dict)
    score: Score = Field(default_factory=Score)
    points_by_type: dict[str, float] = Field(default_factory=dict)
    count_by_type: dict[str, int] = Field(default_factory=dict)
    recent: list[RecentEvent] = Field(default_factory=list)
    last_activity_at: datetime | None = None
    decay_steps: int = 0  # decay steps applied since last_activity_at
    seen_ids: list[str] = Field(default_factory=list)
    slas: list[OpenSla] = Field(default_factory=list)
    nurture: NurtureProgress | None = None
    cool_off_until: datetime | None = None
    qualified_by: str | None = None  # "bant 3/4" once qualified
    history: list[StageVisit] = Field(default_factory=list)
    audit_seq: int = 0
    model_ref: str = ""
    events_applied: int = 0
    duplicates_ignored: int = 0
    handovers: int = 0
    escalations: int = 0


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
    MODEL_CHANGED = "model_changed"


class AuditEntry(BaseModel):
    """One line of a lead's durable history; `entry_id` makes writes idempotent."""

    lead_id: str
    seq: int
    at: datetime
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

    @property
    def entry_id(self) -> str:
        return f"{self.lead_id}/{self.seq}"


class OutboundKind(StrEnum):
    HANDOVER = "handover"  # MQL to presales
    NURTURE_STEP = "nurture_step"
    ESCALATION = "escalation"
    OPPORTUNITY = "opportunity"  # SQL: create the CRM opportunity


class Outbound(BaseModel):
    """A message for the world outside (CRM, marketing automation, people)."""

    message_id: str  # "<lead>/<kind>/<seq>": idempotent delivery
    lead_id: str
    kind: OutboundKind
    at: datetime
    payload: dict[str, FactValue | None] = Field(default_factory=dict)


class Refused(Exception):
    """A command or input the lead cannot take in its current state; says why."""


def check_lead_id(value: str) -> str:
    if not re.match(LEAD_ID_PATTERN, value):
        raise ValueError(
            f"invalid lead id {value!r}: use 1-128 characters of letters, digits, '_', '.', ':', '-'"
            " (an opaque key, never an e-mail address or name)"
        )
    return value
