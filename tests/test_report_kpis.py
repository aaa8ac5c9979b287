"""The manager's KPIs (funnel/kpis.py) on a generated population whose answers were
counted by hand from the plan that made it (the figures in the asserts), not from its audit.

Six groups of leads, each through the real core (funnel.lead.Lead) on the default model;
every lead is a demo request (fast-track MQL at its creation) handed to anna or ole:

    group  n  channel   campaign  created     owner  what happens (days after creation)
    G1     6  web       spring    NOW-120 d   anna   contact +2 h, accept +1, qualify +3, sales contact +3 d 4 h, won +13
    G2     4  web       -         NOW-120 d   ole    contact +5 h, disqualified +1 (no_budget)
    G3     3  webinar   summit    NOW-100 d   ole    accept +3 (decision SLA breached), qualify +9 (breached),
                                                     lost +14 (price; first sales contact breached)
    G4     2  webinar   -         NOW-3 d     anna   pending: decision SLA breached, nobody acted since
    G5     2  partner   -         NOW-20 h    anna   pending: decision SLA running
    G6     2  web       -         NOW-200 d   anna   recycled +1 (not_now)
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from config import DEFAULT_MODEL
from funnel.kpis import LeadTouch, ReportWindows, cohort_of
from funnel.lead import Lead
from funnel.models import (
    Accept, ActivityEvent, Actor, AuditEntry, Bant, Close, LogContact, Qualify, Refused, Reject, Role,
)
from funnel.report import CSV_TABLES, funnel_report, report_csv
from funnel.scoring_model import ModelError, load_model, parse_model

NOW = datetime(2026, 9, 1, tzinfo=timezone.utc)
MODEL = load_model(DEFAULT_MODEL)
ANNA = Actor(name="anna", role=Role.PRESALES)
OLE = Actor(name="ole", role=Role.PRESALES)
BEN = Actor(name="ben", role=Role.SALES)
BANT = Bant(budget=True, need=True, timing=True)
D, H = timedelta(days=1), timedelta(hours=1)


@dataclass
class Plan:
    group: str
    n: int
    channel: str
    campaign: str | None
    age: timedelta
    owner: Actor
    steps: list[tuple[timedelta, object]]  # (after creation, command); None: the lead's timers up to NOW


PLANS = [
    Plan("G1", 6, "web", "spring", 120 * D, ANNA,
         [(2 * H, LogContact(by=ANNA)), (1 * D, Accept(by=ANNA)), (3 * D, Qualify(by=ANNA, bant=BANT)),
          (3 * D + 4 * H, LogContact(by=BEN)), (13 * D, Close(by=BEN, outcome="won"))]),
    Plan("G2", 4, "web", None, 120 * D, OLE,
         [(5 * H, LogContact(by=OLE)), (1 * D, Reject(by=OLE, reason="no_budget"))]),
    Plan("G3", 3, "webinar", "summit", 100 * D, OLE,
         [(3 * D, Accept(by=OLE)), (9 * D, Qualify(by=OLE, bant=BANT)),
          (14 * D, Close(by=BEN, outcome="lost", reason="price"))]),
    Plan("G4", 2, "webinar", None, 3 * D, ANNA, [(3 * D, None)]),
    Plan("G5", 2, "partner", None, 20 * H, ANNA, [(20 * H, None)]),
    Plan("G6", 2, "web", None, 200 * D, ANNA, [(1 * D, Reject(by=ANNA, reason="not_now", recycle=True))]),
]


def play(plan: Plan, i: int) -> list[AuditEntry]:
    lead_id = f"{plan.group}-{i}"
    created = NOW - plan.age
    lead = Lead.create(lead_id, MODEL, created, channel=plan.channel)
    lead.ingest(ActivityEvent(event_id=f"{lead_id}-demo", lead_id=lead_id, type="demo_request", occurred_at=created,
                              channel=plan.channel, campaign=plan.campaign), created)
    lead.assign_owner(plan.owner.name, created + timedelta(minutes=1))
    for after, command in plan.steps:
        lead.tick(created + after)  # SLAs due before the step breach first
        if command is not None:
            lead.execute(command, created + after)
    return lead.take_effects().audit


@pytest.fixture(scope="module")
def report():
    entries = [e for plan in PLANS for i in range(plan.n) for e in play(plan, i)]
    touches = {f"{p.group}-{i}": LeadTouch(channel=p.channel, campaign=p.campaign, last_campaign_before_mql=p.campaign)
               for p in PLANS for i in range(p.n)}
    return funnel_report(entries, NOW, touches=touches)


def by_group(rows):
    return {row.group: row for row in rows}


def test_which_channel_brings_opportunities_and_how_fast(report):
    o = report.opportunities
    assert (o.windows.lead_to_opportunity_days, o.windows.opportunity_to_won_days) == (84, 18)
    overall = o.overall
    assert (overall.leads, overall.opportunities, overall.opportunity_rate) == (19, 9, round(9 / 19, 4))
    # Matured (created 84+ days ago): G1, G2, G3, G6 = 15; all 9 opportunities came within 84 days.
    assert (overall.matured_leads, overall.opportunities_within, overall.opportunity_rate_within) == (15, 9, 0.6)
    assert overall.median_days_to_opportunity == 3.0  # six after 3 days, three after 9
    assert (overall.won, overall.closed, overall.win_rate) == (6, 9, round(6 / 9, 4))
    assert (overall.matured_opportunities, overall.won_within, overall.median_days_to_won) == (9, 6, 10.0)
    channels = by_group(o.by_channel)
    assert sorted(channels) == ["partner", "web", "webinar"]
    web, webinar, partner = channels["web"], channels["webinar"], channels["partner"]
    assert (web.leads, web.opportunities, web.matured_leads, web.opportunity_rate_within) == (12, 6, 12, 0.5)
    assert (webinar.leads, webinar.opportunities, webinar.matured_leads, webinar.opportunity_rate_within) == (5, 3, 3, 1.0)
    assert (webinar.won, webinar.closed, webinar.win_rate, webinar.median_days_to_opportunity) == (0, 3, 0.0, 9.0)
    assert (partner.leads, partner.opportunities, partner.matured_leads, partner.opportunity_rate_within) == (2, 0, 0, None)
    campaigns = by_group(o.by_campaign_first_touch)
    assert {k: (v.leads, v.opportunities) for k, v in campaigns.items()} == {
        "none": (10, 0), "spring": (6, 6), "summit": (3, 3)}
    assert {k: v.leads for k, v in by_group(o.by_campaign_last_touch).items()} == {"none": 10, "spring": 6, "summit": 3}


def test_cohorts_by_creation_month_with_their_maturity(report):
    cohorts = by_group(report.opportunities.by_cohort)
    assert {k: (v.leads, v.opportunities) for k, v in cohorts.items()} == {
        "2026-02": (2, 0), "2026-05": (13, 9), "2026-08": (4, 0)}
    assert cohorts["2026-05"].maturity_days == 92.0  # June 1st to September 1st
    assert cohorts["2026-08"].maturity_days == 0.0
    assert cohort_of(datetime(2026, 3, 4, 15, tzinfo=timezone.utc), "week")[0] == "2026-W10"


def test_how_many_mqls_presales_rejects_and_why(report):
    p = report.presales.overall
    assert (p.handed_over, p.accepted, p.rejected, p.disqualified, p.recycled, p.pending, p.expired) == \
        (19, 9, 6, 4, 2, 4, 0)
    assert (p.acceptance_rate, p.rejection_rate) == (0.6, 0.4)
    assert p.reasons == {"no_budget": 4, "not_now": 2}
    owners = by_group(report.presales.by_owner)
    assert {k: (v.handed_over, v.accepted, v.rejected, v.pending) for k, v in owners.items()} == {
        "anna": (12, 6, 2, 4), "ole": (7, 3, 4, 0)}
    channels = by_group(report.presales.by_channel)
    assert {k: (v.handed_over, v.accepted, v.rejected, v.pending) for k, v in channels.items()} == {
        "partner": (2, 0, 0, 2), "web": (12, 6, 6, 0), "webinar": (5, 3, 0, 2)}
    assert channels["web"].reasons == {"no_budget": 4, "not_now": 2}


def test_who_misses_slas(report):
    slas = by_group(report.slas.by_sla)
    figures = {k: (v.set, v.met, v.breached, v.open, v.open_breaches) for k, v in slas.items()}
    assert figures == {
        "presales_decision": (19, 12, 5, 2, 2),  # met: G1 G2 G6; breached: G3 G4; open: G5
        "presales_qualification": (9, 6, 3, 0, 0),
        "first_sales_contact": (9, 6, 3, 0, 0),
    }
    assert slas["presales_decision"].met_in_time_rate == round(12 / 17, 4)
    assert (slas["presales_decision"].median_hours_to_met, slas["presales_qualification"].median_hours_to_met,
            slas["first_sales_contact"].median_hours_to_met) == (24.0, 48.0, 4.0)
    owners = by_group(report.slas.by_owner)
    assert {k: (v.set, v.met, v.breached, v.open, v.open_breaches) for k, v in owners.items()} == {
        "anna": (24, 20, 2, 2, 2), "ole": (13, 4, 9, 0, 0)}
    assert (owners["anna"].median_hours_to_first_contact, owners["ole"].median_hours_to_first_contact) == (2.0, 5.0)
    overall = report.slas.overall
    assert (overall.set, overall.met, overall.breached, overall.met_in_time_rate) == (37, 24, 11, round(24 / 35, 4))
    assert overall.median_hours_to_first_contact == 2.0


def test_windows_are_configurable(report):
    entries = [e for plan in PLANS for i in range(plan.n) for e in play(plan, i)]
    narrow = funnel_report(entries, NOW, windows=ReportWindows(lead_to_opportunity_days=5, opportunity_to_won_days=5))
    overall = narrow.opportunities.overall
    # Within 5 days: G1's six (3 days), not G3's three (9); no win within 5 days of its opportunity.
    assert (overall.matured_leads, overall.opportunities_within, overall.won_within) == (15, 6, 0)  # not G4, G5
    # Without the event log's touches: each lead's own channel, no campaigns.
    assert [g.group for g in narrow.opportunities.by_channel] == ["partner", "web", "webinar"]
    assert [g.group for g in narrow.opportunities.by_campaign_first_touch] == ["none"]
    with pytest.raises(ValueError):
        ReportWindows(lead_to_opportunity_days=0)


def test_every_table_exports_as_csv(report):
    for table in CSV_TABLES:
        rows = list(csv.DictReader(io.StringIO(report_csv(report, table))))
        assert rows, table
    presales = {(r["by"], r["group"]): r for r in csv.DictReader(io.StringIO(report_csv(report, "presales")))}
    assert presales[("all", "all")]["reasons"] == "no_budget=4;not_now=2"
    assert presales[("owner", "ole")]["rejected"] == "4"
    slas = {(r["by"], r["group"]): r for r in csv.DictReader(io.StringIO(report_csv(report, "slas")))}
    assert slas[("owner", "anna")]["open_breaches"] == "2"
    cohorts = [r for r in csv.DictReader(io.StringIO(report_csv(report, "opportunities"))) if r["by"] == "cohort"]
    assert [r["group"] for r in cohorts] == ["2026-02", "2026-05", "2026-08"]
    with pytest.raises(ValueError, match="no table 'nope'"):
        report_csv(report, "nope")


REASONS = """
[reasons.reject]
no_budget = "no budget"
no_need = "no need for the product"
not_now = "interested, not now"

