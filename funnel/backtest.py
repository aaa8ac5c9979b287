"""Backtest: replay logged leads through this same core under a candidate scoring model and
the current one, and compare what each would have done.

Each lead's inputs are what it took, at the time it took them: its events and profile
updates (the event log), the owners it was given, and the recorded presales, sales and
manager decisions, applied again where they still apply (a decision the lead refuses under
the candidate, e.g. an accept of a lead that never became MQL, is skipped and counted).
Timers fire as the lead would fire them. Pure: rows in, a report out; `until` is an argument.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from statistics import median
from typing import Iterable, Sequence

from pydantic import BaseModel

from funnel.lead import Lead
from funnel.models import (
    Accept, ActivityEvent, Actor, AuditKind, Bant, Close, Command, LogContact, ProfileUpdate, Qualify, Refused,
    Reject, Reopen, ReportEntry, Role, Stage, Trigger, built,
)
from funnel.scoring_model import ScoringModel

DAY = 86400.0
# Kinds of audit entries a backtest reads: creations, owners and the decisions of people.
DECISION_KINDS = (AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED, AuditKind.CONTACT_LOGGED,
                  AuditKind.OWNER_ASSIGNED)
_ORDER = {"facts": 0, "event": 1, "owner": 2, "command": 3}  # inputs of one instant, as the lead takes them


@dataclass(frozen=True)
class Input:
    """One recorded input, at the time the lead took it."""

    at: datetime
    order: tuple[int, int]  # ties at one instant: kind, then as recorded
    event: ActivityEvent | None = None
    update: ProfileUpdate | None = None
    command: Command | None = None
    owner: str | None = None


@dataclass
class LeadLog:
    lead_id: str
    created_at: datetime
    channel: str | None
    inputs: list[Input] = field(default_factory=list)
    outcome: Stage | None = None  # recorded: won, lost or disqualified (the last of these), else None


def command_of(entry: ReportEntry) -> Command | None:
    """The decision behind a recorded entry, or None for what the lead did itself."""
    if entry.role in (Role.SYSTEM,) or entry.actor == "leadflow":
        return None
    by = Actor(name=entry.actor, role=entry.role)
    if entry.kind == AuditKind.CONTACT_LOGGED:
        return LogContact(by=by)
    trigger = entry.trigger
    if trigger == Trigger.ACCEPT:
        return Accept(by=by)
    if trigger in (Trigger.REJECT_DISQUALIFY, Trigger.REJECT_RECYCLE):
        return Reject(by=by, reason=entry.reason or "not_stated", recycle=trigger == Trigger.REJECT_RECYCLE)
    if trigger == Trigger.QUALIFY:  # it passed then; the criteria themselves are not in the audit
        return Qualify(by=by, bant=Bant(budget=True, authority=True, need=True, timing=True))
    if trigger in (Trigger.WON, Trigger.LOST):
        return Close(by=by, outcome=trigger.value, reason=entry.reason)  # type: ignore[arg-type]
    if trigger == Trigger.REOPEN:
        return Reopen(by=by, reason=entry.reason or "not_stated")
    return None


def lead_logs(entries: Iterable[ReportEntry], logged: Iterable) -> list[LeadLog]:
    """Each lead's log from its audit entries (DECISION_KINDS, per lead in seq order) and its
    logged events and profile updates (`AuditStore.replay_log` rows: named tuples, events
    with an `event_id` field, profile updates with `update_id`)."""
    logs: dict[str, LeadLog] = {}
    for entry in entries:
        log = logs.get(entry.lead_id)
        if entry.kind == AuditKind.LEAD_CREATED:
            if log is None:
                logs[entry.lead_id] = log = LeadLog(entry.lead_id, entry.at, entry.channel)
            continue
        if log is None:
            continue
        if entry.kind == AuditKind.OWNER_ASSIGNED and entry.owner:
            log.inputs.append(Input(entry.at, (_ORDER["owner"], entry.seq), owner=entry.owner))
        elif (command := command_of(entry)) is not None:
            log.inputs.append(Input(entry.at, (_ORDER["command"], entry.seq), command=command))
        if entry.kind == AuditKind.STAGE_CHANGED and entry.to_stage in (Stage.WON, Stage.LOST, Stage.DISQUALIFIED):
            log.outcome = entry.to_stage
        elif entry.kind == AuditKind.STAGE_CHANGED and entry.to_stage is not None:
            log.outcome = None if entry.to_stage != Stage.RECYCLED else log.outcome
    for n, row in enumerate(logged):
        log = logs.get(row.lead_id)
        if log is None:
            continue
        if hasattr(row, "event_id"):
            event = built(ActivityEvent, {
                "event_id": row.event_id, "lead_id": row.lead_id, "type": row.type, "occurred_at": row.occurred_at,
                "channel": row.channel, "campaign": row.campaign, "attributes": dict(row.attributes or {}),
                "source": row.source})
            log.inputs.append(Input(row.received_at, (_ORDER["event"], n), event=event))
        else:
            actor = built(Actor, {"name": row.actor, "role": Role(row.role)})
            update = built(ProfileUpdate, {"update_id": row.update_id, "lead_id": row.lead_id, "facts": dict(row.facts),
                                           "actor": actor, "observed_at": row.observed_at})
            log.inputs.append(Input(row.received_at, (_ORDER["facts"], n), update=update))
    return list(logs.values())


@dataclass
class Replay:
    lead_id: str
    channel: str | None
    path: list[tuple[Stage, datetime, Trigger | None]]
    first_mql_at: datetime | None
    first_touch_at: datetime | None
    peak_score: float  # the highest score it reached, after any of its inputs
    fast_tracked: bool
    final_stage: Stage
    refused: int  # recorded decisions that no longer applied
    outcome: Stage | None


def replay(log: LeadLog, model: ScoringModel, until: datetime, decision_delay: timedelta = timedelta(0)) -> Replay:
    """The lead again, under `model`: its recorded inputs at their times, timers up to `until`."""
    lead, peak, refused, first_touch = play(log, model, until, decision_delay)
    path = [(v.stage, v.entered_at, v.trigger) for v in lead.state.history]
    mql = next(((at, trigger) for stage, at, trigger in path if stage == Stage.MQL), None)
    return Replay(log.lead_id, log.channel, path, mql[0] if mql else None, first_touch, peak,
                  mql is not None and mql[1] == Trigger.FAST_TRACK, lead.state.stage, refused, log.outcome)


def play(log: LeadLog, model: ScoringModel, until: datetime, decision_delay: timedelta = timedelta(0),
         record_effects: bool = False) -> tuple[Lead, float, int, datetime | None]:
    """The lead after its recorded inputs and timers, with its peak score, the decisions it
    refused and its first touch. A replay reads only the state, so by default the lead
    writes no audit entries or messages (the state is the same: tests/test_backtest.py)."""
    lead = Lead.create(log.lead_id, model, log.created_at, channel=log.channel, decision_delay=decision_delay,
                       record_effects=record_effects)
    peak, refused = 0.0, 0
    first_touch = None
    for item in sorted(log.inputs, key=lambda i: (i.at, i.order)):
        if item.at > until:
            break
        if item.event is not None:
            lead.ingest(item.event, item.at)
            first_touch = min(first_touch or item.event.occurred_at, item.event.occurred_at)
        elif item.update is not None:
            lead.update_profile(item.update, item.at)
        elif item.owner is not None:  # given after whatever made the lead due one
            lead.tick(item.at)
            lead.assign_owner(item.owner, item.at)
        elif item.command is not None:
            try:
                lead.execute(item.command, item.at)
            except Refused:
                refused += 1
        peak = max(peak, lead.state.score.total)
    lead.tick(until)
    return lead, peak, refused, first_touch


_MODELS: dict[str, ScoringModel] = {}  # in each worker process: the models, sent once
_LOGS: list[LeadLog] = []  # in each worker process: the logs, when it is forked with them


def _take_models(models: dict[str, ScoringModel]) -> None:
    _MODELS.update(models)


def _replay_chunk(chunk: list[LeadLog], until: datetime, delay: timedelta) -> dict[str, list[Replay]]:
    return {name: [replay(log, model, until, delay) for log in chunk] for name, model in _MODELS.items()}


def _replay_slice(start: int, stop: int, until: datetime, delay: timedelta) -> dict[str, list[Replay]]:
    return _replay_chunk(_LOGS[start:stop], until, delay)


def replay_all(logs: list[LeadLog], models: dict[str, ScoringModel], until: datetime,
               decision_delay: timedelta = timedelta(0), workers: int = 1) -> dict[str, list[Replay]]:
    """Every lead under every model, in `workers` processes (the core is CPU-bound Python).
    Forked workers find the logs in their copy of this module, so only slice bounds go to
    them (pickling the logs cost the parent as much as a tenth of the replay)."""
    if workers <= 1 or len(logs) < 200:
        _take_models(models)
        try:
            return _replay_chunk(logs, until, decision_delay)
        finally:
            _MODELS.clear()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    size = max(100, len(logs) // (workers * 8))
    bounds = [(i, min(i + size, len(logs))) for i in range(0, len(logs), size)]
    found: dict[str, list[Replay]] = {name: [] for name in models}
    context = multiprocessing.get_context()
    forked = context.get_start_method() == "fork"
    if forked:
        _LOGS[:] = logs
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_take_models, initargs=(models,)) as pool:
            if forked:
                parts = pool.map(_replay_slice, *zip(*bounds), [until] * len(bounds), [decision_delay] * len(bounds))
            else:
                parts = pool.map(_replay_chunk, [logs[a:b] for a, b in bounds], [until] * len(bounds),
                                 [decision_delay] * len(bounds))
            for part in parts:
                for name, runs in part.items():
                    found[name] += runs
    finally:
        _LOGS.clear()
    return found


# --------------------------------------------------------------------------- the comparison


class ModelFigures(BaseModel):
    model: str
    mqls: int
    mqls_per_week: dict[str, int]  # ISO week of the first MQL -> leads
    median_days_first_touch_to_mql: float | None
    won_caught: int  # of the recorded-won leads, how many this model makes MQL
    mqls_later_lost: int  # of its MQLs, later disqualified or lost (recorded)
    precision: float | None  # of its MQLs with a recorded outcome, the share won
    precision_by_channel: dict[str, float | None]
    decisions_refused: int


class ChangedLead(BaseModel):
    lead_id: str
    channel: str | None
    current: Stage
    candidate: Stage
    current_mql_at: datetime | None
    candidate_mql_at: datetime | None


class SweepPoint(BaseModel):
    threshold: float
    mqls: int
    won_caught_share: float | None


class VolumePoint(BaseModel):
    """Of the leads with a recorded outcome (won, lost, disqualified: those presales and
    sales decided on), each model's best `volume` by its own ranking (fast-tracked first,
    then the highest score reached): how many were won. Ranking the same decided leads is
    fair to both models: outcomes exist only for leads today's model handed over, so over
    all leads today's model would catch every won lead by construction."""

    volume: int
    current_won: int
    candidate_won: int


