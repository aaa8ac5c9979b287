"""Funnel reports from audit entries: conversion and time per stage, per channel."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from funnel.lead import Lead
from funnel.models import Accept, ActivityEvent, Actor, Bant, Close, Qualify, Reject, Role, Stage
from funnel.report import funnel_report
from funnel.scoring_model import load_model
from config import DEFAULT_MODEL

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ANNA = Actor(name="anna", role=Role.PRESALES)
BEN = Actor(name="ben", role=Role.SALES)
MODEL = load_model(DEFAULT_MODEL)


def lead_through(lead_id: str, channel: str, steps: list[str]) -> list:
    """A lead from a demo request at T0 through `steps`, one day apart; its audit entries."""
    lead = Lead.create(lead_id, MODEL, T0, channel=channel)
    lead.ingest(ActivityEvent(event_id=f"{lead_id}-1", lead_id=lead_id, type="demo_request", occurred_at=T0,
                              channel=channel), T0)
    now = T0
    for step in steps:
        now += timedelta(days=1)
        command = {
            "accept": Accept(by=ANNA),
            "qualify": Qualify(by=ANNA, bant=Bant(budget=True, need=True, timing=True)),
            "won": Close(by=BEN, outcome="won"),
            "disqualify": Reject(by=ANNA, reason="competitor"),
        }[step]
        lead.execute(command, now)
    return lead.take_effects().audit


def stats(report, channel: str, stage: Stage):
    group = report.overall if channel == "all" else next(c for c in report.by_channel if c.channel == channel)
    return next(s for s in group.stages if s.stage == stage)


def test_conversion_and_time_per_stage_per_channel():
    entries = (
        lead_through("W-1", "webinar", ["accept", "qualify", "won"])
        + lead_through("W-2", "webinar", ["disqualify"])
        + lead_through("S-1", "website", ["accept"])
    )
    report = funnel_report(entries, now=T0 + timedelta(days=10))
    assert [c.channel for c in report.by_channel] == ["webinar", "website"]
    assert report.overall.leads == 3

    mql = stats(report, "all", Stage.MQL)
    assert (mql.reached, mql.converted, mql.conversion_rate) == (3, 2, round(2 / 3, 4))
    assert mql.avg_days_in_stage == 1.0  # every MQL was decided a day later
    webinar_sal = stats(report, "webinar", Stage.SAL)
    assert (webinar_sal.reached, webinar_sal.converted, webinar_sal.conversion_rate) == (1, 1, 1.0)
    website_sal = stats(report, "website", Stage.SAL)
    assert (website_sal.reached, website_sal.converted, website_sal.in_stage_now) == (1, 0, 1)
    assert website_sal.avg_days_in_stage is None  # still there: no finished visit
    won = stats(report, "all", Stage.WON)
    assert (won.reached, won.converted, won.conversion_rate) == (1, None, None)
    assert stats(report, "webinar", Stage.DISQUALIFIED).reached == 1
    iql = stats(report, "all", Stage.IQL)
    assert iql.reached == 3 and iql.avg_days_in_stage == 0.0  # fast-tracked at once


def test_empty_history_gives_an_empty_report():
    report = funnel_report([], now=T0)
    assert report.overall.leads == 0 and report.by_channel == []
    assert all(s.reached == 0 and s.conversion_rate is None for s in report.overall.stages)


@pytest.mark.parametrize("delivered", ["in time order", "first touch last"])
def test_the_channel_of_a_lead_is_its_first_touch_whatever_came_first(delivered):
    """A lead whose first input was a profile update (no channel), then a webinar visit and
    paid search, in either delivery order, then a demo request (no channel) that makes it
    an MQL: its channel is the webinar, its first touch, not "unknown" and not the channel
    of its last event. Fed everything it wrote, as well as only its creation and stage
    changes (what the store gives reports)."""
    from funnel.models import AuditKind, ProfileUpdate

    lead = Lead.create("F-1", MODEL, T0)
    lead.update_profile(ProfileUpdate(update_id="p1", lead_id="F-1", facts={"target_account": True}), T0)
    now = T0 + timedelta(days=3)
    touches = [ActivityEvent(event_id=f"F-1-{n}", lead_id="F-1", type="website_visit", channel=channel,
                             occurred_at=T0 + timedelta(days=day)) for n, (channel, day) in
               enumerate([("webinar", 1), ("paid_search", 2), ("paid_search", 2.5)])]
    batches = [touches[:1], touches[1:]] if delivered == "in time order" else [touches[1:], touches[:1]]
    for batch in batches:
        lead.ingest_many(batch, now)
    lead.ingest_many([ActivityEvent(event_id="F-1-demo", lead_id="F-1", type="demo_request", occurred_at=now)], now)
    assert lead.state.channel == "webinar"
    audit = lead.take_effects().audit
    stage_entries = [e for e in audit if e.kind in (AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED)]
    assert any(e.to_stage == Stage.MQL for e in stage_entries)
    for entries in (audit, stage_entries):
        assert [c.channel for c in funnel_report(entries, now=now).by_channel] == ["webinar"]


def test_a_late_earlier_touch_becomes_the_channel_from_the_next_stage_change():
    """Created by a webinar visit; then a paid-search click from the day before arrives: the
    lead's first touch is paid search, and its next stage change (MQL) records it. The
    report, given what the store gives it, says paid search (reading the earliest entry by
    time said webinar: the creation is stamped before the stage change)."""
    from funnel.models import AuditKind

    day1, day2 = T0 + timedelta(days=1), T0 + timedelta(days=2)
    lead = Lead.create("G-1", MODEL, day1, channel="webinar")
    lead.ingest(ActivityEvent(event_id="G-1-1", lead_id="G-1", type="website_visit", channel="webinar",
                              occurred_at=day1), day1)
    lead.ingest(ActivityEvent(event_id="G-1-0", lead_id="G-1", type="website_visit", channel="paid_search",
                              occurred_at=T0), day2)
    lead.ingest(ActivityEvent(event_id="G-1-2", lead_id="G-1", type="demo_request", occurred_at=day2), day2)
    assert lead.state.channel == "paid_search"
    stage_entries = [e for e in lead.take_effects().audit if e.kind in (AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED)]
    assert [c.channel for c in funnel_report(stage_entries, now=day2).by_channel] == ["paid_search"]


def test_a_lead_created_by_a_profile_update_has_the_channel_of_its_first_event(tmp_path):
    """The profile came first (no channel), then a webinar visit; no stage change since. The
    store's event log keeps the first touch whatever arrived first, and the report uses it
    (it said "unknown": only creations and stage changes carried the lead's channel)."""
    from activities.store import AuditStore
    from funnel.models import ProfileUpdate

    lead = Lead.create("P-1", MODEL, T0)
    lead.update_profile(ProfileUpdate(update_id="p-1", lead_id="P-1", facts={"industry": "software"}), T0)
    visit = ActivityEvent(event_id="P-1-1", lead_id="P-1", type="website_visit", channel="webinar",
                          occurred_at=T0 + timedelta(hours=1))
    lead.ingest(visit, T0 + timedelta(hours=1))
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        store.write_audit(lead.take_effects().audit)
        store.log_events([visit], T0 + timedelta(hours=1))
        report = funnel_report(store.report_entries(), now=T0 + timedelta(days=1), touches=store.lead_touches())
    finally:
        store.dispose()
    assert [c.channel for c in report.by_channel] == ["webinar"]
    assert [g.group for g in report.opportunities.by_channel] == ["webinar"]


def _moves(lead_id: str, channel: str, path: list[Stage]) -> list:
    """Audit entries of a lead created at T0 that then moves along `path`, a day a step."""
    from funnel.models import AuditEntry, AuditKind

    base = dict(lead_id=lead_id, role=Role.SYSTEM, actor="leadflow", channel=channel, model_ref="default@1")
    entries = [AuditEntry(seq=1, at=T0, kind=AuditKind.LEAD_CREATED, detail="created", to_stage=Stage.IQL, **base)]
    before = Stage.IQL
    for day, stage in enumerate(path, start=1):
        entries.append(AuditEntry(seq=day + 1, at=T0 + timedelta(days=day), kind=AuditKind.STAGE_CHANGED,
                                  detail=f"{before.value} -> {stage.value}", from_stage=before, to_stage=stage, **base))
        before = stage
    return entries


def test_a_shortcut_passes_the_stage_it_skips():
    """MQL -> SQL straight (presales qualified without accepting first) converted the MQL and
    passed SAL: SAL counts it as reached and converted, with no time spent there."""
    entries = (_moves("A", "web", [Stage.MQL, Stage.SAL, Stage.SQL])
               + _moves("B", "web", [Stage.MQL, Stage.SQL])
               + _moves("C", "web", [Stage.MQL, Stage.DISQUALIFIED]))
    report = funnel_report(entries, now=T0 + timedelta(days=10))
    mql, sal = stats(report, "all", Stage.MQL), stats(report, "all", Stage.SAL)
    assert (mql.reached, mql.converted, mql.conversion_rate) == (3, 2, round(2 / 3, 4))
    assert (sal.reached, sal.converted, sal.conversion_rate) == (2, 2, 1.0)
    assert sal.median_days_in_stage == 1.0  # A's visit only: B never sat in SAL


def test_win_rate_is_over_closed_opportunities():
    """Of three opportunities (SQL) one is won, one lost and one still open: the win rate is
    1 of 2 closed, not 1 of 3; the open one is counted as open."""
    entries = (_moves("W", "web", [Stage.MQL, Stage.SAL, Stage.SQL, Stage.WON])
               + _moves("L", "web", [Stage.MQL, Stage.SAL, Stage.SQL, Stage.LOST])
               + _moves("O", "web", [Stage.MQL, Stage.SAL, Stage.SQL]))
    sql = stats(funnel_report(entries, now=T0 + timedelta(days=10)), "all", Stage.SQL)
    assert (sql.reached, sql.converted, sql.closed, sql.conversion_rate, sql.in_stage_now) == (3, 1, 2, 0.5, 1)


def test_recycled_is_split_by_cause_with_its_requalification_rate():
    """Presales' "not now", a decay below the threshold and a lost deal after its cool-off are
    different stories: counted apart. One of the three came back to MQL."""
    from funnel.models import Trigger

    entries = []
    for lead, path in {"N": [(Stage.MQL, Trigger.SCORE_THRESHOLD), (Stage.RECYCLED, Trigger.REJECT_RECYCLE),
                             (Stage.MQL, Trigger.REQUALIFY)],
                       "D": [(Stage.MQL, Trigger.SCORE_THRESHOLD), (Stage.RECYCLED, Trigger.DECAY_BELOW_THRESHOLD)],
                       "C": [(Stage.MQL, Trigger.FAST_TRACK), (Stage.SAL, Trigger.ACCEPT), (Stage.SQL, Trigger.QUALIFY),
                             (Stage.LOST, Trigger.LOST), (Stage.RECYCLED, Trigger.COOL_OFF_ENDED)]}.items():
        moves = _moves(lead, "web", [stage for stage, _ in path])
        for entry, (_, trigger) in zip(moves[1:], path):
            entry.trigger = trigger
        entries += moves
    recycled = stats(funnel_report(entries, now=T0 + timedelta(days=10)), "all", Stage.RECYCLED)
    assert recycled.reached == 3
    assert recycled.causes == {"cool_off_ended": 1, "decay_below_threshold": 1, "reject_recycle": 1}
    assert (recycled.requalified, recycled.requalification_rate) == (1, round(1 / 3, 4))
    assert stats(funnel_report(entries, now=T0), "all", Stage.MQL).causes is None


def test_time_in_stage_counts_open_visits_as_censored():
    """Five leads entered MQL on day 0: three left after a day, one after 20 days and one
    after 25. Five more entered on day 15 and are still there on day 30. Dropping the open
    visits gives a median of 1 day; by Kaplan-Meier half have left after 20 days and three
    quarters after 25."""
    now = T0 + timedelta(days=30)
    entries = []
    for n, days in enumerate([1, 1, 1, 20, 25, None, None, None, None, None]):
        moves = _moves(f"K{n}", "web", [Stage.MQL] + ([Stage.SAL] if days else []))
        moves[1].at = T0 if days else T0 + timedelta(days=15)
        if days:
            moves[2].at = T0 + timedelta(days=days)
        entries += moves
    mql = stats(funnel_report(entries, now=now), "all", Stage.MQL)
    assert mql.median_days_in_stage == 1.0  # the old, biased figure, kept as secondary
    assert (mql.median_days, mql.p75_days) == (20.0, 25.0)
    assert mql.open_median_age_days == 15.0 and mql.in_stage_now == 5


def test_time_in_stage_is_unknown_while_most_leads_are_still_there():
    entries = _moves("U1", "web", [Stage.MQL, Stage.SAL]) + _moves("U2", "web", [Stage.MQL]) + _moves("U3", "web", [Stage.MQL])
    mql = stats(funnel_report(entries, now=T0 + timedelta(days=30)), "all", Stage.MQL)
    assert mql.median_days is None and mql.p75_days is None  # 1 of 3 left: the median is not reached
    assert mql.open_median_age_days == 29.0
