"""The KPIs a revenue-ops analyst reads besides conversion per stage: how many leads become
an opportunity and how fast (per channel, campaign and cohort), what presales decides on
the MQLs it gets and why, and whether the SLAs are kept (per SLA and per owner).

Pure, like funnel/report.py: audit entries per lead (creations, stage changes, owners,
contacts and SLA entries, as `AuditStore.report_entries` returns them), each lead's first
touch from the event log, and `now`.

Definitions (stated in the README):
- an *opportunity* is a lead that reached SQL; its days are counted from the lead's
  creation. "Within N days" is counted over *matured* leads only (created at least N days
  ago): a lead of last week has not failed an 84-day window yet;
- a *presales decision* is per handover (each visit of MQL): accepted (accept, auto-accept
  or a shortcut straight on to SQL), rejected (disqualified or recycled by presales, with
  the reason code), expired (left MQL without a decision: decay, negative criteria) or
  pending (still MQL). Shares are over decided handovers;
- an SLA is *met in time* when it was met before it breached; shares are over SLAs that
  ended met or breached (cancelled ones, e.g. the lead was recycled, do not count). An
  *open breach* is a breached SLA of a lead nobody has contacted or moved since.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from statistics import median
from typing import Iterable, Literal, Sequence

from pydantic import BaseModel, Field

from funnel.models import CANCELLED_BEFORE_ARRIVAL, MET_BEFORE_ARRIVAL, AuditEntry, AuditKind, ReportEntry, Role, Stage, Trigger

DAY = 86400.0

# The sources' benchmark figures (../shared/domain.md), shown next to ours.
BENCHMARKS = {
    "lead_to_opportunity": {"rate": 0.13, "days": 84, "source": "Salesforce study, cited in the sources"},
    "opportunity_to_won": {"rate": 0.06, "days": 18, "source": "Salesforce study, cited in the sources"},
    "presales_rejection": {"rate": 0.90, "source": "up to 90% of unfiltered inbound leads rejected (sources)"},
}


class ReportWindows(BaseModel):
    """Configurable windows of the "within N days" figures; defaults from the sources."""

    lead_to_opportunity_days: int = Field(default=84, ge=1, le=3650)
    opportunity_to_won_days: int = Field(default=18, ge=1, le=3650)
    cohort: Literal["month", "week"] = "month"


class LeadTouch(BaseModel):
    """Where a lead came from, as the store's event log knows it (whatever arrived first)."""

    channel: str | None = None  # first touch: the channel of its earliest event
    campaign: str | None = None  # first touch: the campaign of its earliest event with one
    last_campaign_before_mql: str | None = None  # the latest campaign touch up to its first MQL


class OpportunityStats(BaseModel):
    group: str  # "all", a channel, a campaign or a cohort ("2026-03", "2026-W09")
    leads: int
    opportunities: int  # leads that reached SQL, ever
    opportunity_rate: float | None
    matured_leads: int  # created at least `lead_to_opportunity_days` ago
    opportunities_within: int  # of those, opportunities within the window
    opportunity_rate_within: float | None
    median_days_to_opportunity: float | None  # over opportunities, from the lead's creation
    won: int
    closed: int  # opportunities won or lost
    win_rate: float | None  # won over closed
    matured_opportunities: int  # opportunities at least `opportunity_to_won_days` old
    won_within: int
    won_rate_within: float | None
    median_days_to_won: float | None  # over won, from the opportunity
    maturity_days: float | None = None  # cohorts: days from the cohort's end to now (0: still filling)


class OpportunityReport(BaseModel):
    windows: ReportWindows
    overall: OpportunityStats
    by_channel: list[OpportunityStats]
    by_campaign_first_touch: list[OpportunityStats]
    by_campaign_last_touch: list[OpportunityStats]  # leads that reached MQL, by their last campaign before it
    by_cohort: list[OpportunityStats]


class DecisionStats(BaseModel):
    group: str  # "all", a channel or an owner
    handed_over: int  # MQL visits
    accepted: int
    rejected: int  # disqualified + recycled by presales
    disqualified: int
    recycled: int
    expired: int  # left MQL without a presales decision
    pending: int  # still MQL now
    acceptance_rate: float | None  # over decided (accepted + rejected)
    rejection_rate: float | None
    reasons: dict[str, int]  # rejection reason codes


class DecisionReport(BaseModel):
    overall: DecisionStats
    by_channel: list[DecisionStats]
    by_owner: list[DecisionStats]


class SlaStats(BaseModel):
    group: str  # "all", an SLA's name or an owner
    set: int
    met: int
    breached: int
    cancelled: int
    late_data: int  # due before their cause was received: never set
    open: int  # running now
    open_breaches: int  # breached, and nobody has contacted or moved the lead since
    met_in_time_rate: float | None  # met over met + breached
    median_hours_to_met: float | None
    median_hours_to_first_contact: float | None  # from the handover (MQL) to the first contact logged


