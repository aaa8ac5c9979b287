"""Timers through `tick(now)` and `next_wakeup()`: nurture, SLAs, decay back to recycled, cool-offs."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from funnel.lead import Lead
from funnel.models import AuditKind, OutboundKind, Stage, Trigger
from funnel.scoring_model import humanize
from tests.funnel_helpers import (
    BANT_3,
    MANAGER,
    PRESALES,
    SALES,
    T0,
    Accept,
    LogContact,
    Qualify,
    Reject,
    Reopen,
    days,
    event,
    facts,
    feed,
    hours,
    lost_lead,
    mql_lead,
    new_lead,
    of_kind,
    outbound_of,
    recycled_lead,
    sal_lead,
    sql_lead,
    stage_changes,
    variant,
)


def iso(t: datetime) -> str:
    return t.isoformat()


def run_until(lead: Lead, end: datetime) -> list:
    """Wake the lead at each of its wakeups up to `end`, like the workflow does; returns the wake times."""
    woke = []
    while (at := lead.next_wakeup()) is not None and at <= end:
        lead.tick(at)
        woke.append(at)
    return woke


# --------------------------------------------------------------------------- nurture


def test_iql_nurture_steps_go_out_in_order_with_their_delays():
    lead = new_lead()
    assert lead.next_wakeup() == T0 + days(1)
    assert lead.view().next_nurture_step == {"track": "iql", "step": "welcome", "at": iso(T0 + days(1))}
    lead.tick(T0 + days(1) - hours(1))
    assert lead.take_effects().outbound == []
    woke = run_until(lead, T0 + days(100))
    assert woke == [T0 + days(1), T0 + days(4), T0 + days(11)]  # 1d, then +3d, then +7d
    fx = lead.take_effects()
    steps = outbound_of(fx, OutboundKind.NURTURE_STEP)
    assert [(o.payload["step"], o.at) for o in steps] == [
        ("welcome", T0 + days(1)), ("case-study", T0 + days(4)), ("webinar-invite", T0 + days(11))]
    assert steps[0].payload == {"stage": "iql", "track": "iql", "step": "welcome", "due_at": iso(T0 + days(1))}
    assert [a.detail for a in of_kind(fx, AuditKind.NURTURE_STEP_SENT)] == [
        "nurture iql step welcome", "nurture iql step case-study", "nurture iql step webinar-invite"]
    assert lead.state.nurture is None
    assert lead.next_wakeup() is None


def test_a_late_tick_sends_every_due_step_in_order_keeping_the_schedule():
    lead = new_lead()
    lead.tick(T0 + days(5))
    steps = outbound_of(lead.take_effects(), OutboundKind.NURTURE_STEP)
    assert [o.payload["step"] for o in steps] == ["welcome", "case-study"]
    assert [o.payload["due_at"] for o in steps] == [iso(T0 + days(1)), iso(T0 + days(4))]
    assert lead.next_wakeup() == T0 + days(11)  # the next delay counts from the step's due time


def test_nurture_stops_when_the_lead_advances():
    lead = new_lead()
    lead.tick(T0 + days(1))  # welcome
    feed(lead, "demo_request", T0 + days(2))
    assert lead.state.stage == Stage.MQL
    assert lead.state.nurture is None and lead.view().next_nurture_step is None
    lead.take_effects()
    lead.tick(T0 + days(20))
    assert outbound_of(lead.take_effects(), OutboundKind.NURTURE_STEP) == []


def test_a_recycled_lead_starts_the_recycled_track():
    lead = recycled_lead()
    assert lead.state.nurture.track == "recycled"
    assert lead.view().next_nurture_step == {"track": "recycled", "step": "whats-new", "at": iso(T0 + days(14))}
    woke = run_until(lead, T0 + days(100))
    assert woke == [T0 + days(14), T0 + days(30), T0 + days(44)]  # whats-new, cool-off end, check-in
    steps = outbound_of(lead.take_effects(), OutboundKind.NURTURE_STEP)
    assert [(o.payload["track"], o.payload["step"], o.at) for o in steps] == [
        ("recycled", "whats-new", T0 + days(14)), ("recycled", "check-in", T0 + days(44))]
    assert lead.state.stage == Stage.RECYCLED


def test_no_nurture_without_a_track():
    model = variant((('[[nurture.iql]]\nname = "welcome"\nafter = "1d"\n[[nurture.iql]]\nname = "case-study"\n'
                     'after = "3d"\n[[nurture.iql]]\nname = "webinar-invite"\nafter = "7d"\n'), ""))
    lead = new_lead(model)
    assert lead.state.nurture is None
    assert lead.next_wakeup() is None


# --------------------------------------------------------------------------- SLAs


def test_presales_decision_sla_is_met_when_accepted_in_time():
    lead = mql_lead()
    [sla] = lead.state.slas
    assert (sla.name, sla.due_at, sla.met_by, sla.stage, sla.escalate_to) == (
        "presales_decision", T0 + days(2), "stage_exit", Stage.MQL, "presales-lead")
    assert lead.next_wakeup() == T0 + days(2)
    assert [(d.name, d.due_at, d.cause) for d in lead.view().deadlines] == [
        ("presales_decision", T0 + days(2), "stage mql")]
    lead.tick(T0 + days(1))
    assert lead.take_effects().audit == []
    lead.execute(Accept(by=PRESALES), T0 + days(1))
    [met] = of_kind(lead.take_effects(), AuditKind.SLA_MET)
    assert met.detail == f"SLA presales_decision met after 1d (due {iso(T0 + days(2))})"
    assert lead.state.escalations == 0
    lead.tick(T0 + days(3))
    assert of_kind(lead.take_effects(), AuditKind.SLA_BREACHED) == []


def test_presales_decision_sla_is_breached_and_escalated_when_nobody_decides():
    lead = mql_lead()
    lead.tick(T0 + days(2))
    fx = lead.take_effects()
    [breach] = of_kind(fx, AuditKind.SLA_BREACHED)
    assert breach.detail == f"SLA presales_decision breached after 2d (due {iso(T0 + days(2))})"
    assert breach.rule == "presales_decision"
    [escalation] = outbound_of(fx, OutboundKind.ESCALATION)
    assert escalation.payload == {"stage": "mql", "sla": "presales_decision", "escalate_to": "presales-lead",
                                  "due_at": iso(T0 + days(2)), "owner": None}
    assert escalation.at == T0 + days(2)
    assert lead.state.escalations == 1 and lead.state.slas == []
    lead.tick(T0 + days(2))  # once only
    assert lead.take_effects().outbound == []
    lead.execute(Accept(by=PRESALES), T0 + days(3))  # a late decision does not "meet" it afterwards
    assert of_kind(lead.take_effects(), AuditKind.SLA_MET) == []


def test_webinar_follow_up_is_set_on_attendance_and_due_12h_later():
    lead = new_lead()
    lead.ingest(event("w-1", "webinar_attended", T0 + hours(5)), T0 + hours(5))
    fx = lead.take_effects()
    [sla_set] = of_kind(fx, AuditKind.SLA_SET)
    assert sla_set.detail == f"SLA webinar_follow_up due {iso(T0 + hours(17))} (12h after event w-1)"
    [sla] = lead.state.slas
    assert (sla.name, sla.due_at, sla.met_by, sla.cause) == ("webinar_follow_up", T0 + hours(17), "contact",
                                                             "event w-1")
    assert lead.next_wakeup() == T0 + hours(17)  # earlier than the first nurture step
    lead.execute(LogContact(by=PRESALES, note="sent the recording"), T0 + hours(16))
    [met] = of_kind(lead.take_effects(), AuditKind.SLA_MET)
    assert met.detail == f"SLA webinar_follow_up met after 11h 0m (due {iso(T0 + hours(17))})"


def test_webinar_follow_up_breach_escalates():
    lead = new_lead()
    feed(lead, "webinar_attended", T0)
    lead.take_effects()
    lead.tick(T0 + hours(12))
    fx = lead.take_effects()
    [escalation] = outbound_of(fx, OutboundKind.ESCALATION)
    assert (escalation.payload["sla"], escalation.payload["escalate_to"]) == ("webinar_follow_up", "presales-lead")
    assert lead.state.escalations == 1


def test_the_follow_up_clock_starts_when_the_webinar_happened():
    lead = new_lead()
    lead.ingest(event("w-1", "webinar_attended", T0), T0 + hours(6))  # delivered late
    assert lead.state.slas[0].due_at == T0 + hours(12)
    assert lead.next_wakeup() == T0 + hours(12)


def test_a_follow_up_already_due_when_its_webinar_arrives_is_late_data_not_a_breach():
    """An attendee list imported the next morning: nobody could have called within 12 h."""
    lead = new_lead()
    lead.ingest(event("w-1", "webinar_attended", T0), T0 + hours(13))
    assert lead.state.slas == []
    fx = lead.take_effects()
    [late] = of_kind(fx, AuditKind.SLA_LATE_DATA)
    assert late.detail == ("SLA webinar_follow_up not set: it was due 2026-01-01T12:00:00+00:00 (12h after event w-1),"
                           " before event w-1 arrived (late data); not escalated")
    assert late.occurred_at == T0 and late.at == T0 + hours(13)
    lead.tick(T0 + days(1))
    fx = lead.take_effects()
    assert of_kind(fx, AuditKind.SLA_BREACHED) == [] and outbound_of(fx, OutboundKind.ESCALATION) == []


def test_a_second_webinar_does_not_open_a_second_follow_up():
    lead = new_lead()
    feed(lead, "webinar_attended", T0)
    feed(lead, "webinar_attended", T0 + hours(2))
    [follow_up] = [x for x in lead.state.slas if x.name == "webinar_follow_up"]
    assert follow_up.due_at == T0 + hours(12)
    assert len(of_kind(lead.take_effects(), AuditKind.SLA_SET)) == 2  # follow-up once, presales_decision (MQL)


def test_no_follow_up_for_a_closed_lead():
    lead = sql_lead()
    lead.execute(LogContact(by=SALES), T0)
    from tests.funnel_helpers import Close

    lead.execute(Close(by=SALES, outcome="won"), T0)
    feed(lead, "webinar_attended", T0 + hours(1))
    assert lead.state.slas == []


def test_first_sales_contact_on_sql():
    lead = sql_lead()
    [sla] = lead.state.slas
    assert (sla.name, sla.due_at, sla.met_by, sla.escalate_to) == (
        "first_sales_contact", T0 + days(1), "contact", "sales-manager")
    lead.tick(T0 + days(1))
    fx = lead.take_effects()
    [escalation] = outbound_of(fx, OutboundKind.ESCALATION)
    assert escalation.payload["escalate_to"] == "sales-manager"
    assert escalation.payload["stage"] == "sql"


def test_next_wakeup_is_the_earliest_timer():
    lead = new_lead()
    assert lead.next_wakeup() == T0 + days(1)  # nurture only
    lead.tick(T0 + days(11))  # all nurture sent
    assert lead.next_wakeup() is None
    feed(lead, "website_visit", T0 + days(12))
    assert lead.next_wakeup() == T0 + days(42)  # decay
    feed(lead, "webinar_attended", T0 + days(13))
    assert lead.next_wakeup() == T0 + days(13) + hours(12)  # the follow-up SLA


# --------------------------------------------------------------------------- decay back to recycled


def test_an_mql_nobody_accepts_decays_below_threshold_and_goes_back_to_recycled():
    lead = mql_lead()
    woke = run_until(lead, T0 + days(30))
    assert woke == [T0 + days(2), T0 + days(30)]  # the SLA breach, then the first decay
    s = lead.state
    assert s.stage == Stage.RECYCLED
    assert s.history[-1].trigger == Trigger.DECAY_BELOW_THRESHOLD
    fx = lead.take_effects()
    assert stage_changes(fx) == [(Stage.MQL, Stage.RECYCLED, "decay_below_threshold")]
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.detail == "mql -> recycled: decayed below threshold before acceptance (inactivity_decay)"
    assert (change.actor, change.role.value) == ("leadflow", "system")
    details = [a.detail for a in of_kind(fx, AuditKind.SCORE_CHANGED)]
    assert details == ["\u221225 inactivity decay (25% after 30d without activity)",
                       "\u221275 engagement reset on recycle"]
    assert s.score.total == 0
    assert s.cool_off_until == T0 + days(60)
    assert s.nurture.track == "recycled"


def test_an_mql_that_stays_above_threshold_after_decay_stays_an_mql():
    lead = new_lead()
    lead.update_profile(facts("p-1", target_account=True, company_size=100, industry="finance", seniority="vp",
                              country="AT"), T0)  # fit 60
    feed(lead, "demo_request", T0)
    lead.tick(T0 + days(30))
    assert lead.state.score.total == 135
    assert lead.state.stage == Stage.MQL


def test_on_mql_decay_stay_keeps_the_mql():
    lead = mql_lead(variant(('on_mql_decay = "recycle"', 'on_mql_decay = "stay"')))
    lead.tick(T0 + days(30))
    assert lead.state.score.total == 75
    assert lead.state.stage == Stage.MQL


def test_an_accepted_lead_is_not_recycled_by_decay():
    lead = mql_lead()
    lead.execute(Accept(by=PRESALES), T0)
    lead.tick(T0 + days(90))
    assert lead.state.stage == Stage.SAL
    assert lead.state.score.total < 100


# --------------------------------------------------------------------------- cool-off and requalify


def test_a_recycled_lead_cannot_requalify_during_cool_off_but_does_after():
    lead = recycled_lead()
    assert lead.state.cool_off_until == T0 + days(30)
    feed(lead, "webinar_attended", T0 + days(10))
    feed(lead, "event_attended", T0 + days(10))
    assert lead.state.score.total == 100
    assert lead.state.stage == Stage.RECYCLED  # cooling off
    assert stage_changes(lead.take_effects()) == []
    woke = run_until(lead, T0 + days(30))
    assert woke == [T0 + days(10) + hours(12), T0 + days(14), T0 + days(30)]
    s = lead.state
    assert s.stage == Stage.MQL
    assert s.history[-1].trigger == Trigger.REQUALIFY and s.stage_since == T0 + days(30)
    fx = lead.take_effects()
    assert stage_changes(fx) == [(Stage.RECYCLED, Stage.MQL, "requalify")]
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.detail == "recycled -> mql: requalified after cool-off (score 100)"
    [handover] = outbound_of(fx, OutboundKind.HANDOVER)
    p = handover.payload
    assert (p["stage"], p["score"], p["trigger"]) == ("mql", 100, "requalify")
    assert p["reason"] == "score 100 reached the MQL threshold 100"
    assert s.handovers == 2
    assert s.cool_off_until is None
    assert [x.name for x in s.slas] == ["presales_decision"]


def test_after_cool_off_a_lead_without_enough_score_stays_recycled_until_it_earns_it():
    lead = recycled_lead()
    lead.tick(T0 + days(30))
    assert lead.state.stage == Stage.RECYCLED and lead.state.cool_off_until is None
    feed(lead, "webinar_attended", T0 + days(31))
    assert lead.state.stage == Stage.RECYCLED
    feed(lead, "event_attended", T0 + days(31))
    assert lead.state.stage == Stage.MQL
    assert lead.state.history[-1].trigger == Trigger.REQUALIFY


def test_a_demo_request_during_cool_off_requalifies_at_once():
    """A hand-raiser is not made to wait out a cool-off (thresholds.fast_track_ends_cool_off)."""
    lead = recycled_lead()
    lead.ingest(event("d-2", "demo_request", T0 + days(5)), T0 + days(5))
    assert lead.state.stage == Stage.MQL
    assert lead.state.stage_since == T0 + days(5)
    [change] = of_kind(lead.take_effects(), AuditKind.STAGE_CHANGED)
    assert change.detail == "recycled -> mql: requalified after cool-off (demo_request)"


def test_a_demo_request_requalifies_only_after_cool_off_when_configured_so():
    lead = recycled_lead(variant(("fast_track_ends_cool_off = true", "fast_track_ends_cool_off = false")))
    lead.ingest(event("d-2", "demo_request", T0 + days(5)), T0 + days(5))
    assert lead.state.stage == Stage.RECYCLED
    lead.take_effects()
    lead.tick(T0 + days(30))  # the points are there: requalify at the end of the cool-off
    assert lead.state.stage == Stage.MQL

    other = recycled_lead(lead_id="L-9")
    other.tick(T0 + days(30))
    other.ingest(event("d-2", "demo_request", T0 + days(31), lead_id="L-9"), T0 + days(31))
    assert other.state.stage == Stage.MQL
    [change] = of_kind(other.take_effects(), AuditKind.STAGE_CHANGED)
    assert change.detail == "recycled -> mql: requalified after cool-off (demo_request)"


def test_a_requalification_after_cool_off_works_without_a_tick():
    """If the event arrives after the cool-off but before the wakeup ran, the lead still requalifies."""
    lead = recycled_lead()
    feed(lead, "demo_request", T0 + days(30))
    assert lead.state.stage == Stage.MQL


def test_a_lost_lead_returns_to_recycled_after_the_lost_cool_off():
    lead = lost_lead()
    assert lead.state.cool_off_until == T0 + days(90)
    lead.tick(T0 + days(90) - hours(1))
    assert lead.state.stage == Stage.LOST
    assert lead.next_wakeup() == T0 + days(90)
    lead.take_effects()
    lead.tick(T0 + days(90))
    s = lead.state
    assert s.stage == Stage.RECYCLED
    assert s.history[-1].trigger == Trigger.COOL_OFF_ENDED
    fx = lead.take_effects()
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.detail == "lost -> recycled: lost deal back to nurturing after cool-off (cool_off)"
    assert s.cool_off_until is None  # the lost cool-off was served already
    assert s.score.engagement == 0
    assert s.nurture.track == "recycled" and s.nurture.next_at == T0 + days(104)
    feed(lead, "demo_request", T0 + days(91))  # may requalify at once
    assert lead.state.stage == Stage.MQL


def test_a_manager_may_reopen_a_lost_lead_before_its_cool_off_ends():
    lead = lost_lead()
    lead.execute(Reopen(by=MANAGER, reason="budget_found"), T0 + days(10))
    assert lead.state.stage == Stage.RECYCLED
    assert lead.state.cool_off_until == T0 + days(40)


def test_engagement_is_reset_on_recycle_and_counts_start_again():
    lead = mql_lead()
    feed(lead, "newsletter_signup", T0)
    lead.update_profile(facts("p-1", target_account=True), T0)
    lead.execute(Reject(by=PRESALES, reason="not_now", recycle=True), T0 + hours(1))
    s = lead.state
    assert (s.score.fit, s.score.engagement) == (20, 0)
    assert s.score.breakdown == {"fit:target_account": 20, "demo_request": 100, "newsletter_signup": 20,
                                 "recycle_reset": -120}
    assert lead.view().next_decay_at is None
    feed(lead, "newsletter_signup", T0 + days(1))  # counts again after the reset
    assert s.score.engagement == 20


def test_engagement_can_be_kept_on_recycle():
    lead = recycled_lead(variant(("reset_engagement_on_recycle = true", "reset_engagement_on_recycle = false")))
    assert lead.state.score.engagement == 100
    assert lead.state.stage == Stage.RECYCLED
    feed(lead, "website_visit", T0 + days(20))  # 101, and no decay before day 50
    assert lead.state.stage == Stage.RECYCLED  # cooling off
    lead.tick(T0 + days(30))  # still above the threshold when the cool-off ends: requalify
    assert lead.state.stage == Stage.MQL
    assert lead.state.score.total == 101


@pytest.mark.parametrize("make", [mql_lead, recycled_lead, lost_lead, sql_lead, new_lead])
def test_a_tick_twice_at_the_same_time_does_nothing_new(make):
    lead = make()
    at = T0 + days(95)
    lead.tick(at)
    lead.take_effects()
    before = lead.state.model_dump()
    lead.tick(at)
    fx = lead.take_effects()
    assert fx.audit == [] and fx.outbound == []
    assert lead.state.model_dump() == before
    assert lead.next_wakeup() is None or lead.next_wakeup() > at


def test_every_wakeup_is_strictly_later_after_its_tick():
    """The workflow's loop must never spin: after tick(next_wakeup()) the next wakeup moves on."""
    lead = new_lead()
    feed(lead, "webinar_attended", T0)
    feed(lead, "demo_request", T0 + days(1))
    woke = run_until(lead, T0 + days(400))
    assert woke == sorted(set(woke))
    assert lead.next_wakeup() is None or lead.next_wakeup() > T0 + days(400)


