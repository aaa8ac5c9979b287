"""The lead as a function of what happened and when: late and old input, one stage
timeline, consent, hand-raisers, caps per window and model changes, driven through
`Lead` with fixed times (the properties over random sets are in
test_event_time_properties.py)."""

from __future__ import annotations

from datetime import timedelta

from funnel.kpis import SlaRun, lead_slas
from funnel.lead import Lead
from funnel.models import AuditKind, LeadState, OutboundKind, ProfileUpdate, Stage, Trigger
from tests.funnel_helpers import (
    LEAD,
    PRESALES,
    SALES,
    T0,
    Accept,
    LogContact,
    Reject,
    days,
    default_model,
    event,
    facts,
    feed,
    hours,
    mql_lead,
    new_lead,
    of_kind,
    outbound_of,
    stage_changes,
    variant,
)

MINUS = "\u2212"
MODEL = default_model()


def details(effects, kind=AuditKind.SCORE_CHANGED) -> list[str]:
    return [a.detail for a in of_kind(effects, kind)]


# --------------------------------------------------------------------------- late events


def test_four_visits_score_the_same_newest_first_and_the_late_ones_say_so():
    """The issue's example: 6.5 in time order, 4.0 newest first. Now 6.5 both ways."""
    in_order, newest_first = new_lead(), new_lead()
    times = [T0 + days(d) for d in (0, 1, 2, 3)]
    for i, t in enumerate(times):
        in_order.ingest(event(f"v-{i}", "website_visit", t), T0 + days(3))
    for i, t in reversed(list(enumerate(times))):
        newest_first.ingest(event(f"v-{i}", "website_visit", t), T0 + days(3))
    assert in_order.state.score == newest_first.state.score
    assert newest_first.state.score.breakdown == {"website_visit": 6.5}
    assert details(newest_first.take_effects()) == [
        "+1 website_visit (event v-3)",
        "+1 website_visit (late event v-2 of 2026-01-03)",
        "+0.5 website_visit: late event v-2 of 2026-01-03 re-scored the window",
        "+1 website_visit (late event v-1 of 2026-01-02)",
        "+1 website_visit: late event v-1 of 2026-01-02 re-scored the window",
        "+1 website_visit (late event v-0 of 2026-01-01)",
        "+1 website_visit: late event v-0 of 2026-01-01 re-scored the window",
    ]


def test_a_late_event_undoes_the_decay_it_would_have_prevented():
    lead = new_lead()
    feed(lead, "webinar_attended", T0)
    lead.tick(T0 + days(35))  # decay at day 30: 50 -> 37.5
    assert lead.state.score.engagement == 37.5
    lead.take_effects()
    lead.ingest(event("late", "website_visit", T0 + days(20)), T0 + days(36))  # it happened before the decay
    assert lead.state.score.breakdown == {"webinar_attended": 50, "website_visit": 1}
    fx = lead.take_effects()
    assert details(fx) == [
        "+1 website_visit (event late)",
        "+12.5 decay: event late of 2026-01-21, received after the decay it prevents, re-scored the window",
    ]
    [entry] = [a for a in of_kind(fx, AuditKind.SCORE_CHANGED) if a.rule == "decay"]
    assert entry.occurred_at == T0 + days(20) and entry.at == T0 + days(36)  # when it happened, when recorded
    assert lead.view().next_decay_at == T0 + days(50)


def test_every_entry_carries_when_its_cause_happened_and_when_it_was_recorded():
    lead = new_lead()
    lead.ingest(event("e-1", "webinar_attended", T0 - hours(5)), T0)
    [entry] = of_kind(lead.take_effects(), AuditKind.SCORE_CHANGED)
    assert (entry.occurred_at, entry.at) == (T0 - hours(5), T0)
    assert entry.happened_at == T0 - hours(5)


# --------------------------------------------------------------------------- one timeline


