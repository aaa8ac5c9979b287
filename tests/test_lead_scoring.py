"""Every scoring rule kind, driven through `Lead`, with the default model's exact numbers."""

from __future__ import annotations

from datetime import timedelta

import pytest

from funnel.lead import FUTURE_TOLERANCE, Lead
from funnel.models import AuditKind, OutboundKind, Stage, Trigger
from tests.funnel_helpers import (
    MARKETING,
    T0,
    assert_score_consistent,
    counts,
    days,
    folded,
    default_model,
    event,
    facts,
    feed,
    hours,
    new_lead,
    of_kind,
    outbound_of,
    points_decay_model,
    stage_changes,
    variant,
)

DEFAULT = default_model()
MINUS = "\u2212"  # details use a real minus sign


def score_entries(lead: Lead):
    return of_kind(lead.take_effects(), AuditKind.SCORE_CHANGED)


# --------------------------------------------------------------------------- implicit points


@pytest.mark.parametrize("type_", sorted(DEFAULT.events))
def test_each_event_type_scores_its_points_once(type_):
    lead = new_lead()
    lead.ingest(event("x-1", type_, T0 + hours(1)), T0 + hours(1))
    points = DEFAULT.events[type_].points
    s = lead.state
    assert s.score.engagement == points
    assert s.score.fit == 0
    assert s.score.breakdown == ({type_: points} if points else {})
    assert counts(lead) == {type_: 1}
    assert s.events_applied == 1
    fx = lead.take_effects()
    [entry] = of_kind(fx, AuditKind.SCORE_CHANGED)
    sign = "+" if points >= 0 else MINUS
    assert entry.detail == f"{sign}{abs(points):g} {type_} (event x-1)"
    assert (entry.rule, entry.points, entry.event_id, entry.score_total) == (type_, points, "x-1", points)
    assert entry.at == T0 + hours(1)
    if DEFAULT.events[type_].activity:
        assert folded(lead).last_activity == T0 + hours(1)
    else:
        assert folded(lead).last_activity is None
    assert_score_consistent(lead)


def test_audit_detail_for_a_webinar_reads_like_the_docs():
    lead = new_lead()
    lead.ingest(event("e-19", "webinar_attended", T0, channel="webinar"), T0)
    [entry] = score_entries(lead)
    assert entry.detail == "+50 webinar_attended (event e-19)"
    assert entry.channel == "webinar"
    assert entry.score_engagement == 50 and entry.score_fit == 0 and entry.model_ref == "default@1"


def test_first_touch_channel_is_kept():
    lead = new_lead()
    lead.ingest(event("a", "website_visit", T0, channel="seo"), T0)
    lead.ingest(event("b", "webinar_attended", T0 + days(1), channel="webinar"), T0 + days(1))
    assert lead.state.channel == "seo"


def test_cap_per_type():
    """20 website visits in one day: 1, 1.5, then x2 each, until the cap of 30 is reached."""
    lead = new_lead()
    for i in range(1, 21):
        lead.ingest(event(f"w-{i}", "website_visit", T0 + timedelta(minutes=i)), T0 + timedelta(minutes=i))
    entries = score_entries(lead)
    assert [e.points for e in entries] == [1, 1.5] + [2] * 13 + [1.5] + [0] * 4
    assert lead.state.score.breakdown == {"website_visit": 30}
    assert entries[15].detail == "+1.5 website_visit (event w-16, x2: 16 in 1w, capped at 30 per 30d)"
    assert entries[19].detail == "+0 website_visit (event w-20, x2: 20 in 1w, capped at 30 per 30d)"
    assert counts(lead)["website_visit"] == 20
    assert lead.state.events_applied == 20


def test_cap_without_frequency_bonus():
    lead = new_lead(variant(("bonus = 0.5", "bonus = 0")))
    for i in range(12):
        feed(lead, "email_open", T0 + timedelta(minutes=i))
    assert [e.points for e in score_entries(lead)] == [2] * 10 + [0, 0]
    assert lead.state.score.engagement == 20


def test_count_once():
    lead = new_lead()
    lead.ingest(event("n-1", "newsletter_signup", T0), T0)
    lead.ingest(event("n-2", "newsletter_signup", T0 + days(1)), T0 + days(1))
    first, second = score_entries(lead)
    assert (first.points, second.points) == (20, 0)
    assert second.detail == "+0 newsletter_signup (event n-2: counts once)"
    assert lead.state.score.engagement == 20
    assert counts(lead)["newsletter_signup"] == 2