def won_in_top(runs: Sequence[Replay], volume: int) -> int:
    ranked = sorted(runs, key=lambda r: (r.fast_tracked, r.peak_score), reverse=True)
    return sum(r.outcome == Stage.WON for r in ranked[:volume])


class BacktestReport(BaseModel):
    leads: int
    won: int  # recorded
    current: ModelFigures
    candidate: ModelFigures
    won_earlier_days_median: float | None  # current MQL time - candidate's, over won leads both make MQL
    won_earlier: int
    won_later: int
    changed: list[ChangedLead]
    sweep: list[SweepPoint]  # the candidate's threshold varied; see sweep()
    same_volume: list[VolumePoint]  # a quarter, half and three quarters of the decided leads


def _week(at: datetime) -> str:
    year, week, _ = at.isocalendar()
    return f"{year}-W{week:02d}"


def _figures(name: str, runs: Sequence[Replay]) -> ModelFigures:
    mql = [r for r in runs if r.first_mql_at is not None]
    decided = [r for r in mql if r.outcome is not None]
    by_channel: dict[str, list[Replay]] = defaultdict(list)
    for r in decided:
        by_channel[r.channel or "unknown"].append(r)

    def share(items: list[Replay]) -> float | None:
        return round(sum(r.outcome == Stage.WON for r in items) / len(items), 4) if items else None

    lags = [(r.first_mql_at - r.first_touch_at).total_seconds() / DAY for r in mql if r.first_touch_at]
    return ModelFigures(
        model=name, mqls=len(mql), mqls_per_week=dict(sorted(Counter(_week(r.first_mql_at) for r in mql).items())),
        median_days_first_touch_to_mql=round(median(lags), 2) if lags else None,
        won_caught=sum(r.outcome == Stage.WON for r in mql),
        mqls_later_lost=sum(r.outcome in (Stage.LOST, Stage.DISQUALIFIED) for r in mql),
        precision=share(decided), precision_by_channel={ch: share(items) for ch, items in sorted(by_channel.items())},
        decisions_refused=sum(r.refused for r in runs),
    )