def test_a_backlog_decides_on_one_timeline_and_the_mql_decays_from_its_entry():
    """Events of 61 days arrive in one batch: the old code made iql->mql at day 61 and
    mql->recycled at day 40 (-21 days in MQL). Now every stage change is at or after the
    one before, and the decay that recycles the MQL counts from its MQL entry."""
    lead = new_lead(now=T0)
    batch = [event("w", "webinar_attended", T0), event("s", "sample_request", T0 + days(5)),
             event("c", "event_attended", T0 + days(61))]
    lead.ingest_many(batch, T0 + days(61))  # 110, decayed to 82.5 at day 35, +50 at day 61
    assert lead.state.stage == Stage.MQL
    entered = lead.state.stage_since
    assert entered == T0 + days(61)
    lead.tick(T0 + days(120))
    stamps = [v.entered_at for v in lead.state.history]
    assert stamps == sorted(stamps)
    assert lead.state.stage == Stage.RECYCLED
    assert lead.state.history[-1].trigger == Trigger.DECAY_BELOW_THRESHOLD
    assert lead.state.stage_since >= entered + days(30)


def test_a_command_never_stamps_a_stage_change_before_the_one_before_it():
    lead = mql_lead(now=T0 + days(2))
    lead.execute(Accept(by=PRESALES), T0 + days(1))  # a clock behind the lead's timeline
    assert lead.state.stage_since == T0 + days(2)


# --------------------------------------------------------------------------- backfill is not news


def test_last_years_history_scores_but_pages_nobody():
    now = T0 + days(400)
    lead = new_lead(now=now)
    old = [event("w", "webinar_attended", T0), event("d", "demo_request", T0 + hours(1)),
           event("s", "sample_request", T0 + hours(2))]
    lead.ingest_many(old, now)
    lead.tick(now + days(1))
    fx = lead.take_effects()
    assert lead.state.stage == Stage.IQL
    assert outbound_of(fx, OutboundKind.HANDOVER) == [] and outbound_of(fx, OutboundKind.ESCALATION) == []
    [note] = of_kind(fx, AuditKind.NOT_HANDED_OVER)
    assert note.detail == "demo_request d of 2026-01-01T01:00:00+00:00 is older than 1w when it arrived: scored, not fast-tracked"
    [late] = of_kind(fx, AuditKind.SLA_LATE_DATA)
    assert late.rule == "webinar_follow_up"
    assert "demo_request" in lead.state.score.breakdown  # it scored (and decayed)
    decay = [a.detail for a in of_kind(fx, AuditKind.SCORE_CHANGED) if a.rule == "decay"]
    assert decay[0] == f"{MINUS}52.5 inactivity decay (25% after 30d without activity)"  # step by step, as it happened
    assert all("inactivity decay" in d for d in decay)


def test_a_strong_old_history_is_handed_over_when_the_lead_is_active_again():
    now = T0 + days(10)
    lead = new_lead(now=now)
    lead.ingest_many([event("w", "webinar_attended", T0), event("s", "sample_request", T0)], now - days(0))
    assert lead.state.stage == Stage.MQL  # ten days old: within the 30-day max age

    week = variant(('score_threshold = "30d"', 'score_threshold = "7d"'))
    stale = new_lead(week, now=T0 + days(10), lead_id="L-8")
    stale.ingest_many([event("w", "webinar_attended", T0, lead_id="L-8"),
                       event("s", "sample_request", T0, lead_id="L-8")], T0 + days(10))
    assert stale.state.score.total >= 100 and stale.state.stage == Stage.IQL  # old activity: not news
    stale.ingest(event("v", "website_visit", T0 + days(11), lead_id="L-8"), T0 + days(11))
    assert stale.state.stage == Stage.MQL  # active now: presales should hear of it


# --------------------------------------------------------------------------- the horizon


def test_an_event_beyond_the_horizon_counts_its_negative_points_and_consent_only():
    short = variant(('horizon = "365d"', 'horizon = "10d"'))
    lead = new_lead(short)
    feed(lead, "newsletter_signup", T0)
    feed(lead, "webinar_attended", T0 + days(20))  # the window now starts at day 10: newsletter folded
    assert lead.view().rescoring_from == T0 + days(20) or lead.view().rescoring_from is not None
    lead.take_effects()
    lead.ingest(event("old-visit", "pricing_page_visit", T0 + days(1)), T0 + days(21))
    lead.ingest(event("old-unsub", "unsubscribe", T0 + days(2)), T0 + days(21))
    fx = lead.take_effects()
    assert details(fx) == [
        "+0 pricing_page_visit: late event old-visit of 2026-01-02: beyond the rescoring horizon (10d)",
        f"{MINUS}20 unsubscribe: late event old-unsub of 2026-01-03",
    ]
    assert lead.state.score.breakdown["unsubscribe"] == -20
    assert "pricing_page_visit" not in lead.state.score.breakdown
    assert lead.consent().email is False and lead.consent().source == "unsubscribe old-unsub"


