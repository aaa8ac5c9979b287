"""Funnel reports from the audit history: conversion and time per stage, per channel,
and the lead-level KPIs of funnel/kpis.py (opportunities, presales decisions, SLAs).

Managers ask which channels bring the most *and the best* leads: how many
leads reach each stage, how many of those go on to the next one, and how long
they sit in each stage. Pure: it takes audit entries (as `AuditStore.report_entries`
returns them), each lead's first touch from the event log, and `now`.

This is the definition. The store does not run it on every report (it read every entry:
16 s on 100,000 leads): it keeps what these functions derive from each lead's entries in
summary tables as it writes, and aggregates those in SQL (activities/report_store.py);
tests/test_report_sql.py checks both give the same report.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Sequence
from statistics import mean, median

from pydantic import BaseModel

from funnel import kpis
from funnel.kpis import DecisionReport, LeadTouch, OpportunityReport, ReportWindows, SlaReport
from funnel.models import AuditEntry, AuditKind, ReportEntry, Stage

MAIN_PATH = [Stage.IQL, Stage.MQL, Stage.SAL, Stage.SQL, Stage.WON]
ALL_STAGES = MAIN_PATH + [Stage.LOST, Stage.DISQUALIFIED, Stage.RECYCLED]


class StageStats(BaseModel):
    stage: Stage
    reached: int  # leads that entered the stage, or passed it by a shortcut (main stages)
    converted: int | None  # of those, leads that went on to a later main stage (SQL: won)
    closed: int | None = None  # SQL only: opportunities closed, won or lost
    # RECYCLED only: entries into it by cause (presales or sales "not now", decay below the
    # threshold, negative criteria, a lost deal after its cool-off, a manager's reopen), and
    # leads that came back to MQL after it.
    causes: dict[str, int] | None = None
    requalified: int | None = None
    requalification_rate: float | None = None
    conversion_rate: float | None  # SQL: the win rate, over closed opportunities
    # Time in stage, censoring-aware (Kaplan-Meier): visits still open count for as long as
    # they have lasted so far. None while fewer than half (a quarter) have left the stage.
    median_days: float | None = None
    p75_days: float | None = None
    open_median_age_days: float | None = None  # how long the open visits have lasted so far
    avg_days_in_stage: float | None  # secondary: over finished visits only (biased short)
    median_days_in_stage: float | None  # secondary: the same
    in_stage_now: int


class ChannelReport(BaseModel):
    channel: str
    leads: int
    stages: list[StageStats]


class FunnelReport(BaseModel):
    generated_at: datetime
    overall: ChannelReport
    by_channel: list[ChannelReport]
    opportunities: OpportunityReport
    presales: DecisionReport
    slas: SlaReport
    benchmarks: dict[str, dict[str, float | int | str]] = kpis.BENCHMARKS


Visit = tuple[Stage, datetime, str | None]  # stage entered, when, why (the trigger's name)


def _visits(entries: Sequence[AuditEntry | ReportEntry]) -> list[Visit]:
    visits = []
    for entry in sorted(entries, key=lambda e: e.seq):
        if entry.kind in (AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED) and entry.to_stage is not None:
            visits.append((entry.to_stage, entry.at, entry.trigger.value if entry.trigger else None))
    return visits


def _furthest(stages_seen: list[Stage]) -> int:
    """How far along the main path the lead got (-1: nowhere)."""
    return max((MAIN_PATH.index(s) for s in stages_seen if s in MAIN_PATH), default=-1)


@dataclass
class _Tally:
    """What one stage adds up to over a group of leads."""

    reached: int = 0
    converted: int = 0
    closed: int = 0
    requalified: int = 0
    in_now: int = 0
    causes: Counter = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)  # finished visits, days
    ages: list[float] = field(default_factory=list)  # open visits so far, days


def _channel_report(channel: str, leads: dict[str, list[Visit]], now: datetime) -> ChannelReport:
    """Per stage: leads that reached it (a main stage also when a shortcut passed it, e.g.
    MQL -> SQL passes SAL), how many went on along the main path, and time spent in it
    (visits only). The last step, SQL -> won, is a win rate over closed opportunities: an
    open one has not failed. Recycled is split by cause, with how many were requalified.
    One pass over the leads, each lead's visits walked once."""
    tally = {stage: _Tally() for stage in ALL_STAGES}
    won_at, sql_at = MAIN_PATH.index(Stage.WON), MAIN_PATH.index(Stage.SQL)
    for visits in leads.values():
        stages_seen = [s for s, _, _ in visits]
        furthest = _furthest(stages_seen)
        for i in range(furthest + 1):  # main stages reached or passed
            t = tally[MAIN_PATH[i]]
            t.reached += 1
            t.converted += i < furthest
        if furthest >= sql_at and (furthest == won_at or Stage.LOST in stages_seen):
            tally[Stage.SQL].closed += 1
        for stage in set(stages_seen) - set(MAIN_PATH):
            tally[stage].reached += 1
        if Stage.RECYCLED in stages_seen:
            first = stages_seen.index(Stage.RECYCLED)
            tally[Stage.RECYCLED].requalified += Stage.MQL in stages_seen[first + 1:]
        for i, (stage, at, cause) in enumerate(visits):
            t = tally[stage]
            if stage == Stage.RECYCLED:
                t.causes[cause or "unknown"] += 1
            if i + 1 < len(visits):
                t.durations.append((visits[i + 1][1] - at).total_seconds() / 86400)
            else:
                t.in_now += 1
                t.ages.append(max((now - at).total_seconds() / 86400, 0.0))
    stats = []
    for stage in ALL_STAGES:
        t = tally[stage]
        on_path = stage in MAIN_PATH[:-1]
        base = t.closed if stage == Stage.SQL else t.reached
        recycled = stage == Stage.RECYCLED
        stats.append(
            StageStats(
                stage=stage,
                reached=t.reached,
                converted=t.converted if on_path else None,
                closed=t.closed if stage == Stage.SQL else None,
                causes=dict(sorted(t.causes.items())) if recycled else None,
                requalified=t.requalified if recycled else None,
                requalification_rate=round(t.requalified / t.reached, 4) if recycled and t.reached else None,
                conversion_rate=round(t.converted / base, 4) if on_path and base else None,
                **_time_in_stage(t.durations, t.ages),
                avg_days_in_stage=round(mean(t.durations), 3) if t.durations else None,
                median_days_in_stage=round(median(t.durations), 3) if t.durations else None,
                in_stage_now=t.in_now,
            )
        )
    return ChannelReport(channel=channel, leads=len(leads), stages=stats)


