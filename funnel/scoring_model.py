"""The scoring model: a versioned TOML file that marketing and sales agree on.

It says what each activity is worth, which profile facts make a good fit, what
counts against a lead, how engagement decays, where the MQL threshold lies and
which timers (nurture, SLAs, cool-off) run. `load_model` validates it with
pydantic; an error names the field (and the TOML line where it can be found).
"""

from __future__ import annotations

import re
import tomllib
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, field_validator,
                      model_validator)

from funnel.models import NAME_PATTERN, FactValue, Stage

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """'90s', '15m', '12h', '30d', '2w' (or seconds as a number) -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration; write e.g. '90s', '15m', '12h', '30d' or '2w'")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive")
    return timedelta(seconds=seconds)


@lru_cache(maxsize=1024)  # pure, and the fold writes the same few model durations over and over
def format_duration(value: timedelta) -> str:
    """A model duration as the model file writes it: '30d', '12h', '90s'."""
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


@lru_cache(maxsize=4096)  # pure; decay steps come back to the same idle times
def humanize(value: timedelta) -> str:
    """A measured duration as people read it: '13h 0m', '2d 3h', '4m 10s', '0s'."""
    seconds = max(int(value.total_seconds()), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


Duration = Annotated[
    timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventRule(_Section):
    """Points for one activity type (implicit/behavioural, or negative)."""

    points: float
    cap: float | None = Field(default=None, gt=0)  # most points this type adds within one cap window
    # A cap window opens with the type's first scoring event and lasts this long; the next
    # event after it opens a new one (default: the decay period), so a lead back after a
    # cold spell scores again.
    cap_window: Duration | None = None
    count_once: bool = False  # only the first occurrence scores (until a `cancels` event)
    activity: bool = True  # resets the inactivity clock (an unsubscribe does not)
    consent: Literal["revoke", "grant"] | None = None  # email consent this event revokes or grants
    cancels: list[str] = Field(default_factory=list)  # negative types it takes back (resubscribe)


class FitRule(_Section):
    """Points when a profile fact matches: equals, one of, or a numeric range."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    field: str
    points: float
    equals: FactValue | None = None
    one_of: list[FactValue] | None = None
    min: float | None = None
    max: float | None = None
    # A lead this rule matches is not handed to presales on a fast-track event: presales
    # gets a `review` message instead (competitor, student, wrong audience).
    blocks_fast_track: bool = False

    @model_validator(mode="after")
    def _one_condition(self) -> "FitRule":
        given = [self.equals is not None, self.one_of is not None, self.min is not None or self.max is not None]
        if sum(given) != 1:
            raise ValueError(f"fit rule {self.name!r} needs exactly one of: equals, one_of, min/max")
        return self

    def matches(self, facts: dict[str, FactValue]) -> bool:
        if self.field not in facts:
            return False
        value = facts[self.field]
        if self.equals is not None:
            return _same(value, self.equals)
        if self.one_of is not None:
            return any(_same(value, option) for option in self.one_of)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


def _same(a: FactValue, b: FactValue) -> bool:
    """Strings compare case-insensitively; a bool never equals a number."""
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


class Frequency(_Section):
    """Repeats of one activity type close together are worth more than spread out.

    The n-th event of a type within `window` of the previous ones scores
    `points * min(1 + bonus * (n - 1), max_multiplier)`.
    """

    window: Duration = timedelta(days=7)
    bonus: float = Field(default=0.5, ge=0)
    max_multiplier: float = Field(default=2.0, ge=1)


class Decay(_Section):
    """After `after` without activity, engagement falls every `every` period."""

    after: Duration = timedelta(days=30)
    every: Duration = timedelta(days=30)
    percent: float | None = Field(default=25.0, gt=0, le=100)
    points: float | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _points_replace_default_percent(cls, data: object) -> object:
        # TOML has no null: a file that gives `points` must not also get the default percent.
        if isinstance(data, dict) and data.get("points") is not None and "percent" not in data:
            data = {**data, "percent": None}
        return data

    @model_validator(mode="after")
    def _one_amount(self) -> "Decay":
        if (self.percent is None) == (self.points is None):
            raise ValueError("decay needs exactly one of: percent, points")
        return self


class MaxAge(_Section):
    """Backfill is not news: an event older than this when it arrives scores, but does
    not hand the lead over by this trigger."""

    score_threshold: Duration = timedelta(days=30)  # the lead's newest activity must be this recent
    fast_track: Duration = timedelta(days=7)