def test_the_window_stays_bounded_by_count():
    small = variant(("max_events = 500", "max_events = 10"))
    lead = new_lead(small)
    for i in range(100):
        feed(lead, "email_open", T0 + timedelta(minutes=i))
    assert len(lead.state.engagement.window) == 10
    assert lead.state.score.breakdown == {"email_open": 20}


# --------------------------------------------------------------------------- consent


def test_nobody_is_mailed_after_an_unsubscribe_and_the_history_says_why():
    lead = new_lead()
    feed(lead, "newsletter_signup", T0)
    lead.ingest(event("u-1", "unsubscribe", T0 + hours(2)), T0 + hours(2))
    lead.tick(T0 + days(20))
    fx = lead.take_effects()
    assert outbound_of(fx, OutboundKind.NURTURE_STEP) == []
    assert details(fx, AuditKind.NURTURE_STEP_SKIPPED) == [
        "nurture iql step welcome skipped: no consent since 2026-01-01T02:00:00+00:00 (unsubscribe u-1)",
        "nurture iql step case-study skipped: no consent since 2026-01-01T02:00:00+00:00 (unsubscribe u-1)",
        "nurture iql step webinar-invite skipped: no consent since 2026-01-01T02:00:00+00:00 (unsubscribe u-1)",
    ]
    view = lead.view()
    assert view.consent == {"email": False, "since": "2026-01-01T02:00:00+00:00", "source": "unsubscribe u-1"}


def test_every_change_of_email_consent_is_in_the_history_with_its_source_and_time():
    lead = new_lead()
    feed(lead, "newsletter_signup", T0)  # consent as it was: nothing to say
    assert details(lead.take_effects(), AuditKind.CONSENT_CHANGED) == []
    lead.ingest(event("u-1", "unsubscribe", T0 + hours(2)), T0 + hours(2))
    lead.ingest(event("u-2", "unsubscribe", T0 + hours(3)), T0 + hours(3))  # no change: no second entry
    lead.ingest(event("r-1", "resubscribe", T0 + hours(5)), T0 + hours(5))
    lead.update_profile(ProfileUpdate(update_id="p-1", lead_id=LEAD, observed_at=T0 + hours(6), facts={
        "email_consent": False, "email_consent_source": "preference centre"}), T0 + hours(6))
    fx = lead.take_effects()
    assert details(fx, AuditKind.CONSENT_CHANGED) == [
        "email consent: may not be mailed since 2026-01-01T02:00:00+00:00 (unsubscribe u-1)",
        "email consent: may be mailed again since 2026-01-01T05:00:00+00:00 (resubscribe r-1)",
        "email consent: may not be mailed since 2026-01-01T06:00:00+00:00 (profile update p-1 (preference centre))",
    ]
    assert [e.happened_at for e in of_kind(fx, AuditKind.CONSENT_CHANGED)] == [
        T0 + hours(2), T0 + hours(5), T0 + hours(6)]
    quiet = new_lead(explain=False)  # a workflow run of version 1-7 replays without these entries
    quiet.ingest(event("u-1", "unsubscribe", T0 + hours(2)), T0 + hours(2))
    assert details(quiet.take_effects(), AuditKind.CONSENT_CHANGED) == [] and quiet.consent().email is False


def test_a_bounce_or_spam_complaint_also_stops_mail_and_a_confirmed_resubscribe_restores_it():
    for kind in ("email_bounced", "spam_complaint"):
        lead = new_lead()
        lead.ingest(event("x", kind, T0), T0)
        assert lead.consent().email is False
        lead.ingest(event("r", "resubscribe", T0 + hours(12)), T0 + hours(12))
        assert lead.consent().email is True
        lead.tick(T0 + days(1))
        assert len(outbound_of(lead.take_effects(), OutboundKind.NURTURE_STEP)) == 1


def test_resubscribe_takes_the_objection_back_and_a_new_unsubscribe_counts_again():
    """Count-once does not swallow a second unsubscribe after a resubscribe."""
    lead = new_lead()
    for i, (kind, h) in enumerate([("unsubscribe", 0), ("resubscribe", 1), ("unsubscribe", 2)]):
        lead.ingest(event(f"e-{i}", kind, T0 + hours(h)), T0 + hours(h))
    assert lead.state.score.breakdown == {"unsubscribe": -20}
    assert lead.consent().email is False and lead.consent().source == "unsubscribe e-2"
    assert details(lead.take_effects()) == [
        f"{MINUS}20 unsubscribe (event e-0)",
        "+0 resubscribe (event e-1)",
        "+20 unsubscribe: taken back by resubscribe e-1",
        f"{MINUS}20 unsubscribe (event e-2)",
    ]