def test_a_late_tick_still_breaches_an_sla_that_was_due_before_the_lead_was_recycled():
    """tick fires every timer due at or before now: a missed deadline is escalated, not cancelled."""
    lead = mql_lead()
    lead.tick(T0 + days(31))  # e.g. the worker was down: the SLA (day 2) and the decay (day 30) are both due
    fx = lead.take_effects()
    assert [a.rule for a in of_kind(fx, AuditKind.SLA_BREACHED)] == ["presales_decision"]
    assert of_kind(fx, AuditKind.SLA_CANCELLED) == []
    [escalation] = outbound_of(fx, OutboundKind.ESCALATION)
    assert escalation.payload["stage"] == "mql"
    assert lead.state.stage == Stage.RECYCLED
    assert lead.state.escalations == 1


def test_switching_to_a_model_with_fewer_nurture_steps_ends_the_track_instead_of_crashing():
    shorter = variant(('version = "1"', 'version = "2"'),
                      (('[[nurture.iql]]\nname = "case-study"\nafter = "3d"\n[[nurture.iql]]\nname = "webinar-invite"\n'
                       'after = "7d"\n'), ''))
    lead = new_lead()
    lead.tick(T0 + days(1))  # welcome sent; the old model's next step would be case-study
    lead.use_model(shorter, T0 + days(2))
    lead.take_effects()
    assert lead.state.nurture is None
    assert lead.view().next_nurture_step is None
    lead.tick(T0 + days(20))
    assert outbound_of(lead.take_effects(), OutboundKind.NURTURE_STEP) == []  # nothing more to send