[reasons.lost]
price = "price"
"""


def test_reasons_come_from_the_model_files_list():
    listed = parse_model(DEFAULT_MODEL.read_text() + REASONS)
    assert listed.reasons.reject["no_need"] == "no need for the product" and list(listed.reasons.lost) == ["price"]
    lead = Lead.create("R-1", listed, NOW, channel="web")
    lead.ingest(ActivityEvent(event_id="r-1", lead_id="R-1", type="demo_request", occurred_at=NOW), NOW)
    with pytest.raises(Refused, match="cannot take reason 'too_small' for lead R-1: the rejection reasons of model "
                                      "default@1 are no_budget, no_need, not_now"):
        lead.check(Reject(by=ANNA, reason="too_small"))
    lead.execute(Reject(by=ANNA, reason="no_need"), NOW + H)
    # A model without lists (the default, and any written before them) takes any code.
    assert not MODEL.reasons.reject
    other = Lead.create("R-2", MODEL, NOW, channel="web")
    other.ingest(ActivityEvent(event_id="r-2", lead_id="R-2", type="demo_request", occurred_at=NOW), NOW)
    other.execute(Reject(by=ANNA, reason="too_small"), NOW + H)
    with pytest.raises(ModelError, match="reason code"):
        parse_model(DEFAULT_MODEL.read_text() + REASONS.replace("no_need =", "No_Need ="))