class SlaReport(BaseModel):
    overall: SlaStats
    by_sla: list[SlaStats]
    by_owner: list[SlaStats]


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _median(values: list[float], unit: float) -> float | None:
    return round(median(values) / unit, 3) if values else None


def _days(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() / DAY


@dataclass
class LeadFacts:
    """One lead's milestones, read once from its entries."""

    lead_id: str
    created_at: datetime
    channel: str
    campaign: str | None
    last_campaign: str | None
    reached_mql: bool = False
    opportunity_at: datetime | None = None
    won_at: datetime | None = None
    closed_at: datetime | None = None


def lead_facts(lead_id: str, entries: Sequence[AuditEntry | ReportEntry], channel: str,
               touch: LeadTouch | None) -> LeadFacts:
    created = [e.happened_at for e in entries if e.kind == AuditKind.LEAD_CREATED]
    facts = LeadFacts(lead_id=lead_id, created_at=min(created) if created else min(e.happened_at for e in entries),
                      channel=channel, campaign=touch.campaign if touch else None,
                      last_campaign=touch.last_campaign_before_mql if touch else None)
    for e in entries:
        if e.kind != AuditKind.STAGE_CHANGED:
            continue
        at = e.happened_at
        if e.to_stage == Stage.MQL:
            facts.reached_mql = True
        if e.to_stage in (Stage.SQL, Stage.WON) and facts.opportunity_at is None:
            facts.opportunity_at = at
        if e.to_stage == Stage.WON and facts.won_at is None:
            facts.won_at = at
        if e.to_stage in (Stage.WON, Stage.LOST) and facts.closed_at is None:
            facts.closed_at = at
    return facts


def _opportunity_stats(group: str, leads: Iterable[LeadFacts], now: datetime, windows: ReportWindows,
                       maturity_days: float | None = None) -> OpportunityStats:
    leads = list(leads)
    to_opp = windows.lead_to_opportunity_days
    to_won = windows.opportunity_to_won_days
    opps = [f for f in leads if f.opportunity_at is not None]
    matured = [f for f in leads if _days(f.created_at, now) >= to_opp]
    within = [f for f in matured if f.opportunity_at is not None and _days(f.created_at, f.opportunity_at) <= to_opp]
    won = [f for f in opps if f.won_at is not None]
    closed = [f for f in opps if f.closed_at is not None]
    matured_opps = [f for f in opps if _days(f.opportunity_at, now) >= to_won]  # type: ignore[arg-type]
    won_within = [f for f in matured_opps if f.won_at is not None
                  and _days(f.opportunity_at, f.won_at) <= to_won]  # type: ignore[arg-type]
    return OpportunityStats(
        group=group, leads=len(leads), opportunities=len(opps), opportunity_rate=_rate(len(opps), len(leads)),
        matured_leads=len(matured), opportunities_within=len(within),
        opportunity_rate_within=_rate(len(within), len(matured)),
        median_days_to_opportunity=_median([_days(f.created_at, f.opportunity_at)  # type: ignore[arg-type]
                                            for f in opps], 1.0),
        won=len(won), closed=len(closed), win_rate=_rate(len(won), len(closed)),
        matured_opportunities=len(matured_opps), won_within=len(won_within),
        won_rate_within=_rate(len(won_within), len(matured_opps)),
        median_days_to_won=_median([_days(f.opportunity_at, f.won_at) for f in won], 1.0),  # type: ignore[arg-type]
        maturity_days=maturity_days,
    )


def cohort_of(at: datetime, cohort: str) -> tuple[str, datetime, datetime]:
    """The cohort a lead created at `at` belongs to: its label, first and last instant."""
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if cohort == "week":
        start = day - timedelta(days=day.weekday())
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}", start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return f"{start:%Y-%m}", start, end


def opportunity_report(facts: list[LeadFacts], now: datetime, windows: ReportWindows) -> OpportunityReport:
    def grouped(key) -> list[OpportunityStats]:
        groups: dict[str, list[LeadFacts]] = defaultdict(list)
        for f in facts:
            name = key(f)
            if name is not None:
                groups[name].append(f)
        return [_opportunity_stats(name, groups[name], now, windows) for name in sorted(groups)]

    cohorts: dict[str, list[LeadFacts]] = defaultdict(list)
    ends: dict[str, datetime] = {}
    for f in facts:
        label, _, end = cohort_of(f.created_at, windows.cohort)
        cohorts[label].append(f)
        ends[label] = end
    return OpportunityReport(
        windows=windows,
        overall=_opportunity_stats("all", facts, now, windows),
        by_channel=grouped(lambda f: f.channel),
        by_campaign_first_touch=grouped(lambda f: f.campaign or "none"),
        by_campaign_last_touch=grouped(lambda f: (f.last_campaign or "none") if f.reached_mql else None),
        by_cohort=[_opportunity_stats(label, cohorts[label], now, windows,
                                      maturity_days=round(max(_days(ends[label], now), 0.0), 1))
                   for label in sorted(cohorts)],
    )