# --------------------------------------------------------------------------- negative criteria


def test_unsubscribe_subtracts_once_and_is_not_activity():
    lead = new_lead()
    feed(lead, "webinar_attended", T0)
    lead.ingest(event("u-1", "unsubscribe", T0 + days(2)), T0 + days(2))
    lead.ingest(event("u-2", "unsubscribe", T0 + days(3)), T0 + days(3))
    entries = score_entries(lead)
    assert entries[1].detail == f"{MINUS}20 unsubscribe (event u-1)"
    assert entries[1].points == -20
    assert entries[2].points == 0
    assert lead.state.score.total == 30
    assert lead.state.score.breakdown == {"webinar_attended": 50, "unsubscribe": -20}
    assert folded(lead).last_activity == T0  # the unsubscribe did not count as activity


def test_bounced_email_subtracts():
    lead = new_lead()
    feed(lead, "sample_request", T0)
    lead.ingest(event("b-1", "email_bounced", T0), T0)
    assert lead.state.score.total == 30
    assert score_entries(lead)[-1].detail == f"{MINUS}30 email_bounced (event b-1)"


def test_negative_points_are_never_multiplied_by_frequency():
    model = variant(("points = -20                      # (articles) negative criterion\nactivity = false\n"
                     "count_once = true", "points = -20\nactivity = false"))
    lead = new_lead(model)
    for i in range(3):
        feed(lead, "unsubscribe", T0 + hours(i))
    assert [e.points for e in score_entries(lead)] == [-20, -20, -20]


def test_competitor_fit_rule_qualifies_out():
    lead = new_lead()
    feed(lead, "webinar_attended", T0)
    feed(lead, "sample_request", T0)  # 110 engagement ... but a competitor
    lead2 = new_lead(lead_id="L-8")
    lead2.update_profile(facts("p-1", lead_id="L-8", competitor=True), T0)
    feed(lead2, "webinar_attended", T0)
    feed(lead2, "sample_request", T0)
    assert lead.state.stage == Stage.MQL
    assert lead2.state.stage == Stage.IQL
    assert lead2.state.score.total == 10
    assert lead2.state.score.fit == -100
    entries = score_entries(lead2)
    assert entries[0].detail == f"{MINUS}100 fit rule competitor matches (profile update p-1)"
    assert entries[0].rule == "fit:competitor"


# --------------------------------------------------------------------------- fit rules


def test_fit_rules_add_up_and_are_shown_per_rule():
    lead = new_lead()
    lead.update_profile(
        facts("p-1", target_account=True, company_size=250, industry="Software", seniority="VP", country="de"),
        T0,
    )
    s = lead.state.score
    assert s.breakdown == {"fit:target_account": 20, "fit:company_size": 10, "fit:industry": 10,
                           "fit:decision_maker": 15, "fit:country_served": 5}
    assert (s.fit, s.engagement, s.total) == (60, 0, 60)
    fx = lead.take_effects()
    [profile] = of_kind(fx, AuditKind.PROFILE_UPDATED)
    assert profile.detail == ("profile: company_size=250, country=de, industry=Software, seniority=VP,"
                              " target_account=True")
    assert profile.event_id == "p-1"
    details = sorted(e.detail for e in of_kind(fx, AuditKind.SCORE_CHANGED))
    assert "+20 fit rule target_account matches (profile update p-1)" in details
    assert len(details) == 5
    view = lead.view()
    assert view.score["total"] == 60 and view.score["fit"] == 60
    assert list(view.score["breakdown"]) == sorted(view.score["breakdown"])
    assert view.profile["industry"] == "Software"


@pytest.mark.parametrize(
    "fact,value,points",
    [
        ("target_account", True, 20),
        ("target_account", 1, 0),  # a bool never equals a number
        ("target_account", "true", 0),
        ("company_size", 49, 0),
        ("company_size", 50, 10),
        ("company_size", 5000, 10),
        ("company_size", 5000.5, 0),
        ("company_size", True, 0),
        ("industry", "FINANCE", 10),
        ("industry", "retail", 0),
        ("seniority", "c_level", 15),
        ("country", "CH", 5),
        ("country", "US", 0),
        ("student", True, -30),
        ("student", False, 0),
        ("wrong_audience", True, -50),
    ],
)
def test_fit_rule_conditions_through_the_lead(fact, value, points):
    lead = new_lead()
    lead.update_profile(facts("p-1", **{fact: value}), T0)
    assert lead.state.score.fit == points
    assert lead.state.profile[fact] == value and type(lead.state.profile[fact]) is type(value)
    assert len(score_entries(lead)) == (1 if points else 0)