def test_switching_to_a_model_with_the_same_track_keeps_the_schedule():
    v2 = variant(('version = "1"', 'version = "2"'))
    lead = new_lead()
    lead.tick(T0 + days(1))
    lead.use_model(v2, T0 + days(2))
    assert lead.view().next_nurture_step == {"track": "iql", "step": "case-study", "at": iso(T0 + days(4))}


def test_recycling_resets_interest_but_not_negative_criteria():
    """An unsubscribe is not forgiven by a recycle: its -20 and its count-once stay."""
    lead = new_lead()
    for kind in ["unsubscribe", "webinar_attended", "demo_request"]:
        feed(lead, kind, T0)
    assert lead.state.stage == Stage.MQL and lead.state.score.engagement == 130
    lead.execute(Reject(by=PRESALES, reason="not_now", recycle=True), T0)
    assert lead.state.stage == Stage.RECYCLED
    assert lead.state.score.engagement == -20
    assert {k: v for k, v in lead.state.score.breakdown.items() if k != "recycle_reset"} == {
        "unsubscribe": -20, "webinar_attended": 50, "demo_request": 100}
    feed(lead, "unsubscribe", T0 + hours(1))
    assert lead.state.score.engagement == -20, "count_once is still remembered"


# --------------------------------------------------------------------------- SAL: presales qualification SLA