# ------------------------------------------------------------------ presales decisions

ACCEPTING = {Trigger.ACCEPT, Trigger.AUTO_ACCEPT, Trigger.QUALIFY}
REJECTING = {Trigger.REJECT_DISQUALIFY: "disqualified", Trigger.REJECT_RECYCLE: "recycled"}


@dataclass
class Handover:
    channel: str
    owner: str
    outcome: str  # accepted, disqualified, recycled, expired, pending
    reason: str | None = None


def handovers(entries: Sequence[AuditEntry | ReportEntry], channel: str) -> list[Handover]:
    """Each MQL visit of one lead and what became of it."""
    found: list[Handover] = []
    open_: Handover | None = None
    owner: str | None = None
    for e in entries:
        owner = e.owner or owner
        if e.kind != AuditKind.STAGE_CHANGED:
            continue
        if open_ is not None and e.from_stage == Stage.MQL:
            if e.trigger in ACCEPTING:
                open_.outcome = "accepted"
            elif e.trigger in REJECTING:
                open_.outcome, open_.reason = REJECTING[e.trigger], e.reason or "none"
            else:
                open_.outcome = "expired"
            open_.owner = e.owner or (e.actor if e.role != Role.SYSTEM else None) or open_.owner
            open_ = None
        if e.to_stage == Stage.MQL:
            open_ = Handover(channel=channel, owner=owner or "unassigned", outcome="pending")
            found.append(open_)
    if open_ is not None and owner:
        open_.owner = owner
    return found


def _decision_stats(group: str, items: list[Handover]) -> DecisionStats:
    outcomes = Counter(h.outcome for h in items)
    rejected = outcomes["disqualified"] + outcomes["recycled"]
    decided = outcomes["accepted"] + rejected
    return DecisionStats(
        group=group, handed_over=len(items), accepted=outcomes["accepted"], rejected=rejected,
        disqualified=outcomes["disqualified"], recycled=outcomes["recycled"], expired=outcomes["expired"],
        pending=outcomes["pending"], acceptance_rate=_rate(outcomes["accepted"], decided),
        rejection_rate=_rate(rejected, decided),
        reasons=dict(sorted(Counter(h.reason for h in items if h.reason).items())),
    )


def decision_report(items: list[Handover]) -> DecisionReport:
    def grouped(key) -> list[DecisionStats]:
        groups: dict[str, list[Handover]] = defaultdict(list)
        for h in items:
            groups[key(h)].append(h)
        return [_decision_stats(name, groups[name]) for name in sorted(groups)]

    return DecisionReport(overall=_decision_stats("all", items), by_channel=grouped(lambda h: h.channel),
                          by_owner=grouped(lambda h: h.owner))


# ------------------------------------------------------------------ SLAs

@dataclass
class SlaRun:
    name: str
    owner: str
    outcome: str  # met, breached, cancelled, late_data, open
    took: float | None = None  # seconds from its start to met
    open_breach: bool = False


@dataclass
class LeadSlas:
    runs: list[SlaRun] = field(default_factory=list)
    first_contacts: list[tuple[str, float]] = field(default_factory=list)  # (owner, seconds from handover)