def _time_in_stage(finished: list[float], open_ages: list[float]) -> dict[str, float | None]:
    """Median and 75th percentile of days in a stage by the Kaplan-Meier estimator: a visit
    still open is censored at its age, not dropped (dropping them showed 1 day for a stage
    where most leads sit for weeks) nor counted as finished."""
    median_days, p75_days = km_quantiles(Counter(finished), Counter(open_ages)) if finished else (None, None)
    return {"median_days": None if median_days is None else round(median_days, 3),
            "p75_days": None if p75_days is None else round(p75_days, 3),
            "open_median_age_days": round(median(open_ages), 3) if open_ages else None}


def km_quantiles(finished: dict[float, int], censored: dict[float, int]) -> tuple[float | None, float | None]:
    """The median and the 75th percentile (the times by which half, three quarters, have
    left) of the Kaplan-Meier estimate over counted times {time: how many}: `finished`
    left then, `censored` were still there at that age. None: not reached (yet).

    The estimator as lifelines computes it (S = exp(cumsum(log(n - d) - log(n))), d left at
    a time, n at risk then, censored ones counted at risk at their own time; the quantile
    is the first time S <= q), so it matches lifelines to the bit (tests/test_report_sql.py
    checks it against lifelines) without importing lifelines' pandas and scipy (2.6 s) on
    the report's path. Counted times let the store bin durations in the database."""
    if not any(finished.values()):
        return None, None
    import numpy as np

    times = sorted(set(finished) | set(censored))
    left = np.array([finished.get(t, 0) for t in times], dtype=float)
    out = left + np.array([censored.get(t, 0) for t in times], dtype=float)
    at_risk = out.sum() - np.concatenate(([0.0], np.cumsum(out)[:-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        survival = np.exp(np.cumsum(np.log(at_risk - left) - np.log(at_risk)))
    found = []
    for share in (0.5, 0.25):  # share still in the stage
        below = np.flatnonzero(survival <= share)
        found.append(float(times[below[0]]) if below.size else None)
    return found[0], found[1]


def median_counted(counts: dict[float, int]) -> float | None:
    """statistics.median of values given as {value: how many}."""
    n = sum(counts.values())
    if not n:
        return None
    low_at, high_at = (n - 1) // 2, n // 2  # the middle one, or the middle two
    low, seen = None, 0
    for value in sorted(counts):
        seen += counts[value]
        if low is None and seen > low_at:
            low = value
        if seen > high_at:
            return value if low == value else (low + value) / 2
    raise AssertionError("unreachable: the counts add up to n")


def _first_touch(entries: Sequence[AuditEntry | ReportEntry], touch: LeadTouch | None) -> str:
    """The lead's channel, its first touch: the store's event log knows it whatever arrived
    first (a profile update, say). Without a logged event (leads fed straight to Temporal),
    as its latest creation or stage change knew it (those entries carry the lead's channel;
    a score change carries its event's)."""
    if touch is not None and touch.channel:
        return touch.channel
    own = [e for e in entries if e.channel and e.kind in (AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED)]
    return max(own, key=lambda e: e.seq).channel if own else "unknown"


def funnel_report(entries: Sequence[AuditEntry | ReportEntry], now: datetime,
                  touches: dict[str, LeadTouch] | None = None, windows: ReportWindows | None = None) -> FunnelReport:
    touches = touches or {}
    windows = windows or ReportWindows()
    by_lead: dict[str, list[AuditEntry | ReportEntry]] = defaultdict(list)
    for entry in sorted(entries, key=lambda e: (e.lead_id, e.seq)):
        by_lead[entry.lead_id].append(entry)
    visits = {lead: _visits(items) for lead, items in by_lead.items()}
    channel_of = {lead: _first_touch(items, touches.get(lead)) for lead, items in by_lead.items()}
    channels: dict[str, dict[str, list[Visit]]] = defaultdict(dict)
    for lead, lead_visits in visits.items():
        channels[channel_of[lead]][lead] = lead_visits
    facts = [kpis.lead_facts(lead, items, channel_of[lead], touches.get(lead)) for lead, items in by_lead.items()]
    return FunnelReport(
        generated_at=now,
        overall=_channel_report("all", visits, now),
        by_channel=[_channel_report(ch, channels[ch], now) for ch in sorted(channels)],
        opportunities=kpis.opportunity_report(facts, now, windows),
        presales=kpis.decision_report([h for lead, items in by_lead.items()
                                       for h in kpis.handovers(items, channel_of[lead])]),
        slas=kpis.sla_report([kpis.lead_slas(items) for items in by_lead.values()]),
    )


CSV_TABLES = ("stages", "opportunities", "presales", "slas")


def report_csv(report: FunnelReport, table: str = "stages") -> str:
    """One table of the report as CSV for a spreadsheet, a column per figure of `--json`
    (counts by name as `name=n;...`). stages: a row per channel ("all" first) and stage;
    opportunities: per channel, first- and last-touch campaign and cohort; presales: per
    channel and owner; slas: per SLA and owner."""
    if table not in CSV_TABLES:
        raise ValueError(f"no table {table!r}: one of {', '.join(CSV_TABLES)}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")

    def cells(model: BaseModel, fields: list[str]) -> list:
        row = model.model_dump(mode="json")
        for name, value in row.items():
            if isinstance(value, dict):
                row[name] = ";".join(f"{k}={n}" for k, n in value.items())
        return ["" if row[f] is None else row[f] for f in fields]

    if table == "stages":
        fields = list(StageStats.model_fields)
        writer.writerow(["channel", "leads", *fields])
        for group in [report.overall, *report.by_channel]:
            for stats in group.stages:
                writer.writerow([group.channel, group.leads, *cells(stats, fields)])
        return out.getvalue()
    o, p, s = report.opportunities, report.presales, report.slas
    sections: list[tuple[str, list[BaseModel]]] = {
        "opportunities": [("all", [o.overall]), ("channel", o.by_channel),
                          ("campaign_first_touch", o.by_campaign_first_touch),
                          ("campaign_last_touch", o.by_campaign_last_touch), ("cohort", o.by_cohort)],
        "presales": [("all", [p.overall]), ("channel", p.by_channel), ("owner", p.by_owner)],
        "slas": [("all", [s.overall]), ("sla", s.by_sla), ("owner", s.by_owner)],
    }[table]
    fields = list(type(sections[0][1][0]).model_fields)
    writer.writerow(["by", *fields])
    for by, rows in sections:
        for stats in rows:
            writer.writerow([by, *cells(stats, fields)])
    return out.getvalue()