def test_presales_qualification_sla_is_set_on_acceptance_and_met_when_qualified_in_time():
    lead = mql_lead()
    lead.execute(Accept(by=PRESALES), T0 + hours(2))
    [sla] = lead.state.slas
    assert (sla.name, sla.started_at, sla.due_at, sla.met_by, sla.stage, sla.escalate_to) == (
        "presales_qualification", T0 + hours(2), T0 + hours(2) + days(5), "stage_exit", Stage.SAL, "presales-lead")
    [sla_set] = of_kind(lead.take_effects(), AuditKind.SLA_SET)
    assert sla_set.detail == f"SLA presales_qualification due {iso(T0 + hours(2) + days(5))} (5d after stage sal)"
    assert lead.next_wakeup() == T0 + hours(2) + days(5)
    lead.tick(T0 + days(4))
    assert of_kind(lead.take_effects(), AuditKind.SLA_BREACHED) == []
    lead.execute(Qualify(by=PRESALES, bant=BANT_3), T0 + days(4))
    fx = lead.take_effects()
    [met] = of_kind(fx, AuditKind.SLA_MET)
    assert met.detail == (f"SLA presales_qualification met after 3d 22h (due {iso(T0 + hours(2) + days(5))})")
    assert (met.rule, met.actor) == ("presales_qualification", "pia")
    assert outbound_of(fx, OutboundKind.ESCALATION) == []
    assert [x.name for x in lead.state.slas] == ["first_sales_contact"]
    lead.execute(LogContact(by=SALES), T0 + days(4))  # sales meets its own SLA
    lead.tick(T0 + days(10))
    fx = lead.take_effects()
    assert of_kind(fx, AuditKind.SLA_BREACHED) == [] and outbound_of(fx, OutboundKind.ESCALATION) == []
    assert lead.state.escalations == 0