class Thresholds(_Section):
    mql: float = 100
    fast_track: list[str] = Field(default_factory=list)  # event types that make an MQL at once
    # An MQL nobody accepted whose score falls below `mql` (by decay, counted from its MQL
    # entry, or by negative criteria) goes back to recycled; "stay" keeps it MQL.
    on_mql_decay: Literal["recycle", "stay"] = "recycle"
    fast_track_ends_cool_off: bool = True  # a hand-raise requalifies a recycled lead at once
    max_age: MaxAge = MaxAge()


class Shortcuts(_Section):
    """Configured shortcuts of the funnel for small deals (domain: MQL -> SQL in one call)."""

    auto_accept: bool = False  # an MQL becomes SAL without presales
    qualify_from_mql: bool = False  # presales may qualify an MQL directly to SQL


BantCriterion = Literal["budget", "authority", "need", "timing"]
MeddicCriterion = Literal[
    "metrics", "economic_buyer", "decision_criteria", "decision_process", "identify_pain", "champion"
]


class Qualification(_Section):
    bant_min: int = Field(default=3, ge=1, le=4)
    # Criteria that must be among those met, on top of the count (an SQL always has a
    # budget and a need, say the sources).
    bant_required: list[BantCriterion] = Field(default_factory=lambda: ["budget", "need"])
    meddic_min: int = Field(default=5, ge=1, le=6)
    meddic_required: list[MeddicCriterion] = Field(default_factory=list)


class ReasonCodes(_Section):
    """The managed lists of reason codes (code = what it means): a rejection or a lost deal
    must give one of them, so reports count reasons a manager can act on, not free text.
    An empty list accepts any code (models written before the lists existed)."""

    reject: dict[str, str] = Field(default_factory=dict)
    lost: dict[str, str] = Field(default_factory=dict)

    @field_validator("reject", "lost")
    @classmethod
    def _codes(cls, codes: dict[str, str]) -> dict[str, str]:
        bad = [code for code in codes if not re.fullmatch(NAME_PATTERN, code)]
        if bad:
            raise ValueError(f"reason code(s) {', '.join(map(repr, bad))}: use lowercase letters, digits and _")
        return codes


class LateEvents(_Section):
    """How far back a late event re-scores the lead exactly.

    The lead keeps its events of the last `horizon` before its newest one (at most
    `max_events` of them) and recomputes engagement from them whenever one arrives out of
    order. An event older than that is applied as it is: its negative points, consent and
    count count, its positive points do not (decay has taken them: see the README).
    """

    horizon: Duration = timedelta(days=365)
    max_events: int = Field(default=500, ge=10, le=5000)