def test_a_fact_that_stops_matching_removes_its_points_and_says_so():
    lead = new_lead()
    lead.update_profile(facts("p-1", company_size=200, target_account=True), T0)
    lead.take_effects()
    lead.update_profile(facts("p-2", company_size=300), T0 + days(1))  # still matches: nothing to record
    assert score_entries(lead) == []
    lead.update_profile(facts("p-3", company_size=20, actor=MARKETING), T0 + days(2))
    [entry] = score_entries(lead)
    assert entry.detail == f"{MINUS}10 fit rule company_size no longer matches (profile update p-3)"
    assert entry.points == -10 and entry.rule == "fit:company_size"
    assert (entry.actor, entry.role.value) == ("mark", "marketing")
    assert lead.state.score.breakdown == {"fit:target_account": 20}
    assert lead.state.score.fit == 20
    assert lead.state.profile == {"company_size": 20, "target_account": True}  # later value replaced earlier
    assert_score_consistent(lead)


def test_profile_update_can_push_a_lead_over_the_threshold():
    lead = new_lead()
    feed(lead, "webinar_attended", T0)
    feed(lead, "live_chat", T0)
    feed(lead, "webinar_registration", T0)  # 80
    lead.take_effects()
    lead.update_profile(facts("p-1", target_account=True), T0 + hours(1))
    assert lead.state.stage == Stage.MQL
    fx = lead.take_effects()
    assert stage_changes(fx) == [(Stage.IQL, Stage.MQL, "score_threshold")]
    [handover] = outbound_of(fx, OutboundKind.HANDOVER)
    assert handover.payload["score"] == 100 and handover.payload["trigger"] == "score_threshold"


# --------------------------------------------------------------------------- frequency


def _visits(offsets_in_days: list[float]) -> Lead:
    lead = new_lead()
    for i, d in enumerate(offsets_in_days):
        lead.ingest(event(f"v-{i + 1}", "website_visit", T0 + days(d)), T0 + days(d))
    return lead


def test_four_visits_in_one_week_score_more_than_four_spread_over_four_months():
    week = _visits([0, 2, 4, 6])
    months = _visits([0, 40, 80, 120])
    # in one week: 1 + 1.5 + 2 + 2 (x1.5 for the 2nd, capped at x2)
    assert week.state.score.breakdown == {"website_visit": 6.5}
    assert week.state.score.total == 6.5
    # spread out: 1 each, and each visit has decayed away (to the floor) before the next one
    assert months.state.score.breakdown == {"website_visit": 4, "decay": -3}
    assert months.state.score.total == 1
    assert week.state.score.total > months.state.score.total
    details = [e.detail for e in score_entries(week)]
    assert details == [
        "+1 website_visit (event v-1)",
        "+1.5 website_visit (event v-2, x1.5: 2 in 1w)",
        "+2 website_visit (event v-3, x2: 3 in 1w)",
        "+2 website_visit (event v-4, x2: 4 in 1w)",
    ]


def test_four_visits_four_weeks_apart_score_plain_points():
    lead = _visits([0, 28, 56, 84])
    assert lead.state.score.breakdown == {"website_visit": 4}


def test_frequency_window_is_per_type_and_excludes_its_edge():
    lead = new_lead()
    feed(lead, "website_visit", T0)
    feed(lead, "email_click", T0 + days(1))  # another type: no bonus
    feed(lead, "website_visit", T0 + days(7))  # exactly one window later: outside
    feed(lead, "website_visit", T0 + days(8))  # 1 earlier within 7d
    assert [e.points for e in score_entries(lead)] == [1, 5, 1, 1.5]


def test_a_late_event_is_weighted_at_its_own_time():
    """An event delivered late counts the visits within the window before its occurred_at."""
    lead = new_lead()
    feed(lead, "website_visit", T0)
    lead.ingest(event("late", "website_visit", T0 + days(1)), T0 + days(3))
    assert [e.points for e in score_entries(lead)] == [1, 1.5]


# --------------------------------------------------------------------------- decay