def test_consent_as_a_profile_fact_with_its_source_and_time():
    lead = new_lead()
    lead.update_profile(facts("p-1", email_consent=False, email_consent_at="2026-01-01T08:00:00Z",
                              email_consent_source="preference-center"), T0 + hours(9))
    assert lead.view().consent == {"email": False, "since": "2026-01-01T08:00:00+00:00",
                                   "source": "profile update p-1 (preference-center)"}
    lead.ingest(event("r", "resubscribe", T0 + hours(10)), T0 + hours(10))  # a later opt-in wins
    assert lead.consent().email is True


def test_a_hand_raiser_who_unsubscribed_is_still_handed_over_and_sales_sees_the_consent():
    lead = new_lead()
    lead.ingest_many([event("u", "unsubscribe", T0), event("d", "demo_request", T0 + hours(1))], T0 + hours(1))
    assert lead.state.stage == Stage.MQL
    [handover] = outbound_of(lead.take_effects(), OutboundKind.HANDOVER)
    assert handover.payload["email_consent"] is False
    assert handover.payload["reason"] == "fast-track: demo_request (event d at 2026-01-01T01:00:00+00:00)"


# --------------------------------------------------------------------------- hand-raisers and negative criteria


def test_a_competitor_asking_for_a_demo_goes_to_review_not_to_presales():
    lead = new_lead()
    lead.update_profile(facts("p-1", competitor=True), T0)
    lead.ingest(event("d", "demo_request", T0 + hours(1)), T0 + hours(1))
    assert lead.state.stage == Stage.IQL
    fx = lead.take_effects()
    assert outbound_of(fx, OutboundKind.HANDOVER) == []
    [review] = outbound_of(fx, OutboundKind.REVIEW)
    assert review.payload["reason"] == "fit rule competitor blocks fast-track"
    assert review.payload["event"]["event_id"] == "d"
    [blocked] = of_kind(fx, AuditKind.FAST_TRACK_BLOCKED)
    assert blocked.detail == ("fast-track demo_request (event d) not handed to presales: fit rule competitor"
                              " blocks it; sent for review")


def test_the_decision_delay_decides_a_demo_request_and_a_fact_that_arrive_together():
    """A demo request and, a second later, the CRM's `competitor` fact: decided together."""
    lead = new_lead(decision_delay=timedelta(seconds=5))
    lead.ingest(event("d", "demo_request", T0), T0)
    assert lead.state.stage == Stage.IQL and lead.view().decision_due_at == T0 + timedelta(seconds=5)
    lead.update_profile(facts("p-1", competitor=True), T0 + timedelta(seconds=1))
    lead.tick(T0 + timedelta(seconds=5))
    fx = lead.take_effects()
    assert lead.state.stage == Stage.IQL
    assert len(outbound_of(fx, OutboundKind.REVIEW)) == 1 and outbound_of(fx, OutboundKind.HANDOVER) == []


def test_negative_criteria_recycle_an_unaccepted_mql_that_came_by_score():
    lead = new_lead()
    lead.ingest_many([event("w", "webinar_attended", T0), event("s", "sample_request", T0)], T0)
    assert lead.state.stage == Stage.MQL and lead.state.score.total == 110
    lead.take_effects()
    lead.ingest(event("u", "unsubscribe", T0 + hours(1)), T0 + hours(1))
    assert lead.state.stage == Stage.RECYCLED
    assert stage_changes(lead.take_effects()) == [(Stage.MQL, Stage.RECYCLED, "negative_criteria")]


def test_a_hand_raised_mql_stays_with_presales_whatever_else_it_did():
    lead = mql_lead()  # by a demo request
    lead.ingest(event("u", "unsubscribe", T0 + hours(1)), T0 + hours(1))
    assert lead.state.stage == Stage.MQL and lead.state.score.total == 80


# --------------------------------------------------------------------------- caps per window