class NurtureStep(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    after: Duration  # after entering the track, or after the previous step


class Sla(_Section):
    """A deadline that starts on a stage or an event and escalates when missed."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    due: Duration
    on_stage: Stage | None = None
    on_event: str | None = None
    met_by: Literal["contact", "stage_exit"]
    escalate_to: str = "sales-manager"

    @model_validator(mode="after")
    def _one_start(self) -> "Sla":
        if (self.on_stage is None) == (self.on_event is None):
            raise ValueError(f"sla {self.name!r} needs exactly one of: on_stage, on_event")
        if self.on_event is not None and self.met_by == "stage_exit":
            raise ValueError(f"sla {self.name!r} starts on an event; it can only be met_by 'contact'")
        return self


class CoolOff(_Section):
    """How long a recycled or lost lead rests before it may requalify."""

    recycled: Duration = timedelta(days=30)
    lost: Duration = timedelta(days=90)
    reset_engagement_on_recycle: bool = True


class _FieldError(ValueError):
    """A cross-field check's error, with the field it is about (pydantic reports those at the top)."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc


class AccountRules(_Section):
    """Buying teams (funnel/accounts.py): when an account (company) is marketing-qualified."""

    best_k: int = Field(default=3, ge=1, le=50)  # the engagement of its best k contacts counts
    threshold: float = 120  # account fit + best contacts' engagement
    min_roles: int = Field(default=2, ge=0)  # buying-team roles among its engaged contacts
    roles: list[str] = Field(default_factory=lambda: [
        "decision_maker", "champion", "user", "purchasing", "influencer", "technical"])
    # Fit rules on these fields score the account (once), not each contact.
    fit_fields: list[str] = Field(default_factory=lambda: ["target_account", "company_size", "industry", "country"])
    inactive_stages: list[str] = Field(default_factory=lambda: ["disqualified", "lost"])
    assign_to: Literal["presales", "sales"] = "sales"  # the team whose member owns an MQA


class ScoringModel(_Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
    description: str = ""
    events: dict[str, EventRule]
    fit: list[FitRule] = Field(default_factory=list)
    frequency: Frequency = Frequency()
    decay: Decay = Decay()
    thresholds: Thresholds = Thresholds()
    shortcuts: Shortcuts = Shortcuts()
    qualification: Qualification = Qualification()
    nurture: dict[Literal["iql", "recycled"], list[NurtureStep]] = Field(default_factory=dict)
    sla: list[Sla] = Field(default_factory=list)
    cool_off: CoolOff = CoolOff()
    late_events: LateEvents = LateEvents()
    reasons: ReasonCodes = ReasonCodes()
    account: AccountRules = AccountRules()

    @model_validator(mode="after")
    def _consistent(self) -> "ScoringModel":
        for name, rule in self.events.items():
            if not re.match(r"^[a-z][a-z0-9_]{0,63}$", name):
                raise _FieldError(("events", name), f"event type {name!r}: use lower_snake_case")
            for cancelled in rule.cancels:
                target = self.events.get(cancelled)
                if target is None or target.points >= 0:
                    raise _FieldError(
                        ("events", name, "cancels"),
                        f"event type {name!r} cancels {cancelled!r}: only event types with negative points can be"
                        " taken back",
                    )
        unknown = [t for t in self.thresholds.fast_track if t not in self.events]
        if unknown:
            raise _FieldError(
                ("thresholds", "fast_track"), f"thresholds.fast_track names unknown event types: {', '.join(unknown)}"
            )
        for i, sla in enumerate(self.sla):
            if sla.on_event is not None and sla.on_event not in self.events:
                raise _FieldError(("sla", i, "on_event"), f"sla {sla.name!r}: on_event {sla.on_event!r} is not an event type")
        names = [rule.name for rule in self.fit]
        if len(names) != len(set(names)):
            again = next(i for i, name in enumerate(names) if name in names[:i])
            raise _FieldError(("fit", again, "name"), "fit rule names must be unique")
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def cap_window(self, rule: EventRule) -> timedelta:
        return rule.cap_window or self.decay.every


class ModelError(ValueError):
    """A scoring model file that cannot be used; the message says where and why."""


def parse_model(text: str, source: str = "<model>") -> ScoringModel:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ModelError(f"{source}: not valid TOML: {err}") from None
    try:
        return ScoringModel.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = e["loc"] or getattr(e.get("ctx", {}).get("error"), "loc", ())
            path = ".".join(str(p) for p in loc)
            line = _line_of(text, loc)
            where = f" (line {line})" if line else ""
            problems.append(f"  {path or '<top>'}{where}: {e['msg']}")
        raise ModelError(f"{source}: invalid scoring model:\n" + "\n".join(problems)) from None


def load_model(path: str | Path) -> ScoringModel:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ModelError(f"cannot read scoring model {path}: {err.strerror}") from None
    return parse_model(text, str(path))


def _line_of(text: str, loc: tuple) -> int | None:
    """Best effort: the line where the deepest written part of `loc` is (key, table or [[table]] entry).

    Follows TOML tables so `events.live_chat.points` or `sla.2.due` find their own line,
    not the first `points =` or `due =` in the file.
    """
    where: dict[tuple, int] = {}
    table: tuple = ()
    arrays: dict[tuple, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if match := re.match(r"^\[\[\s*([^\[\]]+?)\s*\]\]", line):
            base = _keys(match.group(1))
            arrays[base] = arrays.get(base, -1) + 1
            table = base + (arrays[base],)
        elif match := re.match(r"^\[\s*([^\[\]]+?)\s*\]", line):
            table = _keys(match.group(1))
        elif match := re.match(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=", line):
            key = table + _keys(match.group(1))
            for end in range(len(table) + 1, len(key) + 1):
                where.setdefault(key[:end], number)
            continue
        else:
            continue
        for end in range(1, len(table) + 1):  # a table's header is where it and its parents begin
            where.setdefault(table[:end], number)
    for end in range(len(loc), 0, -1):
        if (line_number := where.get(tuple(loc[:end]))) is not None:
            return line_number
    return None


def _keys(dotted: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in dotted.split("."))