def _engaged(points_model=None) -> Lead:
    """A lead with 80 engagement at T0 (sample request 60 + newsletter 20): an IQL."""
    lead = new_lead(points_model)
    feed(lead, "sample_request", T0)
    feed(lead, "newsletter_signup", T0)
    assert lead.state.score.engagement == 80 and lead.state.stage == Stage.IQL
    lead.take_effects()
    return lead


def test_no_decay_before_the_idle_period():
    lead = _engaged()
    assert lead.view().next_decay_at == T0 + days(30)
    lead.tick(T0 + days(30) - timedelta(seconds=1))
    assert lead.state.score.engagement == 80
    assert score_entries(lead) == []


def test_percent_decay_25_after_30_idle_days_then_every_30_days_catching_up_in_one_tick():
    lead = _engaged()
    lead.tick(T0 + days(95))
    entries = score_entries(lead)
    assert [e.points for e in entries] == [-20, -15, -11.25]
    assert [e.detail for e in entries] == [
        f"{MINUS}20 inactivity decay (25% after 30d without activity)",
        f"{MINUS}15 inactivity decay (25% after 60d without activity)",
        f"{MINUS}11.25 inactivity decay (25% after 90d without activity)",
    ]
    assert all(e.rule == "decay" for e in entries)
    # recorded at the tick, each happened at its own due time
    assert [e.at for e in entries] == [T0 + days(95)] * 3
    assert [e.occurred_at for e in entries] == [T0 + days(30), T0 + days(60), T0 + days(90)]
    assert [e.score_engagement for e in entries] == [60, 45, 33.75]
    s = lead.state
    assert s.score.engagement == 33.75
    assert s.score.breakdown == {"sample_request": 60, "newsletter_signup": 20, "decay": -46.25}
    assert folded(lead).decay_steps == 3
    assert lead.view().next_decay_at == T0 + days(120)
    lead.tick(T0 + days(95))  # the same tick again changes nothing
    assert score_entries(lead) == []
    assert_score_consistent(lead)


def test_step_by_step_decay_equals_catch_up_decay():
    one = _engaged()
    one.tick(T0 + days(150))
    many = _engaged()
    for d in range(1, 151):
        many.tick(T0 + days(d))
    assert one.state.score == many.state.score
    assert folded(one).decay_steps == folded(many).decay_steps == 5


def test_points_decay_variant():
    lead = _engaged(points_decay_model(10))
    lead.tick(T0 + days(95))
    entries = score_entries(lead)
    assert [e.points for e in entries] == [-10, -10, -10]
    assert entries[0].detail == f"{MINUS}10 inactivity decay (10 points after 30d without activity)"
    assert entries[2].detail == f"{MINUS}10 inactivity decay (10 points after 90d without activity)"
    assert lead.state.score.engagement == 50


def test_points_decay_floors_at_zero_and_stops():
    lead = new_lead(points_decay_model(10))
    feed(lead, "cart_add", T0)  # 25
    lead.take_effects()
    lead.tick(T0 + days(365))
    assert [e.points for e in score_entries(lead)] == [-10, -10, -5]
    assert lead.state.score.engagement == 0
    assert folded(lead).decay_steps == 3
    assert lead.view().next_decay_at is None


def test_points_decay_below_the_floor_takes_the_rest():
    lead = new_lead(points_decay_model(10))
    feed(lead, "email_click", T0)  # 5
    feed(lead, "email_click", T0 + days(8))  # 5 (outside the window)
    feed(lead, "website_visit", T0 + days(8))  # 1 -> 11
    lead.take_effects()
    lead.tick(T0 + days(100))
    assert [e.points for e in score_entries(lead)] == [-10, -1]  # 1 - 10 would go below 1: all of it


def test_percent_decay_floors_to_zero_below_one_point():
    lead = new_lead()
    feed(lead, "website_visit", T0)  # 1 point: 25% would leave 0.75 < 1
    lead.take_effects()
    assert lead.next_wakeup() is not None
    lead.tick(T0 + days(30))
    [entry] = score_entries(lead)
    assert entry.points == -1
    # the floor took the rest, and the entry says so rather than claiming 25%
    assert entry.detail == (f"{MINUS}1 inactivity decay (25% after 30d without activity, and the 0.75 left below"
                            " the 1-point floor)")
    assert lead.state.score.engagement == 0
    assert lead.view().next_decay_at is None
    lead.tick(T0 + days(400))
    assert score_entries(lead) == []