def sweep(runs: Sequence[Replay], threshold: float, steps: int = 11) -> list[SweepPoint]:
    """MQL volume against the share of won leads caught, for thresholds from half to one
    and a half times `threshold`: a lead counts as MQL at T if it was fast-tracked or its
    score ever reached T (an estimate from one replay: the scores do not depend on the
    threshold, but what follows a handover, decisions and recycling, is not replayed per
    threshold)."""
    won = [r for r in runs if r.outcome == Stage.WON]
    points = []
    for i in range(steps):
        t = round(threshold * (0.5 + i / (steps - 1)), 2)
        made = [r for r in runs if r.fast_tracked or r.peak_score >= t]
        caught = sum(1 for r in won if r.fast_tracked or r.peak_score >= t)
        points.append(SweepPoint(threshold=t, mqls=len(made), won_caught_share=round(caught / len(won), 4) if won else None))
    return points


def compare(current: Sequence[Replay], candidate: Sequence[Replay], current_ref: str, candidate_ref: str,
            candidate_threshold: float) -> BacktestReport:
    by_id = {r.lead_id: r for r in current}
    pairs = [(by_id[r.lead_id], r) for r in candidate if r.lead_id in by_id]
    won_both = [(a, b) for a, b in pairs if a.outcome == Stage.WON and a.first_mql_at and b.first_mql_at]
    shift = [(a.first_mql_at - b.first_mql_at).total_seconds() / DAY for a, b in won_both]  # type: ignore[operator]
    changed = [ChangedLead(lead_id=a.lead_id, channel=a.channel, current=a.final_stage, candidate=b.final_stage,
                           current_mql_at=a.first_mql_at, candidate_mql_at=b.first_mql_at)
               for a, b in pairs if a.final_stage != b.final_stage or (a.first_mql_at is None) != (b.first_mql_at is None)]
    decided_current = [a for a, _ in pairs if a.outcome is not None]
    decided_candidate = [b for _, b in pairs if b.outcome is not None]
    return BacktestReport(
        leads=len(pairs), won=sum(a.outcome == Stage.WON for a, _ in pairs),
        current=_figures(current_ref, current), candidate=_figures(candidate_ref, candidate),
        won_earlier_days_median=round(median(shift), 2) if shift else None,
        won_earlier=sum(d > 0 for d in shift), won_later=sum(d < 0 for d in shift),
        changed=sorted(changed, key=lambda c: c.lead_id), sweep=sweep(candidate, candidate_threshold),
        same_volume=[VolumePoint(volume=v, current_won=won_in_top(decided_current, v),
                                 candidate_won=won_in_top(decided_candidate, v))
                     for v in sorted({round(f * len(decided_current)) for f in (0.25, 0.5, 0.75)}) if v > 0],
    )