def test_a_rejection_of_an_accepted_lead_in_time_also_meets_the_qualification_sla():
    lead = sal_lead()
    lead.execute(Reject(by=PRESALES, reason="no_budget"), T0 + days(1))
    fx = lead.take_effects()
    assert [(a.rule, a.actor) for a in of_kind(fx, AuditKind.SLA_MET)] == [("presales_qualification", "pia")]
    assert lead.state.slas == []
    lead.tick(T0 + days(6))
    assert outbound_of(lead.take_effects(), OutboundKind.ESCALATION) == []


def test_presales_qualification_sla_is_breached_and_escalated_when_nobody_qualifies():
    lead = sal_lead()
    lead.tick(T0 + days(5) - hours(1))
    assert lead.take_effects().outbound == []
    lead.tick(T0 + days(5))
    fx = lead.take_effects()
    [breach] = of_kind(fx, AuditKind.SLA_BREACHED)
    assert breach.detail == f"SLA presales_qualification breached after 5d (due {iso(T0 + days(5))})"
    assert (breach.rule, breach.actor) == ("presales_qualification", "leadflow")
    [escalation] = outbound_of(fx, OutboundKind.ESCALATION)
    assert escalation.payload == {"stage": "sal", "sla": "presales_qualification", "escalate_to": "presales-lead",
                                  "due_at": iso(T0 + days(5)), "owner": None}
    assert escalation.at == T0 + days(5)
    assert lead.state.escalations == 1 and lead.state.slas == []
    assert lead.state.stage == Stage.SAL  # a breach escalates; it does not move the lead
    lead.tick(T0 + days(6))  # once only
    assert outbound_of(lead.take_effects(), OutboundKind.ESCALATION) == []
    lead.execute(Qualify(by=PRESALES, bant=BANT_3), T0 + days(7))  # a late qualification does not "meet" it
    assert [a.rule for a in of_kind(lead.take_effects(), AuditKind.SLA_MET)] == []