def test_percent_decay_over_many_steps_reaches_zero():
    lead = new_lead()
    feed(lead, "social_interaction", T0)  # 3 -> 2.25 -> 1.69 -> 1.27 -> 0
    lead.take_effects()
    lead.tick(T0 + days(1000))
    assert [e.points for e in score_entries(lead)] == [-0.75, -0.56, -0.42, -1.27]
    assert lead.state.score.engagement == 0


def test_decay_takes_positive_engagement_only_and_stops_at_zero():
    lead = new_lead()
    feed(lead, "website_visit", T0)
    feed(lead, "unsubscribe", T0)  # engagement -19: +1 that decays, -20 that does not
    lead.take_effects()
    assert lead.view().next_decay_at == T0 + days(30)
    lead.tick(T0 + days(200))
    assert [e.points for e in score_entries(lead)] == [-1]
    assert lead.state.score.engagement == -20
    assert lead.view().next_decay_at is None


def test_negative_criteria_do_not_decay_away():
    """An engaged lead that unsubscribed must not end a cold year above one that only unsubscribed."""
    engaged = new_lead()
    feed(engaged, "webinar_attended", T0)
    feed(engaged, "unsubscribe", T0 + hours(1))
    only = new_lead(lead_id="L-8")
    feed(only, "unsubscribe", T0 + hours(1))
    engaged.tick(T0 + days(365))
    only.tick(T0 + days(365))
    assert engaged.state.score.breakdown["unsubscribe"] == -20  # the objection stands
    assert -20 < engaged.state.score.total < -18  # 50 x 0.75^12 of interest is left after a cold year
    engaged.tick(T0 + days(800))
    only.tick(T0 + days(800))
    assert engaged.state.score.total == only.state.score.total == -20


def test_activity_resets_the_decay_clock():
    lead = _engaged()
    feed(lead, "website_visit", T0 + days(20))
    lead.take_effects()
    assert folded(lead).last_activity == T0 + days(20)
    assert lead.view().next_decay_at == T0 + days(50)
    lead.tick(T0 + days(49))
    assert score_entries(lead) == []
    lead.tick(T0 + days(50))
    [entry] = score_entries(lead)
    assert entry.points == -20.25  # 25% of 81
    assert entry.detail == f"{MINUS}20.25 inactivity decay (25% after 30d without activity)"


def test_activity_after_decay_resets_the_step_count():
    lead = _engaged()
    lead.tick(T0 + days(65))  # two steps: 80 -> 45
    assert folded(lead).decay_steps == 2
    feed(lead, "website_visit", T0 + days(70))
    assert folded(lead).decay_steps == 0
    assert lead.view().next_decay_at == T0 + days(100)


def test_an_inactive_event_does_not_reset_the_decay_clock():
    lead = _engaged()
    lead.ingest(event("u-1", "unsubscribe", T0 + days(20)), T0 + days(20))  # 80 -> 60
    assert folded(lead).last_activity == T0
    assert lead.view().next_decay_at == T0 + days(30)
    lead.take_effects()
    lead.tick(T0 + days(30))
    [entry] = score_entries(lead)
    # decay takes 25% of the positive part only (80 -> 60): the unsubscribe does not decay away
    assert entry.points == -20
    assert lead.state.score.engagement == 40


def test_an_event_first_applies_the_decay_that_was_due_before_it():
    lead = _engaged()
    lead.ingest(event("v-1", "website_visit", T0 + days(65)), T0 + days(65))
    entries = score_entries(lead)
    assert [(e.rule, e.points) for e in entries] == [("decay", -20), ("decay", -15), ("website_visit", 1)]
    assert lead.state.score.engagement == 46


def test_decay_never_touches_fit():
    lead = new_lead()
    lead.update_profile(facts("p-1", target_account=True), T0)
    feed(lead, "webinar_attended", T0)
    lead.tick(T0 + days(30))
    assert (lead.state.score.fit, lead.state.score.engagement) == (20, 37.5)


# --------------------------------------------------------------------------- the articles' examples


