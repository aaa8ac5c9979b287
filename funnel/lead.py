"""One lead's life as a pure state machine: events, facts, commands and timers in;
audit entries and outbound messages out.

The workflow owns a `Lead`, calls these methods with workflow time, and then
takes the effects (`take_effects`) to write and deliver them. Nothing here
reads a clock or does I/O, so every rule is tested directly with plain `now`
values, and replaying a workflow replays exactly the same decisions.

How time works here (the README says the same for users):
- Engagement is recomputed from the lead's events in `occurred_at` order
  (`funnel.engagement`), so delivery order and batching never change a score. A late
  event re-scores the window and the correction is a new audit entry that says so.
- The lead's own decisions (threshold, fast track, falling below the threshold) are
  taken `decision_delay` after the input that calls for them, on the score at that
  moment: input arriving together is decided together, whatever its order.
- Stage changes sit on one timeline: each is stamped when it happened (a decision's
  due time, a command's receipt), never before the one before it.
- Backfill is not news: old events score, but do not fast-track or hand over, and an
  SLA that was already due when its cause arrived is recorded as late data.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pydantic import BaseModel, Field

from funnel import engagement as eng
from funnel import personal_data, stages
from funnel.models import (
    CONSENT_AT_FACT,
    CONSENT_FACT,
    CONSENT_SOURCE_FACT,
    CANCELLED_BEFORE_ARRIVAL,
    MET_BEFORE_ARRIVAL,
    SYSTEM,
    Accept,
    ActivityEvent,
    Actor,
    Anchor,
    AuditEntry,
    AuditKind,
    Close,
    Command,
    ConsentRecord,
    EndedSla,
    FactValue,
    LeadState,
    LogContact,
    LoggedContact,
    NurtureProgress,
    OpenSla,
    Outbound,
    OutboundKind,
    ProfileUpdate,
    Qualify,
    Refused,
    Reject,
    Reopen,
    Role,
    Stage,
    StageVisit,
    Trigger,
    WindowEvent,
    assign,
    built,
    parse_fact_time,
)
from funnel.scoring_model import ScoringModel, format_duration, humanize

# Events stamped further than this in the future are clock errors, not facts.
FUTURE_TOLERANCE = timedelta(minutes=5)
# How many event/update ids a lead remembers for de-duplication. Bounded so the
# state carried through continue-as-new stays small.
SEEN_IDS_MAX = 2000
COMMANDS_MAX = 500  # command outcomes a lead remembers by idempotency key
CONTACTS_KEPT = 20  # contacts a lead remembers, to meet the follow-ups of events that arrive late
ENDED_SLAS_KEPT = 20  # ended event-started deadlines a lead remembers, for events that arrive late
DECAY_FLOOR = eng.DECAY_FLOOR
CONTACT_STAGES = (Stage.IQL, Stage.MQL, Stage.SAL, Stage.SQL, Stage.RECYCLED)
CONTACT_ROLES = (Role.PRESALES, Role.SALES, Role.MANAGER)
CLOSED_STAGES = (Stage.WON, Stage.LOST, Stage.DISQUALIFIED)
HANDOVER_ACTIVITIES = 10  # the lead's latest activities a handover shows sales
# Order of timers due at the same moment: a deadline missed before a recycle is still missed.
_TIMER_ORDER = {"sla": 0, "decay": 1, "decision": 2, "cool_off": 3, "nurture": 4}


class Move(NamedTuple):
    """A move the lead wants to make by itself."""

    trigger: Trigger
    reason: str
    hand_raised: bool = False  # by a fast-track event, not by score


class Effects(BaseModel):
    audit: list[AuditEntry] = Field(default_factory=list)
    outbound: list[Outbound] = Field(default_factory=list)


class Deadline(BaseModel):
    name: str
    due_at: datetime
    cause: str


class LeadView(BaseModel):
    """What queries, the CLI and the API show of a lead."""

    lead_id: str
    stage: Stage
    stage_since: datetime
    owner: str | None
    channel: str | None
    score: dict[str, float | dict[str, float]]
    profile: dict[str, FactValue]
    consent: dict[str, Any] = Field(default_factory=dict)
    deadlines: list[Deadline]
    next_nurture_step: dict[str, str] | None
    next_decay_at: datetime | None
    decision_due_at: datetime | None = None
    cool_off_until: datetime | None
    qualified_by: str | None
    model_ref: str
    events_applied: int
    duplicates_ignored: int
    rescoring_from: datetime | None = None  # events older than this are beyond exact re-scoring
    history: list[StageVisit]


def _fmt(points: float) -> str:
    text = f"{points:+.2f}".rstrip("0").rstrip(".")
    return text.replace("-", "\u2212")


def _day(t: datetime) -> str:
    return t.date().isoformat() if (t.hour, t.minute, t.second) == (0, 0, 0) else t.isoformat()


def _why_rescored(late: list[ActivityEvent], cause: str | None, added: list[ActivityEvent]) -> str:
    """What re-scored the rules a rescoring changed beyond its own entries."""
    if late:
        first = late[0]
        who = (f"late event {first.event_id} of {_day(first.occurred_at)}" if len(late) == 1 else
               f"{len(late)} late events ({', '.join(e.event_id for e in late[:3])}{', ...' if len(late) > 3 else ''}"
               f" of {_day(late[0].occurred_at)} to {_day(late[-1].occurred_at)})")
        return f"{who} re-scored the window"
    if cause:
        return f"{cause} re-scored the window"
    if added:
        # an event newer than all others, but received after a decay it would have prevented
        return (f"event {added[0].event_id} of {_day(added[0].occurred_at)}, received after the decay it"
                " prevents, re-scored the window")
    return "re-scored"


class Lead:
    def __init__(self, state: LeadState, model: ScoringModel, seen_ids_max: int = SEEN_IDS_MAX,
                 decision_delay: timedelta = timedelta(0), record_effects: bool = True,
                 explain: bool = True, orders_slas: bool = True, meets_late_slas: bool = True):
        """`record_effects=False`: the lead keeps no audit entries or outbound messages, only
        its state (their sequence numbers included) moves on exactly as with them. For a
        backtest, which reads the state alone: writing the entries' text is most of the work.
        `explain`: audit what a manager would otherwise guess at: a threshold handover held
        back because the lead's newest activity is too old, and every change of email
        consent (workflow runs of version 8 on; older runs replay without these entries).
        `orders_slas`: a deadline an event starts counts from the earliest such event, in
        whatever order they arrive (runs of version 12 on; older runs replay from the first
        to arrive). `meets_late_slas`: a contact meets the follow-up deadline of an event that
        occurred before it, also of one that arrives after it, and a stage change that cancels
        deadlines (recycled, closed) cancels that of an event that occurred before it, as in
        time order (runs of version 13 on; older runs open that deadline when the event arrives)."""
        self.explain = explain
        self.orders_slas = orders_slas
        self.meets_late_slas = meets_late_slas
        self.state = state
        self.recording = record_effects
        self.model = model
        self.seen_ids_max = seen_ids_max
        self.decision_delay = decision_delay
        self._seen = set(state.seen_ids)
        self._effects = Effects()
        self._now = state.stage_since  # the time of the call being handled
        self._hand: WindowEvent | None = None  # the hand-raise a decision is acting on
        self._command_id: str | None = None  # the command being carried out, for its entries
        self._fold_cache = eng.FoldCache()  # engagement folded up to the newest event, for input in order

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(cls, lead_id: str, model: ScoringModel, now: datetime, channel: str | None = None,
               **kwargs) -> "Lead":
        """A new IQL lead; `channel` is its first touch, when the first input tells it."""
        state = LeadState(lead_id=lead_id, created_at=now, stage_since=now, model_ref=model.ref, channel=channel,
                          evaluated_at=now)
        state.history.append(StageVisit(stage=Stage.IQL, entered_at=now))
        lead = cls(state, model, **kwargs)
        lead._now = now
        lead._audit(AuditKind.LEAD_CREATED, SYSTEM, f"lead created as iql, scored by {model.ref}", to_stage=Stage.IQL)
        lead._start_nurture(now)
        return lead

    def use_model(self, model: ScoringModel, now: datetime, by: Actor = SYSTEM) -> None:
        """Re-score under another model version from now on; stage consequences follow
        upwards only (a lead newly over the threshold becomes MQL, nobody is demoted)."""
        self._now = now
        if self.state.evaluated_at is None:  # carried over from code that kept no fold
            self._rescore(now)
        if model.ref == self.state.model_ref:
            self.model = model
            return
        s = self.state
        self.tick(now)
        old_ref, old_total = s.model_ref, s.score.total
        self.model = model
        s.model_ref = model.ref
        progress = s.nurture
        if progress and progress.next_step >= len(model.nurture.get(progress.track, [])):  # type: ignore[call-overload]
            s.nurture = None  # the new model has no such step: the track is over
        cause = f"model {model.ref}"
        self._refit(by, now, cause=cause)
        self._rescore(now, cause=cause)
        self._audit(AuditKind.MODEL_CHANGED, by,
                    f"scoring model {old_ref} \u2192 {model.ref}: {old_total:g} \u2192 {s.score.total:g}")
        self._consider(now)

    def take_effects(self) -> Effects:
        effects, self._effects = self._effects, Effects()
        return effects

    # ------------------------------------------------------------------ inputs

    def ingest(self, event: ActivityEvent, now: datetime) -> None:
        """Apply one activity event (once per event_id)."""
        self.ingest_many([event], now)

    def forgets(self, event_ids: list[str]) -> list[str]:
        """The ids among `event_ids` this lead cannot tell from memory whether it applied:
        none until its memory of ids is full, then those it does not remember. The workflow
        asks the audit store about them (`ingest_many(applied=...)`)."""
        if len(self.state.seen_ids) < self.seen_ids_max:
            return []
        return [i for i in dict.fromkeys(event_ids) if i not in self._seen]

    def ingest_many(self, events: list[ActivityEvent], now: datetime, applied: frozenset[str] = frozenset()) -> None:
        """Apply events that arrived together: whatever their order, the engagement is
        recomputed once from all of the lead's events in time order. `applied`: ids the
        lead no longer remembers but the audit store shows applied (duplicates)."""
        s = self.state
        self.tick(now)  # timers due before this input fire first, on what was known then
        self._now = now
        prior_newest = s.engagement.newest_key
        added: list[ActivityEvent] = []
        beyond: list[tuple[ActivityEvent, float, str]] = []
        for event in sorted(events, key=lambda e: (e.occurred_at, e.event_id)):
            rule = self.model.events.get(event.type)
            if event.lead_id != s.lead_id:
                self._ignore(event, f"event {event.event_id} is for lead {event.lead_id}, not {s.lead_id}")
                continue
            if rule is None:
                self._ignore(event, f"unknown event type {event.type!r} in model {self.model.ref}")
                continue
            if event.occurred_at > now + FUTURE_TOLERANCE:
                self._ignore(event, f"event {event.event_id} occurred in the future ({event.occurred_at.isoformat()})")
                continue
            if self._is_duplicate(event.event_id, kind="event", channel=event.channel, known=event.event_id in applied):
                continue
            assign(s, events_applied=s.events_applied + 1)
            item = built(WindowEvent, {  # validated as an ActivityEvent already
                "event_id": event.event_id, "type": event.type, "occurred_at": event.occurred_at,
                "channel": event.channel, "attributes": dict(event.attributes)})
            if s.engagement.beyond_horizon(event.occurred_at, event.event_id):
                points, why = eng.apply_beyond_horizon(self.model, s.engagement, item)
                self._fold_cache.clear()  # the checkpoint changed under it
                beyond.append((event, points, why))
            else:
                s.engagement.add(item)
                added.append(event)
        if not added and not beyond:
            return
        negative = any(self.model.events[e.type].points < 0 for e in added) or any(p < 0 for _, p, _ in beyond)
        self._rescore(now, added=added, beyond=beyond, prior_newest=prior_newest)
        if eng.trim(self.model, s.engagement):
            self._fold_cache.clear()
        for event in added:
            self._on_event(event, now)
        if negative:
            self._arm_below("negative")
        self._consider(now)

    def take(self, batch: list[ActivityEvent | ProfileUpdate], now: datetime,
             applied: frozenset[str] = frozenset()) -> None:
        """A round of input, as the lead workflow applies it: the events together, then the
        profile updates in order, then whatever timers are due."""
        events = [item for item in batch if isinstance(item, ActivityEvent)]
        if events:
            self.ingest_many(events, now, applied=applied)
        for item in batch:
            if isinstance(item, ProfileUpdate):
                self.update_profile(item, now)
        self.tick(now)

    def update_profile(self, update: ProfileUpdate, now: datetime) -> None:
        """Merge profile facts (the latest observed value of each wins) and re-evaluate the fit rules."""
        self.tick(now)
        self._now = now
        if self._is_duplicate(update.update_id, kind="profile update", namespace="profile:"):
            return
        s = self.state
        key = (update.observed_at or now, update.update_id)
        taken = {}
        for name, value in update.facts.items():
            if name not in s.profile_seen or key > tuple(s.profile_seen[name]):
                s.profile[name] = value
                s.profile_seen[name] = key
                taken[name] = value
        facts = ", ".join(f"{k}={v}" for k, v in sorted(update.facts.items()))
        stale = sorted(set(update.facts) - set(taken))
        detail = f"profile: {facts}" + (f" (older than what is known of: {', '.join(stale)})" if stale else "")
        self._audit(AuditKind.PROFILE_UPDATED, update.actor, detail, event_id=update.update_id,
                    occurred_at=update.observed_at)
        if CONSENT_FACT in taken:
            self._consent_fact(update, key[0])
        before = s.score.fit
        self._refit(update.actor, now, cause=f"profile update {update.update_id}")
        if s.score.fit < before:
            self._arm_below("negative")
        self._consider(now)

    def check(self, command: Command) -> None:
        """Raise Refused if `command` cannot be executed now; changes nothing."""
        self._plan(command)

    def outcome_of(self, command_id: str | None) -> str | None:
        """What became of the command with this idempotency key: "applied", "refused: ...", or None."""
        return self.state.commands.get(command_id) if command_id else None

    def execute(self, command: Command, now: datetime, command_id: str | None = None) -> None:
        """Carry out a presales/sales/manager command, or raise Refused.

        Timers due before the command fire first (a late accept is a breached SLA,
        not a met one); a refused command changes nothing beyond that. With a
        `command_id` (idempotency key) the outcome is remembered and every entry of the
        command carries the key.
        """
        self.tick(now)
        self._now = now
        try:
            trigger, detail = self._plan(command)
        except Refused as refused:
            self._remember(command_id, f"refused: {refused}")
            raise
        self._command_id = command_id
        try:
            self._carry_out(command, trigger, detail, now)
        finally:
            self._command_id = None
        self._remember(command_id, "applied")

    def _remember(self, command_id: str | None, outcome: str) -> None:
        if not command_id:
            return
        commands = self.state.commands
        commands.pop(command_id, None)
        commands[command_id] = outcome
        while len(commands) > COMMANDS_MAX:
            commands.pop(next(iter(commands)))

    def _carry_out(self, command: Command, trigger: Trigger | None, detail: str, now: datetime) -> None:
        actor = command.by
        if isinstance(command, LogContact):
            self._audit(
                AuditKind.CONTACT_LOGGED,
                actor,
                f"{command.channel} contact by {actor.name}" + (f": {command.note}" if command.note else ""),
            )
            for sla in [x for x in self.state.slas if x.met_by == "contact"]:
                self._close_sla(sla, AuditKind.SLA_MET, actor, now)
            if self.meets_late_slas:
                self.state.contacts = [*self.state.contacts[-(CONTACTS_KEPT - 1):], LoggedContact(at=now, by=actor)]
            return
        if isinstance(command, Qualify):
            self.state.qualified_by = detail
        reason = getattr(command, "reason", None)
        if isinstance(command, Qualify):
            reason = detail
        self._move(trigger, actor, now, reason=reason, note=command.note)
        self._consider(now)

    def assign_owner(self, owner: str, now: datetime, team: str = "presales") -> None:
        self._now = now
        if self.state.owner == owner:
            return
        self.state.owner = owner
        self._audit(AuditKind.OWNER_ASSIGNED, SYSTEM, f"owner {owner} (handover to {team})")

    def erase_personal_data(self, now: datetime, by: Actor) -> personal_data.ErasedCounts:
        """GDPR Art. 17: drop the person's data from the state (what that is: funnel.personal_data)
        and record who did it; scores, stages, times, event types and rule names stay."""
        self._now = now
        erased = personal_data.erase_from_state(self.state, self.model.fit, now)
        self._audit(AuditKind.PERSONAL_DATA_ERASED, by, erased.describe(by), reason="gdpr_art_17")
        return erased

    # ------------------------------------------------------------------ timers

    def _timers(self) -> list[tuple[datetime, str, Any]]:
        s = self.state
        due: list[tuple[datetime, str, Any]] = [(sla.due_at, "sla", sla) for sla in s.slas]
        if s.nurture:
            due.append((s.nurture.next_at, "nurture", None))
        if s.next_decay_at is not None and s.stage not in CLOSED_STAGES:
            due.append((s.next_decay_at, "decay", None))
        if s.decision_due_at is not None:
            due.append((s.decision_due_at, "decision", None))
        if s.cool_off_until is not None and s.stage in (Stage.LOST, Stage.RECYCLED):
            due.append((s.cool_off_until, "cool_off", None))
        return due

    def _due(self, now: datetime) -> bool:
        """Whether any of `_timers` is due at or before `now`: tick asks at every input, and
        the answer is almost always no, so it asks without listing and sorting them."""
        s = self.state
        return ((s.decision_due_at is not None and s.decision_due_at <= now)
                or (bool(s.nurture) and s.nurture.next_at <= now)  # type: ignore[union-attr]
                or (s.next_decay_at is not None and s.next_decay_at <= now and s.stage not in CLOSED_STAGES)
                or (s.cool_off_until is not None and s.cool_off_until <= now
                    and s.stage in (Stage.LOST, Stage.RECYCLED))
                or any(sla.due_at <= now for sla in s.slas))

    def next_wakeup(self) -> datetime | None:
        """The earliest moment a timer is due; the workflow sleeps until then."""
        return min((t for t, _, _ in self._timers()), default=None)

    def tick(self, now: datetime) -> None:
        """Fire every timer due at or before `now`, one at a time in time order, each at
        its own due time: decay, SLA breaches, decisions, nurture steps, cool-off."""
        self._now = now
        s = self.state
        while True:
            if not self._due(now):
                return
            timers = self._timers()
            # The first timer of all, by time and order: if it is not due, none is.
            at, kind, item = min(timers, key=lambda x: (x[0], _TIMER_ORDER[x[1]]))
            if at > now:
                return
            if kind == "sla":
                self._close_sla(item, AuditKind.SLA_BREACHED, SYSTEM, at)
            elif kind == "decay":
                before = s.score.total
                self._rescore(at)
                if s.score.total < before:
                    self._arm_below("decay")
                self._consider(at)
            elif kind == "decision":
                self._decide(at)
            elif kind == "nurture":
                self._send_nurture_step(at)
            elif s.stage == Stage.LOST:
                self._move(Trigger.COOL_OFF_ENDED, SYSTEM, at, reason="cool_off")
            else:
                s.cool_off_until = None
                self._consider(at)

    # ------------------------------------------------------------------ reading

    def consent(self) -> ConsentRecord:
        """Email consent as known now: the latest of consent events and consent facts."""
        s = self.state
        known = [c for c in (s.event_consent, s.consent_fact) if c is not None]
        if not known:
            return self._initial_consent()
        return max(known, key=lambda c: c.since)

    def _initial_consent(self) -> ConsentRecord:
        return ConsentRecord(email=True, since=self.state.created_at, source="opt-in when the lead was created")

    def view(self) -> LeadView:
        s = self.state
        nurture = None
        if s.nurture:
            step = self.model.nurture[s.nurture.track][s.nurture.next_step]  # type: ignore[index]
            nurture = {"track": s.nurture.track, "step": step.name, "at": s.nurture.next_at.isoformat()}
        consent = self.consent()
        return LeadView(
            lead_id=s.lead_id,
            stage=s.stage,
            stage_since=s.stage_since,
            owner=s.owner,
            channel=s.channel,
            score={
                "total": s.score.total,
                "fit": round(s.score.fit, 2),
                "engagement": round(s.score.engagement, 2),
                "breakdown": dict(sorted(s.score.breakdown.items())),
            },
            profile=dict(s.profile),
            consent={"email": consent.email, "since": consent.since.isoformat(), "source": consent.source},
            deadlines=[Deadline(name=x.name, due_at=x.due_at, cause=x.cause) for x in sorted(s.slas, key=lambda x: x.due_at)],
            next_nurture_step=nurture,
            next_decay_at=s.next_decay_at if s.stage not in CLOSED_STAGES else None,
            decision_due_at=s.decision_due_at,
            cool_off_until=s.cool_off_until,
            qualified_by=s.qualified_by,
            model_ref=s.model_ref,
            events_applied=s.events_applied,
            duplicates_ignored=s.duplicates_ignored,
            rescoring_from=s.engagement.horizon_start,
            history=list(s.history),
        )

    # ------------------------------------------------------------------ scoring

    def _rescore(self, now: datetime, added: list[ActivityEvent] = (), beyond=(),
                 prior_newest: tuple[datetime, str] | None = None,
                 cause: str | None = None, new_anchor: Anchor | None = None) -> None:
        """Fold the engagement up to `now` and audit the difference, explained: each new
        event in order on its own line, each decay step and reset on its own line, and what
        late events (or a model change) re-scored, per rule."""
        s = self.state
        previous_eval = s.evaluated_at or s.created_at
        result = eng.fold(self.model, s.engagement, now, self._fold_cache, explain=self.recording)
        new = result.work
        after = new.breakdown
        # The difference per rule, kept only where the points moved: for a rule whose points
        # stayed it is 0.0, which is what a missing rule reads as below (most rules, most calls).
        fit, old, diff = {}, {}, {}
        for k, v in s.score.breakdown.items():
            if k.startswith("fit:"):
                fit[k] = v
            else:
                old[k] = v
                if (now_points := after.get(k, 0.0)) != v:
                    diff[k] = round(now_points - v, 2)
        for k, v in after.items():
            if v and k not in old:
                diff[k] = round(v - 0.0, 2)
        fit.update(after)
        assign(s.score, engagement=new.engagement, breakdown=fit)  # (setattr, without pydantic's dispatch)
        assign(s, evaluated_at=max(now, previous_eval), next_decay_at=eng.next_decay_at(self.model, new),
               event_consent=new.consent)
        if new.first_touch is not None:
            assign(s, channel=new.first_touch[1])
        # One entry per change, as below; a lead that records no effects only counts them
        # (audit_seq is state), so it skips writing their text and building the entries.
        rec = self.recording
        entries: list[tuple[str, float, str, str | None, datetime | None, str | None, str | None]] = []
        count = 0
        contributions = result.by_key()
        for event, points, why in beyond:
            diff[event.type] = round(diff.get(event.type, 0.0) - points, 2)
            count += 1
            if rec:
                text = f"{_fmt(points)} {event.type}: late event {event.event_id} of {_day(event.occurred_at)}{why}"
                entries.append((event.type, points, text, event.event_id, event.occurred_at, event.channel,
                                event.source))
        late = ([e for e in added if prior_newest is not None and (e.occurred_at, e.event_id) < prior_newest]
                if rec else [])
        taken_back = any(k.startswith("c:") for k in contributions)  # an event took back another's points
        for event in added:  # one entry per applied event, with what it scored itself
            c = contributions.get(f"e:{event.event_id}")
            if c is None:
                continue
            diff[c.rule] = round(diff.get(c.rule, 0.0) - c.points, 2)
            count += 1
            if rec:
                name = (f"late event {event.event_id} of {_day(event.occurred_at)}" if event in late else
                        f"event {event.event_id}")
                entries.append((c.rule, c.points, f"{_fmt(c.points)} {event.type} ({name}{c.why})",
                                event.event_id, event.occurred_at, event.channel, event.source))
            if not taken_back:
                continue
            for key in (k for k in contributions if k.startswith(f"c:{event.event_id}:")):
                taken = contributions[key]
                diff[taken.rule] = round(diff.get(taken.rule, 0.0) - taken.points, 2)
                count += 1
                if rec:
                    entries.append((taken.rule, taken.points, f"{_fmt(taken.points)} {taken.rule}{taken.why}",
                                    None, event.occurred_at, event.channel, event.source))
        reset_key = f"r:{new_anchor.at.isoformat()}" if new_anchor is not None else None
        # Decay steps after the last evaluation are new; so is all decay of a lead's first events.
        first_events = bool(added) and prior_newest is None
        for c in result.contributions:
            if (c.key[0] == "d" and (first_events or c.at > previous_eval)) or c.key == reset_key:
                diff[c.rule] = round(diff.get(c.rule, 0.0) - c.points, 2)
                count += 1
                if rec:
                    text = (f"{_fmt(c.points)} inactivity decay ({c.why})" if c.rule == "decay" else
                            f"{_fmt(c.points)} {c.why}")
                    entries.append((c.rule, c.points, text, None, c.at, None, None))
        if not rec:
            assign(s, audit_seq=s.audit_seq + count + sum(1 for d in diff.values() if d))  # as _audit counts them
            return
        changed = sorted(r for r, d in diff.items() if d)  # what the entries so far do not explain
        if changed:
            why_rescored = _why_rescored(late, cause, added)  # (only now: it formats dates)
            cause_at = late[0].occurred_at if late else (added[0].occurred_at if added else None)
            for rule in changed:
                entries.append((rule, diff[rule], f"{_fmt(diff[rule])} {rule}: {why_rescored}", None, cause_at, None,
                                None))
        # Entries show the score they leave behind, in order: replay the totals.
        running = {k: v for k, v in old.items()}
        for rule, points, text, event_id, occurred, channel, source in entries:
            running[rule] = round(running.get(rule, 0.0) + points, 2)
            self._audit(AuditKind.SCORE_CHANGED, SYSTEM, text, rule=rule, points=points, event_id=event_id,
                        occurred_at=occurred, channel=channel or s.channel, source=source,
                        score_engagement=round(sum(running.values()), 2))

    def _refit(self, actor: Actor, now: datetime, cause: str) -> None:
        """Recompute fit from the profile; record each rule that starts or stops matching."""
        s = self.state
        current = {k[4:]: v for k, v in s.score.breakdown.items() if k.startswith("fit:")}
        wanted = {rule.name: rule.points for rule in self.model.fit if rule.matches(s.profile)}
        for name in sorted(set(current) | set(wanted)):
            delta = round(wanted.get(name, 0.0) - current.get(name, 0.0), 2)
            if not delta:
                continue
            verb = "matches" if name in wanted else "no longer matches"
            s.score.fit = round(s.score.fit + delta, 2)
            total = round(current.get(name, 0.0) + delta, 2)
            if total:
                s.score.breakdown[f"fit:{name}"] = total
            else:
                s.score.breakdown.pop(f"fit:{name}", None)
            self._audit(AuditKind.SCORE_CHANGED, actor, f"{_fmt(delta)} fit rule {name} {verb} ({cause})",
                        rule=f"fit:{name}", points=delta)

    # ------------------------------------------------------------------ decisions

    def _arm_below(self, why: str) -> None:
        s = self.state
        if s.stage == Stage.MQL and why not in s.below_threshold_by:
            s.below_threshold_by.append(why)  # type: ignore[arg-type]

    def _consider(self, now: datetime) -> None:
        """If the lead wants to move by itself, decide after the decision delay (at once
        when there is none): input arriving within the delay is decided together."""
        s = self.state
        if self.explain:
            self._note_consent(now)
        if s.decision_due_at is not None or self._wanted(now) is None:
            if self.explain:
                self._note_withheld(now)
            return
        if self.decision_delay:
            s.decision_due_at = now + self.decision_delay
        else:
            self._decide(now)

    def _decide(self, at: datetime) -> None:
        s = self.state
        s.decision_due_at = None
        wanted = self._wanted(at, acting=True)
        if wanted is not None:
            if wanted.trigger in (Trigger.FAST_TRACK, Trigger.SCORE_THRESHOLD, Trigger.REQUALIFY):
                s.mql_hand_raised = wanted.hand_raised
                self._hand = self._fast_track(at) if wanted.hand_raised else None
            self._move(wanted.trigger, SYSTEM, at, reason=wanted.reason)
        s.below_threshold_by = []

    def _fast_track(self, at: datetime) -> WindowEvent | None:
        """The latest hand-raise not yet decided on and still fresh at `at`."""
        s, th = self.state, self.model.thresholds
        used = s.fast_track_used_until
        for e in reversed(s.engagement.window):
            if e.type in th.fast_track and (used is None or e.occurred_at > used):
                return e if e.occurred_at >= at - th.max_age.fast_track else None
        return None

    def _fresh(self, at: datetime, newest: datetime | None = None) -> bool:
        """Whether the newest activity (found here unless given) is recent enough to be news."""
        newest = newest or self._newest_activity()
        return newest is not None and newest >= at - self.model.thresholds.max_age.score_threshold

    def _newest_activity(self) -> datetime | None:
        for e in reversed(self.state.engagement.window):
            rule = self.model.events.get(e.type)
            if rule is not None and rule.activity:
                return e.occurred_at
        return self.state.engagement.checkpoint.newest_activity

    def _wanted(self, at: datetime, acting: bool = False) -> Move | None:
        """The move the lead would make by itself at `at`, if any. With `acting`, a blocked
        hand-raise is recorded (review message) and used up on the way."""
        s, th = self.state, self.model.thresholds
        total = s.score.total
        if s.stage in (Stage.IQL, Stage.RECYCLED):
            cooling = s.stage == Stage.RECYCLED and self._cooling_off(at)
            hand = self._fast_track(at)
            if hand is not None and (not cooling or th.fast_track_ends_cool_off):
                blockers = [r.name for r in self.model.fit if r.blocks_fast_track and r.matches(s.profile)]
                if not blockers:
                    trigger = Trigger.FAST_TRACK if s.stage == Stage.IQL else Trigger.REQUALIFY
                    return Move(trigger, hand.type, hand_raised=True)
                if not acting:
                    return Move(Trigger.FAST_TRACK, "blocked")  # decide, to record the block
                s.fast_track_used_until = hand.occurred_at
                rules = ", ".join(blockers)
                self._audit(AuditKind.FAST_TRACK_BLOCKED, SYSTEM,
                            f"fast-track {hand.type} (event {hand.event_id}) not handed to presales: fit rule"
                            f" {rules} blocks it; sent for review", event_id=hand.event_id,
                            occurred_at=hand.occurred_at, reason=rules)
                self._outbound(OutboundKind.REVIEW, at, reason=f"fit rule {rules} blocks fast-track",
                               event={"event_id": hand.event_id, "type": hand.type,
                                      "occurred_at": hand.occurred_at.isoformat()},
                               **self._handover_content())
            if not cooling and total >= th.mql and self._fresh(at):
                trigger = Trigger.SCORE_THRESHOLD if s.stage == Stage.IQL else Trigger.REQUALIFY
                return Move(trigger, f"score {total:g}")
            return None
        if s.stage == Stage.MQL and th.on_mql_decay == "recycle" and total < th.mql and s.below_threshold_by:
            if "decay" in s.below_threshold_by:
                return Move(Trigger.DECAY_BELOW_THRESHOLD, "inactivity_decay")
            if not s.mql_hand_raised:  # a hand-raiser stays with presales whatever else it did
                return Move(Trigger.NEGATIVE_CRITERIA, "negative_criteria")
        return None

    def _note_consent(self, at: datetime) -> None:
        """Email consent in the history whenever it is withdrawn or given again (an
        unsubscribe, a bounce, a confirmed resubscribe, a consent fact), with its source and
        since when; a second unsubscribe changes nothing worth an entry."""
        s = self.state
        if s.event_consent is None and s.consent_fact is None and s.consent_noted is None:
            return  # opted in when created, nothing since (most leads: no record built for it)
        consent = self.consent()
        if consent.email == (s.consent_noted.email if s.consent_noted is not None else True):
            return
        s.consent_noted = consent
        verb = "may be mailed again" if consent.email else "may not be mailed"
        self._audit(AuditKind.CONSENT_CHANGED, SYSTEM,
                    f"email consent: {verb} since {_day(consent.since)} ({consent.source})",
                    occurred_at=consent.since, reason="email_consent" if consent.email else "no_consent")

    def _note_withheld(self, at: datetime) -> None:
        """A lead over the threshold that stays where it is because its newest activity is
        older than `max_age.score_threshold` (backfill is not news) says so in its history,
        once per newest activity: a manager sees why 108 points sit in IQL."""
        s, th = self.state, self.model.thresholds
        if s.stage not in (Stage.IQL, Stage.RECYCLED) or s.score.total < th.mql:
            return
        newest = self._newest_activity()
        if newest is None or self._fresh(at, newest) or newest == s.withheld_noted_for:
            return
        if s.stage == Stage.RECYCLED and self._cooling_off(at):
            return
        s.withheld_noted_for = newest
        self._audit(AuditKind.NOT_HANDED_OVER, SYSTEM,
                    f"score {s.score.total:g} reaches the threshold ({th.mql:g}), but the newest activity"
                    f" ({_day(newest)}) is older than {format_duration(th.max_age.score_threshold)}: not handed"
                    f" over; it is when the lead is active again", occurred_at=newest, reason="backfill")

    def _cooling_off(self, now: datetime) -> bool:
        return self.state.cool_off_until is not None and now < self.state.cool_off_until

    # ------------------------------------------------------------------ stages

    def _plan(self, command: Command) -> tuple[Trigger | None, str]:
        """Which trigger a command fires, after every check; raises Refused."""
        s, role = self.state, command.by.role
        if isinstance(command, Accept):
            return self._checked(Trigger.ACCEPT, role), ""
        if isinstance(command, Reject):
            trigger = Trigger.REJECT_RECYCLE if command.recycle else Trigger.REJECT_DISQUALIFY
            self._checked(trigger, role)
            self._known_reason(command.reason, self.model.reasons.reject, "rejection")
            return trigger, ""
        if isinstance(command, Close):
            trigger = Trigger.WON if command.outcome == "won" else Trigger.LOST
            if command.outcome == "lost" and not command.reason:
                raise Refused(f"cannot close lead {s.lead_id} as lost without a reason code")
            self._checked(trigger, role)
            if command.outcome == "lost":
                self._known_reason(command.reason, self.model.reasons.lost, "lost deal")
            return trigger, ""
        if isinstance(command, Reopen):
            return self._checked(Trigger.REOPEN, role), ""
        if isinstance(command, LogContact):
            if s.stage not in CONTACT_STAGES:
                raise Refused(f"cannot log a contact for lead {s.lead_id}: it is {s.stage.value} (closed)")
            if role not in CONTACT_ROLES:
                raise Refused(f"cannot log a contact for lead {s.lead_id}: role {role.value} may not")
            return None, ""
        if isinstance(command, Qualify):
            trigger = self._checked(Trigger.QUALIFY, role)
            q = self.model.qualification
            criteria = command.bant if command.framework == "bant" else command.meddic
            framework = command.framework.upper()
            if criteria is None:
                raise Refused(f"cannot qualify lead {s.lead_id}: no {framework} criteria given")
            met = [name for name, value in criteria.model_dump().items() if value]
            need = q.bant_min if command.framework == "bant" else q.meddic_min
            required = q.bant_required if command.framework == "bant" else q.meddic_required
            of = len(type(criteria).model_fields)
            missing = [name for name in required if name not in met]
            if missing:
                raise Refused(
                    f"cannot qualify lead {s.lead_id}: {framework} {' and '.join(missing)}"
                    f" {'is' if len(missing) == 1 else 'are'} required (met: {', '.join(met) or 'none'})"
                )
            if len(met) < need:
                raise Refused(
                    f"cannot qualify lead {s.lead_id}: {framework} {len(met)} of {of} met"
                    f" ({', '.join(met) or 'none'}); at least {need} needed"
                )
            return trigger, f"{command.framework} {len(met)}/{of}: {', '.join(met)}"
        raise Refused(f"unknown command {command!r}")  # pragma: no cover - the union is closed

    def _known_reason(self, code: str | None, codes: dict[str, str], what: str) -> None:
        if codes and code not in codes:
            raise Refused(f"cannot take reason {code!r} for lead {self.state.lead_id}: the {what} reasons of model "
                          f"{self.model.ref} are {', '.join(codes)}")

    def _checked(self, trigger: Trigger, role: Role) -> Trigger:
        stages.check(self.state.lead_id, self.state.stage, trigger, role, self.model.shortcuts)
        return trigger

    def _move(self, trigger: Trigger, actor: Actor, at: datetime, reason: str | None = None,
              note: str | None = None) -> None:
        s = self.state
        at = max(at, s.stage_since)  # one timeline: never before the stage change before it
        move = stages.check(s.lead_id, s.stage, trigger, actor.role, self.model.shortcuts)
        old = s.stage
        s.stage, s.stage_since = move.target, at
        s.history.append(StageVisit(stage=move.target, entered_at=at, trigger=trigger))
        detail = f"{old.value} -> {move.target.value}: {move.why}"
        if reason:
            detail += f" ({reason})"
        if note:
            detail += f"; note: {note}"
        self._audit(
            AuditKind.STAGE_CHANGED, actor, detail, from_stage=old, to_stage=move.target, trigger=trigger,
            reason=reason, occurred_at=at,
        )
        self._on_exit(old, actor, at)
        self._on_enter(move.target, trigger, at, reason)

    def _on_exit(self, old: Stage, actor: Actor, now: datetime) -> None:
        s = self.state
        s.nurture = None
        s.below_threshold_by = []
        for sla in list(s.slas):
            if sla.met_by == "stage_exit" and sla.stage == old:
                kind = AuditKind.SLA_MET if actor.role != Role.SYSTEM else AuditKind.SLA_CANCELLED
                self._close_sla(sla, kind, actor, now)
            elif s.stage in CLOSED_STAGES or s.stage == Stage.RECYCLED:
                self._close_sla(sla, AuditKind.SLA_CANCELLED, actor, now)

    def _on_enter(self, stage: Stage, trigger: Trigger, now: datetime, reason: str | None) -> None:
        s = self.state
        for sla in self.model.sla:
            if sla.on_stage == stage:
                self._open_sla(sla.name, now, sla.due, sla.met_by, stage, sla.escalate_to, f"stage {stage.value}")
        if stage == Stage.MQL:
            s.handovers += 1
            hand, self._hand = self._hand, None
            # Every hand-raise so far is decided on by this MQL.
            raised = [e.occurred_at for e in s.engagement.window if e.type in self.model.thresholds.fast_track]
            if raised:
                s.fast_track_used_until = max(raised + [s.fast_track_used_until or raised[0]])
            # The decay that recycles an unaccepted MQL counts from here, not from activity before.
            s.engagement.add_anchor(Anchor(at=now, kind="clock"))
            self._rescore(now)
            why = (f"fast-track: {hand.type} (event {hand.event_id} at {hand.occurred_at.isoformat()})" if hand else
                   f"score {s.score.total:g} reached the MQL threshold {self.model.thresholds.mql:g}")
            self._outbound(OutboundKind.HANDOVER, now, assign_to="presales", trigger=trigger.value, reason=why,
                           **self._handover_content())
            if self.model.shortcuts.auto_accept:
                self._move(Trigger.AUTO_ACCEPT, SYSTEM, now)
        elif stage == Stage.SQL:
            self._outbound(OutboundKind.OPPORTUNITY, now, assign_to="sales", qualified_by=s.qualified_by,
                           presales_owner=s.owner, **self._handover_content())
        elif stage == Stage.LOST:
            s.cool_off_until = now + self.model.cool_off.lost
        elif stage == Stage.RECYCLED:
            s.owner = None
            # A lead back from a lost deal has served its cool-off already.
            s.cool_off_until = None if trigger == Trigger.COOL_OFF_ENDED else now + self.model.cool_off.recycled
            if self.model.cool_off.reset_engagement_on_recycle:
                # Back to nurturing with a clean slate of interest; negative criteria are not forgiven.
                anchor = Anchor(at=now, kind="reset")
                s.engagement.add_anchor(anchor)
                self._rescore(now, new_anchor=anchor)
        if stage in (Stage.IQL, Stage.RECYCLED):
            self._start_nurture(now)

    def _handover_content(self) -> dict[str, Any]:
        """What sales needs to act: the score and why, the facts, what the lead did and when."""
        if not self.recording:
            return {}  # for a message nobody keeps
        s = self.state
        consent = self.consent()
        activities = [
            {"event_id": e.event_id, "type": e.type, "occurred_at": e.occurred_at.isoformat(), "channel": e.channel,
             **({"attributes": dict(e.attributes)} if e.attributes else {})}
            for e in s.engagement.window[-HANDOVER_ACTIVITIES:]
            if e.type in self.model.events and self.model.events[e.type].points > 0
        ][::-1]
        return {
            "score": s.score.total,
            "score_fit": s.score.fit,
            "score_engagement": s.score.engagement,
            "breakdown": dict(sorted(s.score.breakdown.items())),
            "profile": dict(sorted(s.profile.items())),
            "activities": activities,
            "email_consent": consent.email,
            "channel": s.channel,
            "model": s.model_ref,
        }

    def _start_nurture(self, now: datetime) -> None:
        steps = self.model.nurture.get(self.state.stage.value)  # type: ignore[call-overload]
        self.state.nurture = (
            NurtureProgress(track=self.state.stage.value, next_step=0, next_at=now + steps[0].after) if steps else None
        )

    def _send_nurture_step(self, at: datetime) -> None:
        s = self.state
        progress = s.nurture
        assert progress is not None
        steps = self.model.nurture[progress.track]  # type: ignore[index]
        step = steps[progress.next_step]
        consent = self.consent()
        if consent.email:
            self._audit(AuditKind.NURTURE_STEP_SENT, SYSTEM, f"nurture {progress.track} step {step.name}",
                        occurred_at=at)
            self._outbound(OutboundKind.NURTURE_STEP, at, track=progress.track, step=step.name,
                           due_at=progress.next_at.isoformat())
        else:
            self._audit(AuditKind.NURTURE_STEP_SKIPPED, SYSTEM,
                        f"nurture {progress.track} step {step.name} skipped: no consent since"
                        f" {_day(consent.since)} ({consent.source})", occurred_at=at, reason="no_consent")
        nxt = progress.next_step + 1
        s.nurture = (
            NurtureProgress(track=progress.track, next_step=nxt, next_at=progress.next_at + steps[nxt].after)
            if nxt < len(steps) else None
        )

    # ------------------------------------------------------------------ consent and events

    def _consent_fact(self, update: ProfileUpdate, observed: datetime) -> None:
        facts = update.facts
        since = parse_fact_time(facts[CONSENT_AT_FACT]) if CONSENT_AT_FACT in facts else observed
        source = f"profile update {update.update_id}"
        if CONSENT_SOURCE_FACT in facts:
            source += f" ({facts[CONSENT_SOURCE_FACT]})"
        self.state.consent_fact = ConsentRecord(email=bool(facts[CONSENT_FACT]), since=since, source=source)

    def _on_event(self, event: ActivityEvent, now: datetime) -> None:
        """What one applied event starts besides its points: SLAs, and notes on old hand-raises."""
        s = self.state
        th = self.model.thresholds
        for sla in self.model.sla:
            # (v13: a closed lead's event from before it closed had its deadline, cancelled then)
            if sla.on_event == event.type and (s.stage not in CLOSED_STAGES or self.meets_late_slas):
                self._open_sla(sla.name, event.occurred_at, sla.due, "contact", None, sla.escalate_to,
                               f"event {event.event_id}", by_event=True)
        if event.type in th.fast_track and event.occurred_at < now - th.max_age.fast_track:
            self._audit(AuditKind.NOT_HANDED_OVER, SYSTEM,
                        f"{event.type} {event.event_id} of {_day(event.occurred_at)} is older than"
                        f" {format_duration(th.max_age.fast_track)} when it arrived: scored, not fast-tracked",
                        event_id=event.event_id, occurred_at=event.occurred_at, reason="backfill")

    # ------------------------------------------------------------------ SLAs

    def _open_sla(self, name: str, start: datetime, due: timedelta, met_by, stage: Stage | None,
                  escalate_to: str, cause: str, by_event: bool = False) -> None:
        s = self.state
        due_at, cause_text = start + due, cause
        cancelled_at = None
        if by_event and self.meets_late_slas:
            if any(x.name == name and x.covers(start) for x in s.ended_slas):
                return  # in time order this event came while a deadline of its kind ran: it started none
            if self._stage_at(start) in CLOSED_STAGES:
                return  # ... or while the lead was closed
            cancelled_at = self._cancelled_after(start)
        if by_event and (contact := self._contact_between(start, min(due_at, cancelled_at or due_at))) is not None:
            # Logged before the event arrived, and after it occurred: in time order this
            # contact met the deadline.
            self._ended_before_arrival(name, start, due, cause, AuditKind.SLA_MET, contact.at, contact.by,
                                       f"the contact of {contact.at.isoformat()}")
            return
        if cancelled_at is not None and due_at > cancelled_at:
            # The lead was recycled or closed after the event and before this deadline: in time
            # order that stage change cancelled it.
            self._ended_before_arrival(name, start, due, cause, AuditKind.SLA_CANCELLED, cancelled_at, SYSTEM,
                                       f"the stage change of {cancelled_at.isoformat()}")
            return
        running = next((x for x in s.slas if x.name == name), None)
        if running is not None:
            # Only an event that occurred before the one that set this deadline, and arrived
            # after it, moves it: it counts from the earlier one, as it would in time order
            # (where, had the earlier one's deadline passed on arrival, the later one's stood).
            if not self._started_earlier(running, start, met_by, cause) or due_at <= self._now:
                return
            s.slas = [x for x in s.slas if x.name != name]
            cause_text = f"{cause}, which occurred before {running.cause} and arrived after it"
        if due_at <= self._now:
            # The deadline passed before its cause was even received: nobody could have met it.
            self._audit(AuditKind.SLA_LATE_DATA, SYSTEM,
                        f"SLA {name} not set: it was due {due_at.isoformat()} ({format_duration(due)} after {cause}),"
                        f" before {cause} arrived (late data); not escalated", rule=name, occurred_at=start)
            return
        sla = OpenSla(name=name, started_at=start, due_at=due_at, met_by=met_by, stage=stage,
                      escalate_to=escalate_to, cause=cause)
        s.slas.append(sla)
        self._audit(AuditKind.SLA_SET, SYSTEM,
                    f"SLA {name} due {sla.due_at.isoformat()} ({format_duration(due)} after {cause_text})", rule=name,
                    occurred_at=start)

    def _ended_before_arrival(self, name: str, start: datetime, due: timedelta, cause: str, kind: AuditKind,
                              ended_at: datetime, by: Actor, what: str) -> None:
        """An event-started deadline that a contact met (SLA_MET), or a stage change cancelled
        (SLA_CANCELLED), before the event arrived: set and ended, as in time order; nothing runs
        or escalates. If `what` ended a deadline of a later event of this kind, that is this
        deadline: in time order this event started it, and the later one came while it ran
        (one of a kind runs at a time, and a contact or a stage change ends what runs)."""
        met = kind == AuditKind.SLA_MET
        reason, outcome = (MET_BEFORE_ARRIVAL, "met") if met else (CANCELLED_BEFORE_ARRIVAL, "cancelled")
        due_at = start + due
        self._audit(AuditKind.SLA_SET, SYSTEM,
                    f"SLA {name} due {due_at.isoformat()} ({format_duration(due)} after {cause}), {outcome} by {what}"
                    f" before {cause} arrived", rule=name, occurred_at=start, reason=reason)
        self._audit(kind, by, f"SLA {name} {outcome} after {humanize(ended_at - start)} (due {due_at.isoformat()}):"
                              f" by {what}, before {cause} arrived", rule=name, occurred_at=ended_at, reason=reason)
        s = self.state
        same = next((x for x in s.ended_slas
                     if x.name == name and x.ended_at == ended_at and (x.met if met else x.cancelled)), None)
        if same is None:
            self._remember_ended(EndedSla(name=name, started_at=start, ended_at=ended_at, met=met, cancelled=not met))
        else:  # (it does not cover `start`: it started later)
            s.ended_slas = [x.model_copy(update={"started_at": start}) if x is same else x for x in s.ended_slas]

    def _remember_ended(self, ended: EndedSla) -> None:
        self.state.ended_slas = [*self.state.ended_slas[-(ENDED_SLAS_KEPT - 1):], ended]

    def _stage_at(self, at: datetime) -> Stage:
        """The lead's stage at `at`, by its stage history (its first stage before that). At the
        same moment a stage change comes before an event or a contact."""
        visits = self.state.history
        return next((v.stage for v in reversed(visits) if v.entered_at <= at), visits[0].stage if visits else Stage.IQL)

    def _cancelled_after(self, at: datetime) -> datetime | None:
        """When the lead first entered a stage that cancels contact deadlines (recycled, or a
        closed one) after `at`: see _on_exit."""
        return next((v.entered_at for v in self.state.history
                     if v.entered_at > at and (v.stage in CLOSED_STAGES or v.stage == Stage.RECYCLED)), None)

    def _contact_between(self, start: datetime, due_at: datetime) -> LoggedContact | None:
        """The first contact logged at or after `start` and before `due_at` (version 13 on)."""
        if not self.meets_late_slas:
            return None
        return next((c for c in self.state.contacts if start <= c.at < due_at), None)

    def _started_earlier(self, running: OpenSla, start: datetime, met_by: str, cause: str) -> bool:
        """Whether an event-started deadline's new cause comes before the running one's in
        time order (ties by event id: both causes read "event <id>")."""
        return (self.orders_slas and met_by == running.met_by == "contact" and cause.startswith("event ")
                and running.cause.startswith("event ") and (start, cause) < (running.started_at, running.cause))

    def _close_sla(self, sla: OpenSla, kind: AuditKind, actor: Actor, at: datetime) -> None:
        s = self.state
        s.slas = [x for x in s.slas if x.name != sla.name]
        if self.meets_late_slas and sla.cause.startswith("event "):
            self._remember_ended(EndedSla(name=sla.name, started_at=sla.started_at, ended_at=at,
                                          met=kind == AuditKind.SLA_MET, cancelled=kind == AuditKind.SLA_CANCELLED))
        taken = humanize(at - sla.started_at)
        outcome = {AuditKind.SLA_MET: "met", AuditKind.SLA_BREACHED: "breached",
                   AuditKind.SLA_CANCELLED: "cancelled"}[kind]
        self._audit(kind, actor, f"SLA {sla.name} {outcome} after {taken} (due {sla.due_at.isoformat()})",
                    rule=sla.name, occurred_at=at)
        if kind == AuditKind.SLA_BREACHED:
            s.escalations += 1
            self._outbound(OutboundKind.ESCALATION, at, sla=sla.name, escalate_to=sla.escalate_to,
                           due_at=sla.due_at.isoformat(), owner=s.owner, stage=s.stage.value)

    # ------------------------------------------------------------------ plumbing

    def _is_duplicate(self, item_id: str, kind: str, channel: str | None = None, namespace: str = "",
                      known: bool = False) -> bool:
        """Remember `item_id` (bounded); True, recorded, if it was seen (or is `known` applied
        from the store). Profile updates have their own namespace so they never collide with
        event ids."""
        key = namespace + item_id
        s = self.state
        if key in self._seen or known:
            s.duplicates_ignored += 1
            self._audit(AuditKind.DUPLICATE_IGNORED, SYSTEM, f"duplicate {kind} {item_id} ignored", event_id=item_id,
                        channel=channel)
            return True
        self._seen.add(key)
        s.seen_ids.append(key)
        if len(s.seen_ids) > self.seen_ids_max:
            dropped = s.seen_ids[: len(s.seen_ids) - self.seen_ids_max]
            s.seen_ids = s.seen_ids[len(dropped):]
            self._seen.difference_update(dropped)
        return False

    def _ignore(self, event: ActivityEvent, why: str) -> None:
        self._audit(AuditKind.EVENT_IGNORED, SYSTEM, why, event_id=event.event_id, channel=event.channel,
                    occurred_at=event.occurred_at)

    def _audit(self, kind: AuditKind, actor: Actor, detail: str, **fields) -> None:
        s = self.state
        assign(s, audit_seq=s.audit_seq + 1)
        if not self.recording:
            return
        fields.setdefault("channel", s.channel)
        fields.setdefault("owner", s.owner)
        engagement = fields.pop("score_engagement", s.score.engagement)
        if self._command_id:
            fields.setdefault("command_id", self._command_id)
        if fields.get("occurred_at") == self._now:
            fields["occurred_at"] = None
        self._effects.audit.append(
            AuditEntry(
                lead_id=s.lead_id, seq=s.audit_seq, at=self._now, kind=kind, actor=actor.name, role=actor.role,
                detail=detail, score_total=round(s.score.fit + engagement, 2), score_fit=s.score.fit,
                score_engagement=engagement, model_ref=s.model_ref, **fields,
            )
        )

    def _outbound(self, kind: OutboundKind, at: datetime, assign_to: str | None = None, **payload) -> None:
        s = self.state
        n = s.outbound_seq.get(kind.value, 0) + 1
        s.outbound_seq[kind.value] = n
        if not self.recording:
            return
        self._effects.outbound.append(
            Outbound(message_id=f"{s.lead_id}/{kind.value}/{n}", lead_id=s.lead_id, kind=kind, at=at,
                     payload={"stage": s.stage.value, **payload}, assign_to=assign_to)
        )