def test_presales_qualification_sla_escalates_to_whom_and_when_the_model_says():
    model = variant(('name = "presales_qualification"   # an accepted lead gets qualified or rejected\n'
                     'on_stage = "sal"\ndue = "5d"\nmet_by = "stage_exit"\nescalate_to = "presales-lead"',
                     'name = "presales_qualification"\non_stage = "sal"\ndue = "3d"\nmet_by = "stage_exit"\n'
                     'escalate_to = "head-of-presales"'))
    lead = sal_lead(model)
    [sla] = lead.state.slas
    assert (sla.due_at, sla.escalate_to) == (T0 + days(3), "head-of-presales")
    lead.tick(T0 + days(3))
    [escalation] = outbound_of(lead.take_effects(), OutboundKind.ESCALATION)
    assert (escalation.payload["sla"], escalation.payload["escalate_to"]) == ("presales_qualification",
                                                                              "head-of-presales")


def test_a_late_tick_breaches_the_qualification_sla_at_its_own_due_time():
    """The worker was down: the breach is stamped when it was due, and the lead stays accepted."""
    lead = sal_lead()
    lead.tick(T0 + days(40))
    fx = lead.take_effects()
    [breach] = of_kind(fx, AuditKind.SLA_BREACHED)
    assert breach.rule == "presales_qualification" and breach.occurred_at == T0 + days(5)
    [escalation] = outbound_of(fx, OutboundKind.ESCALATION)
    assert escalation.at == T0 + days(5)
    assert lead.state.stage == Stage.SAL