def test_b2b_target_account_starts_at_20_and_is_nurtured_to_mql():
    lead = new_lead()
    lead.update_profile(facts("crm-1", target_account=True), T0)
    assert lead.state.score.total == 20
    assert lead.state.score.breakdown == {"fit:target_account": 20}
    feed(lead, "newsletter_signup", T0 + days(1))
    feed(lead, "content_download", T0 + days(2))
    for i in range(10):  # 10 visits in 4 weeks: 1 + 1.5 + 8 x 2
        feed(lead, "website_visit", T0 + days(3 * i) + hours(12))
    assert lead.state.score.breakdown["website_visit"] == 18.5
    assert lead.state.score.total == 68.5
    assert lead.state.stage == Stage.IQL
    lead.take_effects()
    lead.ingest(event("e-19", "webinar_attended", T0 + days(28)), T0 + days(28))  # ... plus a webinar
    s = lead.state
    assert s.score.total == 118.5
    assert s.stage == Stage.MQL
    assert s.history[-1].trigger == Trigger.SCORE_THRESHOLD
    assert s.history[-1].entered_at == s.stage_since == T0 + days(28)
    fx = lead.take_effects()
    assert stage_changes(fx) == [(Stage.IQL, Stage.MQL, "score_threshold")]
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.detail == "iql -> mql: score reached the MQL threshold (score 118.5)"
    assert (change.actor, change.role.value) == ("leadflow", "system")
    [handover] = outbound_of(fx, OutboundKind.HANDOVER)
    p = handover.payload
    assert (p["stage"], p["score"], p["trigger"]) == ("mql", 118.5, "score_threshold")
    assert p["reason"] == "score 118.5 reached the MQL threshold 100"
    assert p["breakdown"] == s.score.breakdown and p["profile"] == {"target_account": True}
    # what the lead did, newest first, so sales can refer to it
    assert [(a["type"], a["occurred_at"]) for a in p["activities"][:2]] == [
        ("webinar_attended", (T0 + days(28)).isoformat()), ("website_visit", (T0 + days(27) + hours(12)).isoformat())]
    assert handover.message_id == "L-7/handover/1" and handover.assign_to == "presales"
    assert s.handovers == 1
    assert_score_consistent(lead)


def test_exactly_the_threshold_is_enough():
    lead = new_lead()
    lead.update_profile(facts("p-1", target_account=True), T0)
    feed(lead, "sample_request", T0)
    assert lead.state.stage == Stage.IQL
    feed(lead, "newsletter_signup", T0)
    assert lead.state.score.total == 100
    assert lead.state.stage == Stage.MQL


def test_b2c_video_view_is_worth_nothing_but_is_recorded():
    lead = new_lead()
    lead.ingest(event("yt-1", "video_view", T0, channel="youtube"), T0)
    [entry] = score_entries(lead)
    assert entry.detail == "+0 video_view (event yt-1)"
    assert entry.points == 0 and entry.event_id == "yt-1"
    assert lead.state.score.total == 0
    assert lead.state.score.breakdown == {}
    assert counts(lead) == {"video_view": 1}
    assert lead.state.events_applied == 1
    assert lead.state.channel == "youtube"


def test_b2c_student_is_deprioritised():
    def shopper(lead_id: str, student: bool) -> Lead:
        lead = new_lead(lead_id=lead_id)
        lead.update_profile(facts("p-1", lead_id=lead_id, student=student, country="DE"), T0)
        for type_ in ("cart_add", "sample_request", "newsletter_signup"):
            feed(lead, type_, T0 + hours(1))
        return lead

    buyer, student = shopper("B-1", False), shopper("B-2", True)
    assert buyer.state.score.total == 110 and buyer.state.stage == Stage.MQL
    assert student.state.score.total == 80 and student.state.stage == Stage.IQL
    assert student.state.score.breakdown["fit:student"] == -30


# --------------------------------------------------------------------------- fast track


def test_a_demo_request_makes_an_iql_an_mql_at_once():
    lead = new_lead()
    lead.ingest(event("d-1", "demo_request", T0), T0)
    s = lead.state
    assert s.stage == Stage.MQL
    assert s.history[-1].trigger == Trigger.FAST_TRACK
    fx = lead.take_effects()
    assert stage_changes(fx) == [(Stage.IQL, Stage.MQL, "fast_track")]
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.detail == "iql -> mql: fast-track activity (demo_request)"
    assert change.reason == "demo_request"
    [handover] = outbound_of(fx, OutboundKind.HANDOVER)
    assert handover.payload["trigger"] == "fast_track"


def test_fast_track_does_not_depend_on_points():
    model = variant(("[events.demo_request]\npoints = 100", "[events.demo_request]\npoints = 5"))
    lead = new_lead(model)
    feed(lead, "demo_request", T0)
    assert lead.state.stage == Stage.MQL
    assert lead.state.score.total == 5