def test_caps_count_per_window_so_a_lead_back_after_a_cold_year_scores_again():
    lead = new_lead()
    for i in range(40):
        feed(lead, "website_visit", T0 + timedelta(minutes=i))
    assert lead.state.score.breakdown["website_visit"] == 30
    for i in range(5):
        feed(lead, "website_visit", T0 + days(365) + timedelta(minutes=i))
    assert lead.state.score.breakdown["website_visit"] == 30 + 1 + 1.5 + 2 + 2 + 2


# --------------------------------------------------------------------------- model changes


def test_a_model_change_rescores_and_says_from_what_to_what():
    lead = new_lead()
    lead.update_profile(facts("p-1", target_account=True), T0)
    feed(lead, "website_visit", T0)
    feed(lead, "webinar_attended", T0 + hours(1))
    feed(lead, "live_chat", T0 + hours(2))
    assert lead.state.score.total == 86
    lead.take_effects()
    v2 = variant(('version = "1"', 'version = "2"'), ("[events.live_chat]\npoints = 15", "[events.live_chat]\npoints = 30"))
    lead.use_model(v2, T0 + hours(3))
    fx = lead.take_effects()
    assert details(fx) == ["+15 live_chat: model default@2 re-scored the window"]
    assert details(fx, AuditKind.MODEL_CHANGED) == ["scoring model default@1 \u2192 default@2: 86 \u2192 101"]
    assert lead.state.stage == Stage.MQL  # newly over the threshold


def test_a_model_change_demotes_nobody():
    lead = new_lead()
    lead.ingest_many([event("w", "webinar_attended", T0), event("s", "sample_request", T0)], T0)
    lead.execute(Accept(by=PRESALES), T0 + hours(1))
    lower = variant(('version = "1"', 'version = "2"'), ("mql = 100", "mql = 500"))
    lead.use_model(lower, T0 + hours(2))
    assert lead.state.stage == Stage.SAL
    recycled = new_lead(lead_id="L-8")
    recycled.ingest_many([event("w", "webinar_attended", T0, lead_id="L-8"),
                          event("s", "sample_request", T0, lead_id="L-8")], T0)
    recycled.use_model(lower, T0 + hours(2))
    assert recycled.state.stage == Stage.MQL  # by score, handed over: a person decides


# --------------------------------------------------------------------------- state from older code


def test_state_from_code_that_added_up_in_arrival_order_keeps_its_score():
    old = {
        "lead_id": LEAD, "created_at": T0.isoformat(), "stage": "iql", "stage_since": T0.isoformat(),
        "model_ref": "default@1", "profile": {"target_account": True},
        "score": {"fit": 20.0, "engagement": 62.5, "breakdown": {"fit:target_account": 20.0,
                                                                 "webinar_attended": 50.0, "website_visit": 32.5,
                                                                 "unsubscribe": -20.0}},
        "points_by_type": {"webinar_attended": 50.0, "website_visit": 32.5, "unsubscribe": -20.0},
        "count_by_type": {"webinar_attended": 1, "website_visit": 20, "unsubscribe": 1},
        "recent": [], "last_activity_at": (T0 + days(1)).isoformat(), "decay_steps": 0,
    }
    lead = Lead(LeadState.model_validate(old), MODEL)
    lead.use_model(MODEL, T0 + days(2))
    assert lead.state.score.total == 82.5
    assert lead.view().next_decay_at == T0 + days(31)
    lead.tick(T0 + days(31))
    # the positive 82.5 decays by 25%; the unsubscribe's -20 does not
    assert lead.state.score.engagement == round(82.5 * 0.75 - 20, 2)
    assert lead.state.score.breakdown["unsubscribe"] == -20
    lead.ingest(event("u2", "unsubscribe", T0 + days(32)), T0 + days(32))
    assert lead.state.score.breakdown["unsubscribe"] == -20  # still counted once


def test_an_events_score_change_says_which_integration_sent_it():
    lead = new_lead()
    lead.ingest(event("e-1", "webinar_attended", T0).model_copy(update={"source": "mautic"}), T0)
    [entry] = of_kind(lead.take_effects(), AuditKind.SCORE_CHANGED)
    assert entry.source == "mautic"