def lead_slas(entries: Sequence[AuditEntry | ReportEntry]) -> LeadSlas:
    """One lead's SLAs, each with the owner it was the duty of (the lead's owner when it
    ended, or now), and its times from handover to first contact."""
    found = LeadSlas()
    running: dict[str, tuple[SlaRun, datetime]] = {}
    met_on_arrival: dict[str, datetime] = {}  # rule -> start of a deadline set and met at once
    met_by_contact: dict[tuple[str, datetime], tuple[SlaRun, datetime]] = {}  # (rule, met at) -> (run, start)
    cancelled_by_change: set[tuple[str, datetime]] = set()  # (rule, cancelled at)
    breached: list[tuple[SlaRun, int]] = []  # breached runs and the seq of their breach
    owner: str | None = None
    handed_at: datetime | None = None
    last_action = 0  # seq of the latest contact or stage change
    for e in entries:
        owner = e.owner or owner
        if e.kind == AuditKind.STAGE_CHANGED:
            last_action = e.seq
            if e.to_stage == Stage.MQL:
                handed_at = e.happened_at
        elif e.kind == AuditKind.CONTACT_LOGGED:
            last_action = e.seq
            if handed_at is not None:
                found.first_contacts.append((owner or "unassigned", (e.happened_at - handed_at).total_seconds()))
                handed_at = None
        elif e.kind in (AuditKind.SLA_SET, AuditKind.SLA_CANCELLED) and e.rule and e.reason == CANCELLED_BEFORE_ARRIVAL:
            # A deadline cancelled by a stage change (recycled, closed) before its event arrived;
            # cancelled by the same change as one of its kind, it is that one (as below).
            if e.kind == AuditKind.SLA_CANCELLED and (e.rule, e.happened_at) not in cancelled_by_change:
                found.runs.append(SlaRun(name=e.rule, owner=owner or "unassigned", outcome="cancelled"))
                cancelled_by_change.add((e.rule, e.happened_at))
        elif e.kind in (AuditKind.SLA_SET, AuditKind.SLA_MET) and e.rule and e.reason == MET_BEFORE_ARRIVAL:
            # A deadline met by a contact logged before its event arrived: set and met at once.
            # Met by the same contact as one of its kind already met, it is that one, started
            # earlier (one of a kind runs at a time, and a contact meets what runs).
            if e.kind == AuditKind.SLA_SET:
                met_on_arrival[e.rule] = e.happened_at
            elif e.rule in met_on_arrival:
                start = met_on_arrival.pop(e.rule)
                run, earlier = met_by_contact.get((e.rule, e.happened_at), (None, start))
                if run is None:
                    run = SlaRun(name=e.rule, owner=owner or "unassigned", outcome="met")
                    found.runs.append(run)
                start = min(start, earlier)
                run.took = (e.happened_at - start).total_seconds()
                met_by_contact[(e.rule, e.happened_at)] = (run, start)
        elif e.kind == AuditKind.SLA_SET and e.rule:
            if e.rule in running:  # the running deadline moved (an earlier cause arrived late): one run
                running[e.rule] = (running[e.rule][0], e.happened_at)
                continue
            run = SlaRun(name=e.rule, owner="unassigned", outcome="open")
            running[e.rule] = (run, e.happened_at)
            found.runs.append(run)
        elif e.kind == AuditKind.SLA_LATE_DATA and e.rule:
            found.runs.append(SlaRun(name=e.rule, owner=owner or "unassigned", outcome="late_data"))
        elif e.kind in (AuditKind.SLA_MET, AuditKind.SLA_BREACHED, AuditKind.SLA_CANCELLED) and e.rule in running:
            run, started = running.pop(e.rule)
            run.owner = owner or "unassigned"
            run.outcome = {AuditKind.SLA_MET: "met", AuditKind.SLA_BREACHED: "breached",
                           AuditKind.SLA_CANCELLED: "cancelled"}[e.kind]
            if e.kind == AuditKind.SLA_MET:
                run.took = (e.happened_at - started).total_seconds()
                met_by_contact[(e.rule, e.happened_at)] = (run, started)
            if e.kind == AuditKind.SLA_CANCELLED:
                cancelled_by_change.add((e.rule, e.happened_at))
            if e.kind == AuditKind.SLA_BREACHED:
                breached.append((run, e.seq))
    for run, _ in running.values():
        run.owner = owner or "unassigned"
    for run, seq in breached:
        run.open_breach = last_action < seq
    return found


def _sla_stats(group: str, runs: list[SlaRun], first_contacts: list[float] | None) -> SlaStats:
    outcomes = Counter(r.outcome for r in runs)
    return SlaStats(
        group=group, set=len(runs) - outcomes["late_data"], met=outcomes["met"], breached=outcomes["breached"],
        cancelled=outcomes["cancelled"], late_data=outcomes["late_data"], open=outcomes["open"],
        open_breaches=sum(r.open_breach for r in runs),
        met_in_time_rate=_rate(outcomes["met"], outcomes["met"] + outcomes["breached"]),
        median_hours_to_met=_median([r.took for r in runs if r.took is not None], 3600.0),
        median_hours_to_first_contact=_median(first_contacts, 3600.0) if first_contacts is not None else None,
    )


def sla_report(per_lead: list[LeadSlas]) -> SlaReport:
    runs = [r for lead in per_lead for r in lead.runs]
    contacts = [c for lead in per_lead for c in lead.first_contacts]
    by_name: dict[str, list[SlaRun]] = defaultdict(list)
    by_owner: dict[str, list[SlaRun]] = defaultdict(list)
    contacts_by_owner: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        by_name[r.name].append(r)
        by_owner[r.owner].append(r)
    for owner, seconds in contacts:
        contacts_by_owner[owner].append(seconds)
    owners = sorted(set(by_owner) | set(contacts_by_owner))
    return SlaReport(
        overall=_sla_stats("all", runs, [s for _, s in contacts]),
        by_sla=[_sla_stats(name, by_name[name], None) for name in sorted(by_name)],
        by_owner=[_sla_stats(owner, by_owner[owner], contacts_by_owner[owner]) for owner in owners],
    )