def test_fast_track_from_later_stages_is_just_points():
    from tests.funnel_helpers import sal_lead

    lead = sal_lead()
    lead.ingest(event("d-2", "demo_request", T0 + hours(1)), T0 + hours(1))
    assert lead.state.stage == Stage.SAL
    assert stage_changes(lead.take_effects()) == []


# --------------------------------------------------------------------------- duplicates and ignored events


def test_the_same_event_id_twice_is_applied_once():
    lead = new_lead()
    e = event("e-1", "webinar_attended", T0)
    lead.ingest(e, T0)
    lead.take_effects()
    before = lead.state.score.model_copy(deep=True)
    lead.ingest(e, T0 + hours(1))
    lead.ingest(event("e-1", "sample_request", T0 + hours(2)), T0 + hours(2))  # same id, other content
    fx = lead.take_effects()
    assert [a.kind for a in fx.audit] == [AuditKind.DUPLICATE_IGNORED] * 2
    assert fx.audit[0].detail == "duplicate event e-1 ignored"
    assert fx.audit[0].event_id == "e-1"
    assert lead.state.score == before
    assert lead.state.events_applied == 1
    assert lead.state.duplicates_ignored == 2
    assert lead.state.seen_ids == ["e-1"]
    assert fx.outbound == []


def test_the_same_profile_update_twice_is_applied_once():
    lead = new_lead()
    lead.update_profile(facts("p-1", target_account=True), T0)
    lead.update_profile(facts("p-1", target_account=False), T0)
    assert lead.state.profile == {"target_account": True}
    assert lead.state.score.fit == 20
    assert of_kind(lead.take_effects(), AuditKind.DUPLICATE_IGNORED)[0].detail == "duplicate profile update p-1 ignored"


def test_seen_ids_are_bounded_and_the_oldest_is_forgotten():
    lead = new_lead(seen_ids_max=3)
    for i in range(1, 5):
        lead.ingest(event(f"e-{i}", "email_open", T0 + days(8 * i)), T0 + days(8 * i))
    assert lead.state.seen_ids == ["e-2", "e-3", "e-4"]
    lead.take_effects()
    lead.ingest(event("e-4", "email_open", T0 + days(40)), T0 + days(40))  # still remembered
    assert lead.state.duplicates_ignored == 1
    lead.ingest(event("e-1", "email_open", T0 + days(41)), T0 + days(41))  # forgotten: applied again
    assert lead.state.duplicates_ignored == 1
    assert counts(lead)["email_open"] == 5
    assert lead.state.seen_ids == ["e-3", "e-4", "e-1"]


def test_the_default_bound_is_large():
    from funnel.lead import SEEN_IDS_MAX

    lead = new_lead()
    assert lead.seen_ids_max == SEEN_IDS_MAX >= 1000


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda: event("e-1", "tiktok_like", T0), "unknown event type 'tiktok_like' in model default@1"),
        (lambda: event("e-1", "webinar_attended", T0, lead_id="L-8"), "event e-1 is for lead L-8, not L-7"),
        (lambda: event("e-1", "webinar_attended", T0 + FUTURE_TOLERANCE + timedelta(seconds=1)),
         "event e-1 occurred in the future (2026-01-01T00:05:01+00:00)"),
        (lambda: event("e-1", "webinar_attended", T0 + days(365)),
         "event e-1 occurred in the future (2027-01-01T00:00:00+00:00)"),
    ],
    ids=["unknown-type", "other-lead", "just-too-far-ahead", "far-future"],
)
def test_events_that_cannot_apply_are_recorded_and_ignored(make, why):
    lead = new_lead()
    feed(lead, "email_click", T0 - hours(1), now=T0)
    lead.take_effects()
    before = lead.state.model_dump()
    lead.ingest(make(), T0)
    fx = lead.take_effects()
    [entry] = fx.audit
    assert entry.kind == AuditKind.EVENT_IGNORED
    assert entry.detail == why
    assert entry.event_id == "e-1"
    after = lead.state.model_dump()
    assert after["score"] == before["score"]
    assert after["events_applied"] == before["events_applied"] == 1
    assert after["stage"] == Stage.IQL and after["engagement"] == before["engagement"]
    assert fx.outbound == []


def test_a_slightly_early_clock_is_tolerated():
    lead = new_lead()
    lead.ingest(event("e-1", "webinar_attended", T0 + FUTURE_TOLERANCE), T0)
    assert lead.state.score.total == 50


# --------------------------------------------------------------------------- model switch


