"""The funnel report the store makes (summary tables kept on write, aggregated in SQL,
activities/report_store.py) is the report funnel/report.py defines, on SQLite and on
PostgreSQL: on the hand-counted population of tests/test_report_kpis.py, and on generated
populations written in any batches and order, retried, with events logged before or after.

Times here are whole hours: the store bins durations to the hour (SLAs to the minute) for
its medians and Kaplan-Meier quantiles, which is then exact; every count always is.
"""

from __future__ import annotations

import math
import random
import statistics
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activities.store import AuditStore
from funnel.kpis import ReportWindows
from funnel.models import ActivityEvent, AuditEntry, AuditKind, Role, Stage, Trigger
from funnel.report import funnel_report, km_quantiles, median_counted
from tests.test_report_kpis import NOW, PLANS, play
from tests import test_store

postgres_server = test_store.postgres_server  # the throwaway PostgreSQL of the store's tests
T0 = datetime(2026, 1, 5, tzinfo=timezone.utc)
H = timedelta(hours=1)


def same(a, b, path="report") -> None:
    """Equal, floats up to their last (third or fourth) rounded digit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, abs_tol=0.0011), (path, a, b)
    else:
        assert a == b, (path, a, b)


def pure(store: AuditStore, now: datetime, windows: ReportWindows | None = None):
    return funnel_report(store.report_entries(), now, touches=store.lead_touches(), windows=windows)


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request, tmp_path):
    """Makes fresh stores of the parametrised database; disposes of them at the end."""
    made = []

    def make() -> AuditStore:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path}/report-{uuid.uuid4().hex}.db"
        else:
            url = request.getfixturevalue("postgres_server").new_database()
        made.append(AuditStore(url))
        return made[-1]

    make.dialect = request.param
    yield make
    for store in made:
        store.dispose()


# --------------------------------------------------------------------------- the estimators


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.booleans()), min_size=1, max_size=60))
def test_kaplan_meier_quantiles_are_lifelines_to_the_bit(visits):
    """km_quantiles over counted times gives what lifelines gives over the visits, ties at
    exactly a half or a quarter included (lifelines stays as the oracle, off the report path)."""
    from lifelines import KaplanMeierFitter
    from lifelines.utils import qth_survival_times

    durations = [float(t) for t, _ in visits]
    observed = [left for _, left in visits]
    finished = Counter(t for t, left in zip(durations, observed) if left)
    censored = Counter(t for t, left in zip(durations, observed) if not left)
    got = km_quantiles(finished, censored)
    if not finished:
        assert got == (None, None)
        return
    fitted = KaplanMeierFitter().fit(durations, observed)
    want = []
    for share in (0.5, 0.25):
        days = float(qth_survival_times(share, fitted.survival_function_))
        want.append(days if math.isfinite(days) else None)
    assert got == tuple(want)


@given(st.dictionaries(st.integers(-50, 50), st.integers(1, 5)))
def test_a_median_over_counted_values_is_the_median_of_the_values(counts):
    values = [v for v, n in counts.items() for _ in range(n)]
    assert median_counted(counts) == (statistics.median(values) if values else None)


# --------------------------------------------------------------------------- the hand-counted population


def test_the_store_reports_the_hand_counted_population(new_store):
    """tests/test_report_kpis.py's population (counted by hand from its plan), written as the
    workflows write it (each lead's entries in a few batches, leads interleaved, one batch
    retried), with its events logged: the store's report has the hand-counted figures and
    is the pure report of what it holds."""
    store = new_store()
    rnd = random.Random(7)
    batches = []
    for plan in PLANS:
        for i in range(plan.n):
            entries = play(plan, i)
            cut = rnd.randint(1, len(entries) - 1)
            batches += [entries[:cut], entries[cut:]]
    rnd.shuffle(batches)  # leads interleaved; a lead's batches may come in either order
    for batch in batches:
        store.write_audit(batch)
    assert store.write_audit(batches[0]) == 0  # a retry: nothing new, nothing changes
    store.log_events([ActivityEvent(event_id=f"{p.group}-{i}-demo", lead_id=f"{p.group}-{i}", type="demo_request",
                                    occurred_at=NOW - p.age, channel=p.channel, campaign=p.campaign)
                      for p in PLANS for i in range(p.n)], NOW)
    report = store.funnel_report(NOW)
    o, p, s = report.opportunities.overall, report.presales.overall, report.slas
    assert (o.leads, o.opportunities, o.matured_leads, o.opportunities_within) == (19, 9, 15, 9)
    assert (o.median_days_to_opportunity, o.won, o.closed, o.median_days_to_won) == (3.0, 6, 9, 10.0)
    assert {g.group: (g.leads, g.opportunities) for g in report.opportunities.by_campaign_first_touch} == {
        "none": (10, 0), "spring": (6, 6), "summit": (3, 3)}
    assert {g.group: g.leads for g in report.opportunities.by_campaign_last_touch} == {
        "none": 10, "spring": 6, "summit": 3}
    assert {g.group: (g.leads, g.maturity_days) for g in report.opportunities.by_cohort} == {
        "2026-02": (2, 184.0), "2026-05": (13, 92.0), "2026-08": (4, 0.0)}
    assert (p.handed_over, p.accepted, p.rejected, p.disqualified, p.recycled, p.pending) == (19, 9, 6, 4, 2, 4)
    assert p.reasons == {"no_budget": 4, "not_now": 2}
    assert {g.group: (g.set, g.met, g.breached, g.open, g.open_breaches, g.median_hours_to_met)
            for g in s.by_sla} == {"presales_decision": (19, 12, 5, 2, 2, 24.0),
                                   "presales_qualification": (9, 6, 3, 0, 0, 48.0),
                                   "first_sales_contact": (9, 6, 3, 0, 0, 4.0)}
    assert {g.group: g.median_hours_to_first_contact for g in s.by_owner} == {"anna": 2.0, "ole": 5.0}
    assert [c.channel for c in report.by_channel] == ["partner", "web", "webinar"]
    same(report.model_dump(), pure(store, NOW).model_dump())
    narrow = ReportWindows(lead_to_opportunity_days=5, opportunity_to_won_days=5, cohort="week")
    same(store.funnel_report(NOW, narrow).model_dump(), pure(store, NOW, narrow).model_dump())


# --------------------------------------------------------------------------- generated populations

CHANNELS = ["web", "email", "partner"]
OWNERS = [None, "anna", "ole"]
RULES = ["presales_decision", "first_sales_contact"]
SLA_KINDS = [AuditKind.SLA_SET, AuditKind.SLA_MET, AuditKind.SLA_BREACHED, AuditKind.SLA_CANCELLED,
             AuditKind.SLA_LATE_DATA]
STAGES = list(Stage)
TRIGGERS = [None, *Trigger]

step = st.one_of(
    st.tuples(st.just("stage"), st.sampled_from(STAGES), st.sampled_from(TRIGGERS), st.sampled_from([None, "x", "y"])),
    st.tuples(st.just("owner"), st.sampled_from(OWNERS[1:])),
    st.tuples(st.just("contact"), st.sampled_from(OWNERS)),
    st.tuples(st.just("sla"), st.sampled_from(SLA_KINDS), st.sampled_from(RULES)),
    st.tuples(st.just("score"),),  # not a report entry: writes of it alone change no report row
)
lead_plan = st.tuples(
    st.integers(0, 24 * 200),  # created, hours after T0
    st.sampled_from([*CHANNELS, None]),  # its own channel
    st.lists(st.tuples(st.integers(0, 24 * 30), st.integers(0, 48), step), max_size=10),  # (after, event-time lag, step)
    st.lists(st.tuples(st.integers(-24 * 10, 24 * 250), st.sampled_from([None, *CHANNELS]),
                       st.sampled_from([None, "spring", "summit"])), max_size=3),  # logged events
)


def lead_entries(lead_id: str, created: int, channel: str | None, steps) -> list[AuditEntry]:
    base = dict(lead_id=lead_id, actor="leadflow", role=Role.SYSTEM, detail="-", model_ref="default@1")
    at = T0 + created * H
    entries = [AuditEntry(seq=1, at=at, kind=AuditKind.LEAD_CREATED, to_stage=Stage.IQL, channel=channel, **base)]
    stage = Stage.IQL
    for after, lag, (what, *args) in steps:
        at += after * H
        fields: dict = {"occurred_at": at - lag * H if lag % 3 == 0 else None}
        if what == "stage":
            to, trigger, reason = args
            fields.update(kind=AuditKind.STAGE_CHANGED, from_stage=stage, to_stage=to, trigger=trigger,
                          reason=reason, channel=channel, owner=OWNERS[lag % 3],
                          role=Role.PRESALES if lag % 2 else Role.SYSTEM, actor="anna" if lag % 2 else "leadflow")
            stage = to
        elif what == "owner":
            fields.update(kind=AuditKind.OWNER_ASSIGNED, owner=args[0])
        elif what == "contact":
            fields.update(kind=AuditKind.CONTACT_LOGGED, owner=args[0])
        elif what == "sla":
            fields.update(kind=args[0], rule=args[1])
        else:
            fields.update(kind=AuditKind.SCORE_CHANGED, channel="email")
        entries.append(AuditEntry(seq=len(entries) + 1, at=at, **{**base, **fields}))
    return entries


def check_population(store: AuditStore, leads, now_hours: int, events_first: bool, rnd: random.Random) -> None:
    batches, events = [], []
    for n, (created, channel, steps, logged) in enumerate(leads):
        lead_id = f"L-{n}"
        entries = lead_entries(lead_id, created, channel, steps)
        while entries:  # a lead writes its entries in order, in batches of any size
            cut = rnd.randint(1, len(entries))
            batches.append(entries[:cut])
            entries = entries[cut:]
        events += [ActivityEvent(event_id=f"{lead_id}-e{k}", lead_id=lead_id, type="website_visit",
                                 occurred_at=T0 + hours * H, channel=ch, campaign=campaign)
                   for k, (hours, ch, campaign) in enumerate(logged)]
    # Leads interleave; a sweep may write a lead's later batch before its earlier one.
    rnd.shuffle(batches)
    if events_first:
        store.log_events(events, T0)
    for batch in batches:
        store.write_audit(batch)
        if rnd.random() < 0.2:
            store.write_audit(batch)  # a retried activity
    if not events_first:
        for event in events:
            store.log_events([event], T0)
    now = T0 + now_hours * H
    windows = ReportWindows(lead_to_opportunity_days=rnd.choice([1, 30, 84]), opportunity_to_won_days=rnd.choice([1, 18]),
                            cohort=rnd.choice(["month", "week"]))
    same(store.funnel_report(now, windows).model_dump(), pure(store, now, windows).model_dump())


def test_the_store_report_is_the_pure_report_on_generated_populations(new_store):
    @settings(max_examples=40 if new_store.dialect == "sqlite" else 12, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.lists(lead_plan, max_size=12), st.integers(0, 24 * 260), st.booleans(),
           st.randoms(use_true_random=False))
    def check(leads, now_hours, events_first, rnd):
        check_population(new_store(), leads, now_hours, events_first, rnd)

    check()


def test_a_store_from_before_the_report_tables_derives_them_on_start(tmp_path):
    """Older code kept no report rows: the store derives them once when it starts, and from
    then on keeps them as it writes."""
    url = f"sqlite:///{tmp_path}/old.db"
    store = AuditStore(url)
    store.write_audit([e for plan in PLANS for i in range(plan.n) for e in play(plan, i)])
    before = store.funnel_report(NOW)
    with store.engine.begin() as conn:  # as older code left it
        for table in ("report_lead", "report_visit", "report_handover", "report_sla", "report_contact",
                      "report_state"):
            conn.exec_driver_sql(f"DELETE FROM {table}")
    assert store.funnel_report(NOW).overall.leads == 0
    store.dispose()
    again = AuditStore(url)
    try:
        assert again.funnel_report(NOW) == before
        more = play(PLANS[0], 99)
        again.write_audit(more)
        assert again.funnel_report(NOW).overall.leads == 20
    finally:
        again.dispose()


def test_since_reports_the_leads_created_since(new_store):
    store = new_store()
    store.write_audit([e for plan in PLANS for i in range(plan.n) for e in play(plan, i)])
    recent = store.funnel_report(NOW, since=NOW - timedelta(days=10))  # G4 and G5: created 3 days, 20 hours ago
    assert (recent.overall.leads, recent.presales.overall.handed_over, recent.presales.overall.pending) == (4, 4, 4)
    assert [c.channel for c in recent.by_channel] == ["partner", "webinar"]
    assert recent.slas.overall.set == 4 and recent.opportunities.overall.opportunities == 0


def test_time_in_stage_is_binned_to_the_hour_below(tmp_path):
    """The stated approximation: the store's medians of time in stage are over durations
    floored to the hour (at most an hour below the exact figure); their mean is exact."""
    store = AuditStore(f"sqlite:///{tmp_path}/bins.db")
    try:
        base = dict(lead_id="B-1", actor="leadflow", role=Role.SYSTEM, detail="-", channel="web")
        store.write_audit([
            AuditEntry(seq=1, at=T0, kind=AuditKind.LEAD_CREATED, to_stage=Stage.IQL, **base),
            AuditEntry(seq=2, at=T0 + 90 * timedelta(minutes=1), kind=AuditKind.STAGE_CHANGED, from_stage=Stage.IQL,
                       to_stage=Stage.MQL, **base)])
        now = T0 + timedelta(days=1)
        [iql] = [s for s in store.funnel_report(now).overall.stages if s.stage == Stage.IQL]
        [exact] = [s for s in pure(store, now).overall.stages if s.stage == Stage.IQL]
        assert (iql.median_days_in_stage, iql.median_days, iql.avg_days_in_stage) == (0.042, 0.042, 0.062)
        assert (exact.median_days_in_stage, exact.median_days, exact.avg_days_in_stage) == (0.062, 0.062, 0.062)
    finally:
        store.dispose()


def test_concurrent_writers_of_the_same_leads_keep_the_report_rows_right(new_store):
    """A lead's workflow and the audit sweeper write its batches at the same time, events
    are logged meanwhile (on PostgreSQL really in parallel): each lead's rows are derived
    by one writer at a time from everything committed, so the report ends right."""
    import threading

    store = new_store()
    rnd = random.Random(3)
    leads = [(rnd.randint(0, 24 * 100), rnd.choice(CHANNELS),
              [(rnd.randint(0, 48), 0, ("stage", rnd.choice(STAGES), rnd.choice(TRIGGERS), None)) for _ in range(6)])
             for _ in range(30)]
    entries = [e for n, (created, channel, steps) in enumerate(leads)
               for e in lead_entries(f"L-{n}", created, channel, steps)]
    events = [ActivityEvent(event_id=f"L-{n}-e", lead_id=f"L-{n}", type="website_visit", channel="partner",
                            campaign="spring", occurred_at=T0 + rnd.randint(-100, 24 * 100) * H) for n in range(30)]
    errors = []

    def writer(seed: int) -> None:
        mine = random.Random(seed)
        try:
            for _ in range(40):  # overlapping batches of the same leads, any order
                store.write_audit(mine.sample(entries, 12))
            store.write_audit(entries)
            store.log_events(mine.sample(events, 10), T0)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    now = T0 + 24 * 120 * H
    same(store.funnel_report(now).model_dump(), pure(store, now).model_dump())
    assert store.funnel_report(now).overall.leads == 30
