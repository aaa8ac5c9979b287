"""One lead's life as a pure state machine: events, facts, commands and timers in;
audit entries and outbound messages out.

The workflow owns a `Lead`, calls these methods with workflow time, and then
takes the effects (`take_effects`) to write and deliver them. Nothing here
reads a clock or does I/O, so every rule is tested directly with plain `now`
values, and replaying a workflow replays exactly the same decisions.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, Field

from funnel import stages
from funnel.models import (
    SYSTEM,
    Accept,
    ActivityEvent,
    Actor,
    AuditEntry,
    AuditKind,
    Close,
    Command,
    FactValue,
    LeadState,
    LogContact,
    NurtureProgress,
    OpenSla,
    Outbound,
    OutboundKind,
    ProfileUpdate,
    Qualify,
    RecentEvent,
    Refused,
    Reject,
    Reopen,
    Role,
    Stage,
    StageVisit,
    Trigger,
)
from funnel.scoring_model import ScoringModel, format_duration

# Events stamped further than this in the future are clock errors, not facts.
FUTURE_TOLERANCE = timedelta(minutes=5)
# How many event/update ids a lead remembers for de-duplication. Bounded so the
# state carried through continue-as-new stays small; a redelivery older than
# the last SEEN_IDS_MAX ids would be applied again (webhook retries come within
# minutes, so in practice this does not happen).
SEEN_IDS_MAX = 2000
# Below this much engagement, decay rounds to zero (and stops waking the lead).
DECAY_FLOOR = 1.0
RECENT_MAX = 200
CONTACT_STAGES = (Stage.IQL, Stage.MQL, Stage.SAL, Stage.SQL, Stage.RECYCLED)
CONTACT_ROLES = (Role.PRESALES, Role.SALES, Role.MANAGER)
CLOSED_STAGES = (Stage.WON, Stage.LOST, Stage.DISQUALIFIED)


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
    deadlines: list[Deadline]
    next_nurture_step: dict[str, str] | None
    next_decay_at: datetime | None
    cool_off_until: datetime | None
    qualified_by: str | None
    model_ref: str
    events_applied: int
    duplicates_ignored: int
    history: list[StageVisit]


def _fmt(points: float) -> str:
    text = f"{points:+.2f}".rstrip("0").rstrip(".")
    return text.replace("-", "\u2212")


class Lead:
    def __init__(self, state: LeadState, model: ScoringModel, seen_ids_max: int = SEEN_IDS_MAX):
        self.state = state
        self.model = model
        self.seen_ids_max = seen_ids_max
        self._seen = set(state.seen_ids)
        self._effects = Effects()
        self._now = state.stage_since  # the time of the call being handled

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(cls, lead_id: str, model: ScoringModel, now: datetime, channel: str | None = None,
               **kwargs) -> "Lead":
        """A new IQL lead; `channel` is its first touch, when the first input tells it."""
        state = LeadState(lead_id=lead_id, created_at=now, stage_since=now, model_ref=model.ref, channel=channel)
        state.history.append(StageVisit(stage=Stage.IQL, entered_at=now))
        lead = cls(state, model, **kwargs)
        lead._now = now
        lead._audit(AuditKind.LEAD_CREATED, SYSTEM, f"lead created as iql, scored by {model.ref}", to_stage=Stage.IQL)
        lead._start_nurture(now)
        return lead

    def use_model(self, model: ScoringModel, now: datetime) -> None:
        """Switch to another model version; points already earned stay, new rules apply from now."""
        self._now = now
        if model.ref == self.state.model_ref:
            self.model = model
            return
        old = self.state.model_ref
        self.model = model
        self.state.model_ref = model.ref
        progress = self.state.nurture
        if progress and progress.next_step >= len(model.nurture.get(progress.track, [])):  # type: ignore[call-overload]
            self.state.nurture = None  # the new model has no such step: the track is over
        self._audit(AuditKind.MODEL_CHANGED, SYSTEM, f"scoring model {old} -> {model.ref}")
        self._refit(SYSTEM, now, cause=f"model {model.ref}")

    def take_effects(self) -> Effects:
        effects, self._effects = self._effects, Effects()
        return effects

    # ------------------------------------------------------------------ inputs

    def ingest(self, event: ActivityEvent, now: datetime) -> None:
        """Apply one activity event (once per event_id) at its occurred_at time."""
        s = self.state
        self._now = now
        # Checked before de-duplication, so a corrected resend under the same id still counts.
        rule = self.model.events.get(event.type)
        if event.lead_id != s.lead_id:
            return self._ignore(event, f"event {event.event_id} is for lead {event.lead_id}, not {s.lead_id}")
        if rule is None:
            return self._ignore(event, f"unknown event type {event.type!r} in model {self.model.ref}")
        if event.occurred_at > now + FUTURE_TOLERANCE:
            return self._ignore(event, f"event {event.event_id} occurred in the future ({event.occurred_at.isoformat()})")
        if self._is_duplicate(event.event_id, kind="event", channel=event.channel):
            return
        t = event.occurred_at
        # Timers due before the event happened fire first (a worker that was down
        # gets both at once); then the event is applied as of now.
        self.tick(min(t, now))
        self._now = now
        if s.channel is None and event.channel:
            s.channel = event.channel
        s.count_by_type[event.type] = s.count_by_type.get(event.type, 0) + 1
        s.events_applied += 1

        points, why = self._event_points(event.type, t)
        s.points_by_type[event.type] = round(s.points_by_type.get(event.type, 0.0) + points, 2)
        s.recent.append(RecentEvent(type=event.type, occurred_at=t))
        newest = max(r.occurred_at for r in s.recent)
        s.recent = [r for r in s.recent if r.occurred_at > newest - self.model.frequency.window][-RECENT_MAX:]
        if rule.activity and (s.last_activity_at is None or t > s.last_activity_at):
            s.last_activity_at = t
            s.decay_steps = 0
        self._add_points(
            "engagement",
            event.type,
            points,
            f"{_fmt(points)} {event.type} (event {event.event_id}{why})",
            actor=SYSTEM,
            event_id=event.event_id,
            channel=event.channel,
        )
        for sla in self.model.sla:
            if sla.on_event == event.type and s.stage not in CLOSED_STAGES:
                self._open_sla(sla.name, t, sla.due, "contact", None, sla.escalate_to, f"event {event.event_id}")
        if event.type in self.model.thresholds.fast_track and s.stage in (Stage.IQL, Stage.RECYCLED):
            if s.stage == Stage.IQL:
                self._move(Trigger.FAST_TRACK, SYSTEM, now, reason=event.type)
            elif not self._cooling_off(now):
                self._move(Trigger.REQUALIFY, SYSTEM, now, reason=event.type)
        self._check_threshold(now)

    def update_profile(self, update: ProfileUpdate, now: datetime) -> None:
        """Merge profile facts (later values win) and re-evaluate the fit rules."""
        self._now = now
        if self._is_duplicate(update.update_id, kind="profile update", namespace="profile:"):
            return
        self.tick(now)
        self.state.profile.update(update.facts)
        facts = ", ".join(f"{k}={v}" for k, v in sorted(update.facts.items()))
        self._audit(AuditKind.PROFILE_UPDATED, update.actor, f"profile: {facts}", event_id=update.update_id)
        self._refit(update.actor, now, cause=f"profile update {update.update_id}")
        self._check_threshold(now)

    def check(self, command: Command) -> None:
        """Raise Refused if `command` cannot be executed now; changes nothing."""
        self._plan(command)

    def execute(self, command: Command, now: datetime) -> None:
        """Carry out a presales/sales/manager command, or raise Refused.

        Timers due before the command fire first (a late accept is a breached SLA,
        not a met one); a refused command changes nothing beyond that.
        """
        self.tick(now)
        trigger, detail = self._plan(command)
        actor = command.by
        if isinstance(command, LogContact):
            self._audit(
                AuditKind.CONTACT_LOGGED,
                actor,
                f"{command.channel} contact by {actor.name}" + (f": {command.note}" if command.note else ""),
            )
            for sla in [x for x in self.state.slas if x.met_by == "contact"]:
                self._close_sla(sla, AuditKind.SLA_MET, actor, now)
            return
        if isinstance(command, Qualify):
            self.state.qualified_by = detail
        reason = getattr(command, "reason", None)
        if isinstance(command, Qualify):
            reason = detail
        self._move(trigger, actor, now, reason=reason, note=command.note)

    def assign_owner(self, owner: str, now: datetime) -> None:
        self._now = now
        if self.state.owner == owner:
            return
        self.state.owner = owner
        self._audit(AuditKind.OWNER_ASSIGNED, SYSTEM, f"owner {owner} (handover to presales)")

    # ------------------------------------------------------------------ timers

    def next_wakeup(self) -> datetime | None:
        """The earliest moment a timer is due; the workflow sleeps until then."""
        s = self.state
        times = [sla.due_at for sla in s.slas]
        if s.nurture:
            times.append(s.nurture.next_at)
        if (due := self._next_decay_at()) is not None:
            times.append(due)
        if s.cool_off_until is not None and s.stage in (Stage.LOST, Stage.RECYCLED):
            times.append(s.cool_off_until)
        return min(times) if times else None

    def tick(self, now: datetime) -> None:
        """Fire every timer due at or before `now`: decay, SLA breaches, nurture, cool-off."""
        self._now = now
        s = self.state
        # SLAs first: a recycle below would cancel a deadline that was already missed.
        for sla in sorted([x for x in s.slas if x.due_at <= now], key=lambda x: x.due_at):
            self._close_sla(sla, AuditKind.SLA_BREACHED, SYSTEM, now)
        decayed = self._decay_until(now)
        if decayed and s.stage == Stage.MQL and self.model.thresholds.on_mql_decay == "recycle":
            if s.score.total < self.model.thresholds.mql:
                self._move(Trigger.DECAY_BELOW_THRESHOLD, SYSTEM, now, reason="inactivity_decay")
        while s.nurture and s.nurture.next_at <= now:
            self._send_nurture_step(now)
        if s.cool_off_until is not None and s.cool_off_until <= now:
            if s.stage == Stage.LOST:
                self._move(Trigger.COOL_OFF_ENDED, SYSTEM, now, reason="cool_off")
            elif s.stage == Stage.RECYCLED:
                s.cool_off_until = None
                self._check_threshold(now)

    # ------------------------------------------------------------------ reading

    def view(self) -> LeadView:
        s = self.state
        nurture = None
        if s.nurture:
            step = self.model.nurture[s.nurture.track][s.nurture.next_step]
            nurture = {"track": s.nurture.track, "step": step.name, "at": s.nurture.next_at.isoformat()}
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
            deadlines=[Deadline(name=x.name, due_at=x.due_at, cause=x.cause) for x in sorted(s.slas, key=lambda x: x.due_at)],
            next_nurture_step=nurture,
            next_decay_at=self._next_decay_at(),
            cool_off_until=s.cool_off_until,
            qualified_by=s.qualified_by,
            model_ref=s.model_ref,
            events_applied=s.events_applied,
            duplicates_ignored=s.duplicates_ignored,
            history=list(s.history),
        )

    # ------------------------------------------------------------------ scoring

    def _event_points(self, event_type: str, t: datetime) -> tuple[float, str]:
        """Points for one more event of `event_type` at `t`, and why (weighting, cap)."""
        s = self.state
        rule = self.model.events[event_type]
        if rule.count_once and s.count_by_type[event_type] > 1:
            return 0.0, ": counts once"
        points, why = rule.points, ""
        if points > 0:
            freq = self.model.frequency
            earlier = sum(
                1 for r in s.recent if r.type == event_type and t - freq.window < r.occurred_at <= t
            )
            multiplier = min(1 + freq.bonus * earlier, freq.max_multiplier)
            if multiplier > 1:
                points *= multiplier
                why = f", x{multiplier:g}: {earlier + 1} in {format_duration(freq.window)}"
            if rule.cap is not None:
                room = max(0.0, rule.cap - s.points_by_type.get(event_type, 0.0))
                if points > room:
                    points = room
                    why += f", capped at {rule.cap:g}"
        return round(points, 2), why

    def _refit(self, actor: Actor, now: datetime, cause: str) -> None:
        """Recompute fit from the profile; record each rule that starts or stops matching."""
        s = self.state
        current = {k[4:]: v for k, v in s.score.breakdown.items() if k.startswith("fit:")}
        wanted = {rule.name: rule.points for rule in self.model.fit if rule.matches(s.profile)}
        for name in sorted(set(current) | set(wanted)):
            delta = round(wanted.get(name, 0.0) - current.get(name, 0.0), 2)
            if delta:
                verb = "matches" if name in wanted else "no longer matches"
                self._add_points("fit", f"fit:{name}", delta, f"{_fmt(delta)} fit rule {name} {verb} ({cause})", actor)

    def _add_points(
        self, part: str, rule: str, points: float, detail: str, actor: Actor, event_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        score = self.state.score
        if part == "fit":
            score.fit = round(score.fit + points, 2)
        else:
            score.engagement = round(score.engagement + points, 2)
        total = round(score.breakdown.get(rule, 0.0) + points, 2)
        if total:
            score.breakdown[rule] = total
        else:
            score.breakdown.pop(rule, None)
        self._audit(
            AuditKind.SCORE_CHANGED, actor, detail, rule=rule, points=points, event_id=event_id,
            channel=channel or self.state.channel,
        )

    def _next_decay_at(self) -> datetime | None:
        s = self.state
        if s.last_activity_at is None or s.score.engagement <= 0 or s.stage in CLOSED_STAGES:
            return None  # closed leads are not scored down: nothing reads their score
        decay = self.model.decay
        return s.last_activity_at + decay.after + decay.every * s.decay_steps

    def _decay_until(self, t: datetime) -> bool:
        """Apply every decay step due by `t`; True if any was."""
        decay = self.model.decay
        decayed = False
        while (due := self._next_decay_at()) is not None and due <= t:
            engagement = self.state.score.engagement
            if decay.percent is not None:
                loss = engagement * decay.percent / 100
                label = f"{decay.percent:g}%"
            else:
                loss = min(decay.points or 0.0, engagement)
                label = f"{decay.points:g} points"
            if engagement - loss < DECAY_FLOOR:
                loss = engagement
            idle = due - self.state.last_activity_at
            self.state.decay_steps += 1
            decayed = True
            self._add_points(
                "engagement", "decay", -round(loss, 2),
                f"{_fmt(-round(loss, 2))} inactivity decay ({label} after {format_duration(idle)} without activity)",
                SYSTEM,
            )
        return decayed

    def _check_threshold(self, now: datetime) -> None:
        s = self.state
        if s.score.total < self.model.thresholds.mql:
            return
        if s.stage == Stage.IQL:
            self._move(Trigger.SCORE_THRESHOLD, SYSTEM, now, reason=f"score {s.score.total:g}")
        elif s.stage == Stage.RECYCLED and not self._cooling_off(now):
            self._move(Trigger.REQUALIFY, SYSTEM, now, reason=f"score {s.score.total:g}")

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
            return self._checked(trigger, role), ""
        if isinstance(command, Close):
            trigger = Trigger.WON if command.outcome == "won" else Trigger.LOST
            if command.outcome == "lost" and not command.reason:
                raise Refused(f"cannot close lead {s.lead_id} as lost without a reason code")
            return self._checked(trigger, role), ""
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
            if criteria is None:
                raise Refused(f"cannot qualify lead {s.lead_id}: no {command.framework.upper()} criteria given")
            met = [name for name, value in criteria.model_dump().items() if value]
            need = q.bant_min if command.framework == "bant" else q.meddic_min
            of = len(type(criteria).model_fields)
            if len(met) < need:
                raise Refused(
                    f"cannot qualify lead {s.lead_id}: {command.framework.upper()} {len(met)} of {of} met"
                    f" ({', '.join(met) or 'none'}); at least {need} needed"
                )
            return trigger, f"{command.framework} {len(met)}/{of}: {', '.join(met)}"
        raise Refused(f"unknown command {command!r}")  # pragma: no cover - the union is closed

    def _checked(self, trigger: Trigger, role: Role) -> Trigger:
        stages.check(self.state.lead_id, self.state.stage, trigger, role, self.model.shortcuts)
        return trigger

    def _move(self, trigger: Trigger, actor: Actor, now: datetime, reason: str | None = None,
              note: str | None = None) -> None:
        s = self.state
        move = stages.check(s.lead_id, s.stage, trigger, actor.role, self.model.shortcuts)
        old = s.stage
        s.stage, s.stage_since = move.target, now
        s.history.append(StageVisit(stage=move.target, entered_at=now, trigger=trigger))
        detail = f"{old.value} -> {move.target.value}: {move.why}"
        if reason:
            detail += f" ({reason})"
        if note:
            detail += f"; note: {note}"
        self._audit(
            AuditKind.STAGE_CHANGED, actor, detail, from_stage=old, to_stage=move.target, trigger=trigger,
            reason=reason,
        )
        self._on_exit(old, actor, now)
        self._on_enter(move.target, trigger, now)

    def _on_exit(self, old: Stage, actor: Actor, now: datetime) -> None:
        s = self.state
        s.nurture = None
        for sla in list(s.slas):
            if sla.met_by == "stage_exit" and sla.stage == old:
                kind = AuditKind.SLA_MET if actor.role != Role.SYSTEM else AuditKind.SLA_CANCELLED
                self._close_sla(sla, kind, actor, now)
            elif s.stage in CLOSED_STAGES or s.stage == Stage.RECYCLED:
                self._close_sla(sla, AuditKind.SLA_CANCELLED, actor, now)

    def _on_enter(self, stage: Stage, trigger: Trigger, now: datetime) -> None:
        s = self.state
        for sla in self.model.sla:
            if sla.on_stage == stage:
                self._open_sla(sla.name, now, sla.due, sla.met_by, stage, sla.escalate_to, f"stage {stage.value}")
        if stage == Stage.MQL:
            s.handovers += 1
            self._outbound(OutboundKind.HANDOVER, now, score=s.score.total, trigger=trigger.value)
            if self.model.shortcuts.auto_accept:
                self._move(Trigger.AUTO_ACCEPT, SYSTEM, now)
        elif stage == Stage.SQL:
            self._outbound(OutboundKind.OPPORTUNITY, now, owner=s.owner, qualified_by=s.qualified_by,
                           score=s.score.total)
        elif stage == Stage.LOST:
            s.cool_off_until = now + self.model.cool_off.lost
        elif stage == Stage.RECYCLED:
            s.owner = None
            # A lead back from a lost deal has served its cool-off already.
            s.cool_off_until = None if trigger == Trigger.COOL_OFF_ENDED else now + self.model.cool_off.recycled
            if self.model.cool_off.reset_engagement_on_recycle:
                # Back to nurturing with a clean slate of interest, but negative
                # criteria (an unsubscribe, a bounce) are not forgiven.
                kept = {t: p for t, p in s.points_by_type.items() if p < 0}
                delta = round(sum(kept.values()) - s.score.engagement, 2)
                if delta:
                    self._add_points("engagement", "recycle_reset", delta,
                                     f"{_fmt(delta)} engagement reset on recycle" + (" (negative points kept)" if kept else ""),
                                     SYSTEM)
                s.points_by_type = kept
                s.count_by_type = {t: n for t, n in s.count_by_type.items() if t in kept}
                s.recent.clear()
        if stage in (Stage.IQL, Stage.RECYCLED):
            self._start_nurture(now)

    def _start_nurture(self, now: datetime) -> None:
        steps = self.model.nurture.get(self.state.stage.value)  # type: ignore[call-overload]
        self.state.nurture = (
            NurtureProgress(track=self.state.stage.value, next_step=0, next_at=now + steps[0].after) if steps else None
        )

    def _send_nurture_step(self, now: datetime) -> None:
        s = self.state
        progress = s.nurture
        assert progress is not None
        steps = self.model.nurture[progress.track]  # type: ignore[index]
        step = steps[progress.next_step]
        self._audit(AuditKind.NURTURE_STEP_SENT, SYSTEM, f"nurture {progress.track} step {step.name}")
        self._outbound(OutboundKind.NURTURE_STEP, now, track=progress.track, step=step.name,
                       due_at=progress.next_at.isoformat())
        nxt = progress.next_step + 1
        s.nurture = (
            NurtureProgress(track=progress.track, next_step=nxt, next_at=progress.next_at + steps[nxt].after)
            if nxt < len(steps) else None
        )

    # ------------------------------------------------------------------ SLAs

    def _open_sla(self, name: str, start: datetime, due: timedelta, met_by, stage: Stage | None,
                  escalate_to: str, cause: str) -> None:
        s = self.state
        if any(x.name == name for x in s.slas):
            return
        sla = OpenSla(name=name, started_at=start, due_at=start + due, met_by=met_by, stage=stage,
                      escalate_to=escalate_to, cause=cause)
        s.slas.append(sla)
        self._audit(AuditKind.SLA_SET, SYSTEM,
                    f"SLA {name} due {sla.due_at.isoformat()} ({format_duration(due)} after {cause})", rule=name)

    def _close_sla(self, sla: OpenSla, kind: AuditKind, actor: Actor, now: datetime) -> None:
        s = self.state
        s.slas = [x for x in s.slas if x.name != sla.name]
        taken = format_duration(now - sla.started_at) if now > sla.started_at else "0s"
        outcome = {AuditKind.SLA_MET: "met", AuditKind.SLA_BREACHED: "breached",
                   AuditKind.SLA_CANCELLED: "cancelled"}[kind]
        self._audit(kind, actor, f"SLA {sla.name} {outcome} after {taken} (due {sla.due_at.isoformat()})",
                    rule=sla.name)
        if kind == AuditKind.SLA_BREACHED:
            s.escalations += 1
            self._outbound(OutboundKind.ESCALATION, now, sla=sla.name, escalate_to=sla.escalate_to,
                           due_at=sla.due_at.isoformat(), owner=s.owner, stage=s.stage.value)

    # ------------------------------------------------------------------ plumbing

    def _is_duplicate(self, item_id: str, kind: str, channel: str | None = None, namespace: str = "") -> bool:
        """Remember `item_id` (bounded); True, recorded, if it was seen. Profile updates
        have their own namespace so they never collide with event ids."""
        key = namespace + item_id
        s = self.state
        if key in self._seen:
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
        self._audit(AuditKind.EVENT_IGNORED, SYSTEM, why, event_id=event.event_id, channel=event.channel)

    def _audit(self, kind: AuditKind, actor: Actor, detail: str, **fields) -> None:
        s = self.state
        s.audit_seq += 1
        fields.setdefault("channel", s.channel)
        self._effects.audit.append(
            AuditEntry(
                lead_id=s.lead_id, seq=s.audit_seq, at=self._now, kind=kind, actor=actor.name, role=actor.role,
                detail=detail, score_total=s.score.total, score_fit=s.score.fit,
                score_engagement=s.score.engagement, model_ref=s.model_ref, **fields,
            )
        )

    def _outbound(self, kind: OutboundKind, now: datetime, **payload) -> None:
        s = self.state
        self._effects.outbound.append(
            Outbound(message_id=f"{s.lead_id}/{kind.value}/{s.audit_seq}", lead_id=s.lead_id, kind=kind, at=now,
                     payload={"stage": s.stage.value, **payload})
        )