def test_beyond_its_memory_a_lead_asks_and_applies_each_id_once_ever():
    lead = new_lead(seen_ids_max=3)
    for i in range(3):
        feed(lead, "email_open", T0 + days(i), event_id=f"e-{i}")
    assert lead.forgets(["e-2", "e-9"]) == ["e-9"]  # full memory: it cannot tell e-9 by itself
    feed(lead, "email_open", T0 + days(3), event_id="e-3")  # e-0 leaves the memory
    assert lead.forgets(["e-0"]) == ["e-0"]
    lead.take_effects()
    before = lead.state.score.model_copy(deep=True)
    lead.ingest_many([event("e-0", "email_open", T0)], T0 + days(4), applied=frozenset({"e-0"}))
    assert lead.state.score == before and lead.state.duplicates_ignored == 1
    assert [a.kind for a in lead.take_effects().audit if a.kind != AuditKind.NURTURE_STEP_SENT] == [
        AuditKind.DUPLICATE_IGNORED]
    assert new_lead(lead_id="L-8").forgets(["x"]) == []  # with room in its memory it knows


def test_a_follow_up_deadline_counts_from_the_earliest_event_whatever_arrives_first():
    """Found by test_event_time_properties.py: the webinar follow-up counted from the first
    attendance to *arrive*, so an earlier one arriving late left the deadline an hour later
    (and named the later event). It counts from the earliest, as in time order; a run of
    version 11 or older (`orders_slas=False`) replays as it was decided."""
    def follow_up(lead: Lead) -> tuple:
        (sla,) = [x for x in lead.state.slas if x.name == "webinar_follow_up"]
        return sla.started_at, sla.due_at, sla.cause

    arrived = T0 + hours(2)
    in_order, late_first, as_before = new_lead(), new_lead(), new_lead(orders_slas=False)
    feed(in_order, "webinar_attended", T0, "w-early", now=arrived)
    feed(in_order, "webinar_attended", T0 + hours(1), "w-late", now=arrived)
    for lead in (late_first, as_before):
        feed(lead, "webinar_attended", T0 + hours(1), "w-late", now=arrived)
        feed(lead, "webinar_attended", T0, "w-early", now=arrived)
    assert follow_up(in_order) == (T0, T0 + hours(12), "event w-early")
    assert follow_up(late_first) == follow_up(in_order)
    moved = [e.detail for e in late_first.take_effects().audit
             if e.kind == AuditKind.SLA_SET and e.rule == "webinar_follow_up"]
    assert moved[-1].endswith("(12h after event w-early, which occurred before event w-late and arrived after it)")
    assert follow_up(as_before) == (T0 + hours(1), T0 + hours(13), "event w-late")
    # an earlier attendance whose deadline had passed when it arrived moves nothing
    stale = new_lead()
    feed(stale, "webinar_attended", T0 + hours(20), "w-new", now=T0 + hours(21))
    feed(stale, "webinar_attended", T0, "w-old", now=T0 + hours(21))
    assert follow_up(stale) == (T0 + hours(20), T0 + hours(32), "event w-new")


def test_a_moved_deadline_is_one_deadline_in_the_sla_report():
    """A deadline moved by an earlier event that arrived late (above) is the same deadline:
    the manager's SLA figures (funnel.kpis.lead_slas) count it once, met when the contact
    meets it, not once more as a deadline that stays open for ever."""
    in_order, late_first = new_lead(), new_lead()
    feed(in_order, "webinar_attended", T0, "w-early", now=T0 + hours(2))
    feed(in_order, "webinar_attended", T0 + hours(1), "w-late", now=T0 + hours(2))
    feed(late_first, "webinar_attended", T0 + hours(1), "w-late", now=T0 + hours(2))
    feed(late_first, "webinar_attended", T0, "w-early", now=T0 + hours(2))
    runs = []
    for lead in (in_order, late_first):
        lead.execute(LogContact(by=SALES), T0 + hours(3))
        runs.append(follow_ups_of(lead.take_effects()))
    assert runs[0] == [SlaRun(name="webinar_follow_up", owner="unassigned", outcome="met", took=3 * 3600.0)]
    assert runs[1] == runs[0]