def test_switching_model_keeps_points_and_refits():
    lead = new_lead()
    lead.update_profile(facts("p-1", target_account=True), T0)
    feed(lead, "webinar_attended", T0)
    lead.take_effects()
    v2 = variant(('version = "1"', 'version = "2"'), ("points = 20                       # (articles) a target",
                                                     "points = 30                       # (articles) a target"))
    lead.use_model(v2, T0 + hours(1))
    fx = lead.take_effects()
    assert [a.kind for a in fx.audit] == [AuditKind.SCORE_CHANGED, AuditKind.MODEL_CHANGED]
    assert fx.audit[0].detail == "+10 fit rule target_account matches (model default@2)"
    assert fx.audit[1].detail == "scoring model default@1 \u2192 default@2: 70 \u2192 80"
    assert lead.state.model_ref == "default@2"
    assert lead.state.score.total == 80
    lead.use_model(v2, T0 + days(2))  # same ref: nothing to record
    assert lead.take_effects().audit == []


# --------------------------------------------------------------------------- backfill: old activity over the threshold


def _strong_history_of_last_year(lead: Lead, now) -> None:
    """A good fit (60) and a year-old burst of attendance and sample requests, imported at `now`:
    even after 13 decay steps it is worth over 100 points."""
    lead.update_profile(facts("p-1", target_account=True, company_size=100, industry="software", seniority="vp",
                              country="DE"), now)
    old = now - days(400)
    burst = ([event(f"ea-{i}", "event_attended", old + hours(i)) for i in range(10)]
             + [event(f"sr-{i}", "sample_request", old + hours(i)) for i in range(10)])
    lead.ingest_many(burst, now)


def test_an_old_history_over_the_threshold_scores_but_is_not_handed_over():
    now = T0 + days(400)
    lead = new_lead(now=now)
    _strong_history_of_last_year(lead, now)
    lead.tick(now + hours(1))
    fx = lead.take_effects()
    s = lead.state
    assert s.score.total >= DEFAULT.thresholds.mql  # it scored (decayed) ...
    assert s.score.breakdown["decay"] < 0 and {"event_attended", "sample_request"} <= set(s.score.breakdown)
    assert s.stage == Stage.IQL  # ... but its newest activity is older than max_age.score_threshold (30d)
    assert stage_changes(fx) == [] and outbound_of(fx, OutboundKind.HANDOVER) == []
    feed(lead, "website_visit", now + hours(2))  # active again: now presales should hear of it
    assert lead.state.stage == Stage.MQL
    assert lead.state.history[-1].trigger == Trigger.SCORE_THRESHOLD


def test_an_old_history_over_the_threshold_says_in_the_history_why_it_was_not_handed_over():
    """A lead shown at 108 points in IQL must not leave a manager guessing: like a stale demo
    request ("scored, not fast-tracked"), the withheld threshold handover is audited."""
    now = T0 + days(400)
    lead = new_lead(now=now)
    _strong_history_of_last_year(lead, now)
    fx = lead.take_effects()
    assert lead.state.score.total >= DEFAULT.thresholds.mql and lead.state.stage == Stage.IQL
    notes = [a for a in of_kind(fx, AuditKind.NOT_HANDED_OVER) if a.reason == "backfill"]
    assert len(notes) == 1, [a.detail for a in fx.audit if a.kind != AuditKind.SCORE_CHANGED]
    assert "30d" in notes[0].detail


def test_a_withheld_threshold_handover_is_noted_once_per_newest_activity_and_not_by_older_runs():
    now = T0 + days(400)
    lead = new_lead(now=now)
    _strong_history_of_last_year(lead, now)
    lead.take_effects()
    lead.tick(now + days(1))  # still over the threshold, same newest activity: nothing new to say
    assert of_kind(lead.take_effects(), AuditKind.NOT_HANDED_OVER) == []
    lead.ingest_many([event("late-1", "event_attended", now - days(300))], now + days(2))  # newer, still old
    (note,) = of_kind(lead.take_effects(), AuditKind.NOT_HANDED_OVER)
    assert note.occurred_at == now - days(300) and lead.state.stage == Stage.IQL
    quiet = new_lead(now=now, explain=False)  # a workflow run of version 1-7
    _strong_history_of_last_year(quiet, now)
    assert of_kind(quiet.take_effects(), AuditKind.NOT_HANDED_OVER) == []
    assert quiet.state.stage == Stage.IQL and quiet.state.score.total >= DEFAULT.thresholds.mql