# --------------------------------------------------------------------------- durations people read


@pytest.mark.parametrize("value,text", [
    (timedelta(0), "0s"),
    (timedelta(seconds=-5), "0s"),  # a clock behind: never a negative duration
    (timedelta(seconds=59), "59s"),
    (timedelta(minutes=4, seconds=10), "4m 10s"),
    (timedelta(hours=13), "13h 0m"),
    (timedelta(days=2, hours=3), "2d 3h"),
    (timedelta(days=7), "7d"),
    (timedelta(days=14, minutes=30), "14d"),
])
def test_humanize_reads_as_people_write_durations(value, text):
    assert humanize(value) == text


def test_an_sla_met_at_once_says_0s_not_0w():
    """The complaint was "met after 0w": a zero duration is "0s"."""
    lead = mql_lead()
    lead.execute(Accept(by=PRESALES), T0)  # accepted the moment it became an MQL
    [met] = of_kind(lead.take_effects(), AuditKind.SLA_MET)
    assert met.detail == f"SLA presales_decision met after 0s (due {iso(T0 + days(2))})"
    lead.execute(Qualify(by=PRESALES, bant=BANT_3), T0)
    [met] = of_kind(lead.take_effects(), AuditKind.SLA_MET)
    assert met.detail == f"SLA presales_qualification met after 0s (due {iso(T0 + days(5))})"