def test_a_contact_meets_the_follow_up_of_an_event_that_occurred_before_it_and_arrived_after():
    """In time order a webinar at T0 opens its 12 h follow-up and sam's call at T0+2h meets
    it. Delivered late (the webinar tool's batch arrives at T0+3h, after the call) it opened
    the follow-up then, and escalated it at T0+12h though sam had called. A contact meets
    the deadline of an event that occurred before it, whenever the event arrives, and the
    SLA figures match time order; a run of version 12 or older (`meets_late_slas=False`)
    replays as it was decided."""
    in_order, late, as_before = new_lead(), new_lead(), new_lead(meets_late_slas=False)
    feed(in_order, "webinar_attended", T0, "w-1")
    in_order.execute(LogContact(by=SALES), T0 + hours(2))
    for lead in (late, as_before):
        lead.execute(LogContact(by=SALES), T0 + hours(2))
        feed(lead, "webinar_attended", T0, "w-1", now=T0 + hours(3))
    assert late.state.slas == in_order.state.slas == []  # met, nothing runs
    for lead in (in_order, late, as_before):
        lead.tick(T0 + hours(13))
    assert late.state.escalations == in_order.state.escalations == 0
    expected = follow_ups_of(in_order.take_effects())
    assert expected == [SlaRun(name="webinar_follow_up", owner="unassigned", outcome="met", took=2 * 3600.0)]
    effects = late.take_effects()
    assert follow_ups_of(effects) == expected
    (met,) = of_kind(effects, AuditKind.SLA_MET)
    assert (met.actor, met.occurred_at, met.reason) == (SALES.name, T0 + hours(2), "met_before_arrival")
    assert met.detail.endswith(f"by the contact of {(T0 + hours(2)).isoformat()}, before event w-1 arrived")
    assert as_before.state.escalations == 1  # as version 12 decided

    # A contact before the event meets nothing of it: the follow-up runs.
    after = new_lead()
    after.execute(LogContact(by=SALES), T0)
    feed(after, "webinar_attended", T0 + hours(1), "w-2", now=T0 + hours(2))
    assert "webinar_follow_up" in [x.name for x in after.state.slas]

    # The call met the late webinar's deadline, even if that passed before the webinar arrived,
    # and a running deadline of a later webinar stays where it is.
    both = new_lead()
    both.execute(LogContact(by=SALES), T0 + hours(2))
    feed(both, "webinar_attended", T0 + hours(3), "w-later", now=T0 + hours(4))
    feed(both, "webinar_attended", T0, "w-earlier", now=T0 + hours(14))
    (running,) = [x for x in both.state.slas if x.name == "webinar_follow_up"]
    assert (running.started_at, running.cause) == (T0 + hours(3), "event w-later")
    outcomes = sorted(r.outcome for r in follow_ups_of(both.take_effects()))
    assert outcomes == ["met", "open"]

    # The call met a later attendance's follow-up; the earlier one, arriving after the call,
    # started that same follow-up in time order: one deadline, met 2 h after it started.
    one = new_lead()
    feed(one, "webinar_attended", T0 + hours(1), "w-later")
    one.execute(LogContact(by=SALES), T0 + hours(2))
    feed(one, "webinar_attended", T0, "w-earlier", now=T0 + hours(3))
    assert follow_ups_of(one.take_effects()) == [
        SlaRun(name="webinar_follow_up", owner="unassigned", outcome="met", took=2 * 3600.0)]
    assert [(x.started_at, x.ended_at) for x in one.state.ended_slas] == [(T0, T0 + hours(2))]


def test_a_webinar_arriving_after_presales_recycled_the_lead_starts_no_follow_up():
    """Attendance at T0, presales recycles the lead at T0+2h ("not now"), the batch arrives at
    T0+3h. In time order the follow-up ran from T0 and the recycling cancelled it; it opened
    on arrival and escalated at T0+12h, for a lead presales had just sent back to nurture.
    Now it is recorded as set and cancelled (version 13); version 12 escalated."""
    now_, as_before = mql_lead(), mql_lead(meets_late_slas=False)
    for lead in (now_, as_before):
        lead.execute(Reject(by=PRESALES, reason="not_now", recycle=True), T0 + hours(2))
        feed(lead, "webinar_attended", T0, "w-1", now=T0 + hours(3))
        lead.tick(T0 + hours(13))
    assert (now_.state.stage, now_.state.slas, now_.state.escalations) == (Stage.RECYCLED, [], 0)
    effects = now_.take_effects()
    (cancelled,) = of_kind(effects, AuditKind.SLA_CANCELLED)
    assert (cancelled.occurred_at, cancelled.reason) == (T0 + hours(2), "cancelled_before_arrival")
    assert follow_ups_of(effects) == [SlaRun(name="webinar_follow_up", owner="unassigned", outcome="cancelled")]
    assert as_before.state.escalations == 1


def follow_ups_of(effects) -> list[SlaRun]:
    return [r for r in lead_slas(effects.audit).runs if r.name == "webinar_follow_up"]
