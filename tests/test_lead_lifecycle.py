"""Commands through the funnel (accept, reject, qualify, contact, close, reopen), refusals that change
nothing, and the state's round trip through JSON (continue-as-new)."""

from __future__ import annotations

import pytest
from freezegun import freeze_time
from pydantic import ValidationError

from funnel.lead import Lead
from funnel.models import (
    AuditKind,
    LeadState,
    OutboundKind,
    Refused,
    Role,
    Stage,
    Trigger,
)
from tests.funnel_helpers import (
    BANT_3,
    MANAGER,
    MARKETING,
    MEDDIC_5,
    PRESALES,
    SALES,
    T0,
    Accept,
    Bant,
    Close,
    LogContact,
    Meddic,
    Qualify,
    Reject,
    Reopen,
    assert_score_consistent,
    counts,
    days,
    default_model,
    disqualified_lead,
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

LATER = T0 + hours(3)


def test_a_new_lead_is_an_iql_with_an_audit_entry():
    lead = new_lead(keep_effects=True)
    s = lead.state
    assert (s.stage, s.stage_since, s.created_at, s.model_ref) == (Stage.IQL, T0, T0, "default@1")
    assert [(v.stage, v.trigger) for v in s.history] == [(Stage.IQL, None)]
    fx = lead.take_effects()
    [created] = fx.audit
    assert created.kind == AuditKind.LEAD_CREATED
    assert created.detail == "lead created as iql, scored by default@1"
    assert (created.seq, created.entry_id, created.to_stage) == (1, "L-7/1", Stage.IQL)
    assert lead.take_effects().audit == []  # effects are handed out once


# --------------------------------------------------------------------------- accept


def test_presales_accepts_an_mql():
    lead = mql_lead()
    lead.execute(Accept(by=PRESALES, note="fits our ICP"), LATER)
    s = lead.state
    assert (s.stage, s.stage_since) == (Stage.SAL, LATER)
    assert s.history[-1].trigger == Trigger.ACCEPT
    fx = lead.take_effects()
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.detail == "mql -> sal: presales accepted; note: fits our ICP"
    assert (change.actor, change.role, change.trigger) == ("pia", Role.PRESALES, Trigger.ACCEPT)
    [met] = of_kind(fx, AuditKind.SLA_MET)
    assert met.rule == "presales_decision" and met.actor == "pia"
    # an accepted lead gets its own deadline: presales qualifies or rejects it within 5 days
    assert [(x.name, x.due_at) for x in s.slas] == [("presales_qualification", LATER + days(5))]
    assert fx.outbound == []


@pytest.mark.parametrize("actor", [MARKETING, SALES])
def test_only_presales_or_a_manager_may_accept(actor):
    lead = mql_lead()
    with pytest.raises(Refused, match=f"^cannot accept lead L-7: role {actor.role.value} may not; "
                                      "allowed: manager, presales$"):
        lead.execute(Accept(by=actor), LATER)


def test_accepting_an_iql_is_refused_with_the_documented_message():
    lead = new_lead()
    with pytest.raises(Refused, match="^cannot accept lead L-7: it is iql, not mql$"):
        lead.execute(Accept(by=PRESALES), LATER)


# --------------------------------------------------------------------------- reject


def test_reject_disqualifies_with_a_reason():
    lead = mql_lead()
    feed(lead, "webinar_attended", T0 + hours(1))  # opens webinar_follow_up too
    lead.take_effects()
    lead.execute(Reject(by=PRESALES, reason="competitor", note="works at ACME"), LATER)
    s = lead.state
    assert s.stage == Stage.DISQUALIFIED
    fx = lead.take_effects()
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.detail == "mql -> disqualified: presales disqualified (competitor); note: works at ACME"
    assert (change.reason, change.trigger) == ("competitor", Trigger.REJECT_DISQUALIFY)
    assert [a.rule for a in of_kind(fx, AuditKind.SLA_MET)] == ["presales_decision"]
    assert [a.rule for a in of_kind(fx, AuditKind.SLA_CANCELLED)] == ["webinar_follow_up"]
    assert s.slas == [] and s.nurture is None and s.cool_off_until is None
    assert s.score.engagement == 150  # disqualifying keeps the score for the record


def test_reject_recycles_not_now():
    lead = mql_lead()
    lead.update_profile(facts("p-1", target_account=True), T0)
    lead.take_effects()
    lead.execute(Reject(by=PRESALES, reason="no_budget_yet", recycle=True), LATER)
    s = lead.state
    assert s.stage == Stage.RECYCLED
    assert s.history[-1].trigger == Trigger.REJECT_RECYCLE
    assert s.cool_off_until == LATER + days(30)
    assert s.nurture is not None and s.nurture.track == "recycled"
    # engagement is reset, fit stays
    assert (s.score.fit, s.score.engagement, s.score.total) == (20, 0, 20)
    fx = lead.take_effects()
    [reset] = [a for a in of_kind(fx, AuditKind.SCORE_CHANGED) if a.rule == "recycle_reset"]
    assert reset.detail == "\u2212100 engagement reset on recycle"
    assert counts(lead) == {}  # counts start over: a new demo request would score again
    assert_score_consistent(lead)


@pytest.mark.parametrize("make,who", [(sal_lead, SALES), (sql_lead, SALES), (sal_lead, PRESALES)])
def test_reject_after_acceptance(make, who):
    lead = make()
    lead.execute(Reject(by=who, reason="wrong_audience"), LATER)
    assert lead.state.stage == Stage.DISQUALIFIED


def test_presales_may_not_reject_an_sql():
    lead = sql_lead()
    with pytest.raises(Refused, match="cannot disqualify lead L-7: role presales may not; allowed: manager, sales"):
        lead.execute(Reject(by=PRESALES, reason="x"), LATER)
    with pytest.raises(Refused, match="cannot recycle lead L-7: role presales may not"):
        lead.execute(Reject(by=PRESALES, reason="x", recycle=True), LATER)


def test_a_reason_must_be_a_code():
    with pytest.raises(ValidationError):
        Reject(by=PRESALES, reason="Not now, maybe later")


# --------------------------------------------------------------------------- qualify


def test_bant_three_of_four_qualifies_and_creates_an_opportunity():
    lead = sal_lead()
    lead.execute(Qualify(by=SALES, bant=BANT_3), LATER)
    s = lead.state
    assert s.stage == Stage.SQL
    assert s.qualified_by == "bant 3/4: budget, authority, need"
    fx = lead.take_effects()
    [change] = of_kind(fx, AuditKind.STAGE_CHANGED)
    assert change.reason == "bant 3/4: budget, authority, need"
    assert change.detail == "sal -> sql: qualified (BANT/MEDDIC) (bant 3/4: budget, authority, need)"
    [opportunity] = outbound_of(fx, OutboundKind.OPPORTUNITY)
    p = opportunity.payload
    assert (p["stage"], p["qualified_by"], p["score"], p["presales_owner"]) == ("sql", s.qualified_by, 100, None)
    assert p["breakdown"] == {"demo_request": 100} and p["activities"][0]["type"] == "demo_request"
    assert opportunity.assign_to == "sales"  # entering SQL hands the lead to an account executive
    assert [x.name for x in s.slas] == ["first_sales_contact"]
    assert s.slas[0].due_at == LATER + days(1)


def test_bant_four_of_four_qualifies():
    lead = sal_lead()
    lead.execute(Qualify(by=PRESALES, bant=Bant(budget=True, authority=True, need=True, timing=True)), LATER)
    assert lead.state.qualified_by == "bant 4/4: budget, authority, need, timing"


@pytest.mark.parametrize(
    "bant,message",
    [
        (Bant(budget=True, need=True), "BANT 2 of 4 met (budget, need); at least 3 needed"),
        (Bant(budget=True, need=True, timing=False), "BANT 2 of 4 met (budget, need); at least 3 needed"),
        (Bant(timing=True), "BANT budget and need are required (met: timing)"),
        (Bant(), "BANT budget and need are required (met: none)"),
        (Bant(authority=True, need=True, timing=True), "BANT budget is required (met: authority, need, timing)"),
        (Bant(budget=True, authority=True, timing=True), "BANT need is required (met: budget, authority, timing)"),
    ],
)
def test_bant_refusals_name_what_is_missing(bant, message):
    """Three of four, and an SQL always has a budget and a need (the sources): both are required."""
    lead = sal_lead()
    with pytest.raises(Refused) as err:
        lead.execute(Qualify(by=SALES, bant=bant), LATER)
    assert str(err.value) == f"cannot qualify lead L-7: {message}"
    assert lead.state.stage == Stage.SAL


def test_meddic_needs_five_of_six_by_default():
    lead = sal_lead()
    four = Meddic(metrics=True, economic_buyer=True, decision_criteria=True, champion=True)
    with pytest.raises(Refused) as err:
        lead.execute(Qualify(by=PRESALES, framework="meddic", meddic=four), LATER)
    assert str(err.value) == ("cannot qualify lead L-7: MEDDIC 4 of 6 met (metrics, economic_buyer,"
                              " decision_criteria, champion); at least 5 needed")
    lead.execute(Qualify(by=PRESALES, framework="meddic", meddic=MEDDIC_5), LATER)
    assert lead.state.stage == Stage.SQL
    assert lead.state.qualified_by == (
        "meddic 5/6: metrics, economic_buyer, decision_criteria, decision_process, identify_pain")


MEDDIC_REQUIRED = ("meddic_required = []", 'meddic_required = ["economic_buyer", "champion"]')


@pytest.mark.parametrize(
    "meddic,message",
    [
        (Meddic(metrics=True, decision_criteria=True, decision_process=True, identify_pain=True, champion=True),
         "MEDDIC economic_buyer is required (met: metrics, decision_criteria, decision_process, identify_pain,"
         " champion)"),
        (MEDDIC_5, "MEDDIC champion is required (met: metrics, economic_buyer, decision_criteria, decision_process,"
                   " identify_pain)"),
        (Meddic(metrics=True), "MEDDIC economic_buyer and champion are required (met: metrics)"),
        (Meddic(), "MEDDIC economic_buyer and champion are required (met: none)"),
        (Meddic(economic_buyer=True, champion=True, metrics=True),
         "MEDDIC 3 of 6 met (metrics, economic_buyer, champion); at least 5 needed"),
    ],
)
def test_meddic_refusals_name_the_missing_required_criterion(meddic, message):
    """`meddic_required` in the model: those criteria must be among the ones met, on top of "5 of 6"."""
    lead = sal_lead(variant(MEDDIC_REQUIRED))
    with pytest.raises(Refused) as err:
        lead.execute(Qualify(by=PRESALES, framework="meddic", meddic=meddic), LATER)
    assert str(err.value) == f"cannot qualify lead L-7: {message}"
    assert lead.state.stage == Stage.SAL and lead.state.qualified_by is None
    assert lead.take_effects().audit == []  # a refusal changes nothing


def test_meddic_with_its_required_criteria_qualifies():
    lead = sal_lead(variant(MEDDIC_REQUIRED))
    met = Meddic(metrics=True, economic_buyer=True, decision_criteria=True, identify_pain=True, champion=True)
    lead.execute(Qualify(by=PRESALES, framework="meddic", meddic=met), LATER)
    s = lead.state
    assert s.stage == Stage.SQL
    assert s.qualified_by == "meddic 5/6: metrics, economic_buyer, decision_criteria, identify_pain, champion"
    [change] = of_kind(lead.take_effects(), AuditKind.STAGE_CHANGED)
    assert change.reason == s.qualified_by
    # the same five without the champion qualify under the default model (nothing required there)
    other = sal_lead(lead_id="L-9")
    other.execute(Qualify(by=PRESALES, framework="meddic", meddic=MEDDIC_5), LATER)
    assert other.state.stage == Stage.SQL


def test_meddic_required_names_only_meddic_criteria():
    from funnel.scoring_model import ModelError, parse_model
    from tests.funnel_helpers import model_text

    with pytest.raises(ModelError) as err:
        parse_model(model_text(("meddic_required = []", 'meddic_required = ["budget"]')), "bad.toml")
    assert "qualification.meddic_required" in str(err.value)


def test_the_framework_needs_its_criteria():
    lead = sal_lead()
    with pytest.raises(Refused, match="^cannot qualify lead L-7: no BANT criteria given$"):
        lead.execute(Qualify(by=SALES), LATER)
    with pytest.raises(Refused, match="^cannot qualify lead L-7: no MEDDIC criteria given$"):
        lead.execute(Qualify(by=SALES, framework="meddic", bant=BANT_3), LATER)


def test_the_minimum_comes_from_the_model():
    strict = variant(("bant_min = 3", "bant_min = 4"), ("meddic_min = 5", "meddic_min = 2"))
    lead = sal_lead(strict)
    with pytest.raises(Refused, match="BANT 3 of 4 met .*; at least 4 needed"):
        lead.execute(Qualify(by=SALES, bant=BANT_3), LATER)
    lead.execute(Qualify(by=SALES, framework="meddic", meddic=Meddic(metrics=True, champion=True)), LATER)
    assert lead.state.stage == Stage.SQL


def test_marketing_may_not_qualify():
    lead = sal_lead()
    with pytest.raises(Refused, match="cannot qualify lead L-7: role marketing may not"):
        lead.execute(Qualify(by=MARKETING, bant=BANT_3), LATER)


def test_a_wrong_stage_is_reported_before_missing_criteria():
    lead = new_lead()
    with pytest.raises(Refused, match="it is iql, not sal"):
        lead.execute(Qualify(by=SALES, bant=Bant()), LATER)


# --------------------------------------------------------------------------- contact


def test_a_contact_meets_the_first_sales_contact_sla():
    lead = sql_lead()
    lead.execute(LogContact(by=SALES, note="called, demo booked"), T0 + hours(5))
    fx = lead.take_effects()
    [contact] = of_kind(fx, AuditKind.CONTACT_LOGGED)
    assert contact.detail == "phone contact by sam: called, demo booked"
    [met] = of_kind(fx, AuditKind.SLA_MET)
    assert met.rule == "first_sales_contact"
    assert met.detail == "SLA first_sales_contact met after 5h 0m (due 2026-01-02T00:00:00+00:00)"
    assert lead.state.slas == []
    assert lead.state.stage == Stage.SQL
    assert stage_changes(fx) == []


def test_a_contact_without_open_slas_is_just_logged():
    lead = new_lead()
    lead.execute(LogContact(by=PRESALES, channel="email"), LATER)
    fx = lead.take_effects()
    assert [a.kind for a in fx.audit] == [AuditKind.CONTACT_LOGGED]
    assert fx.audit[0].detail == "email contact by pia"


def test_marketing_may_not_log_a_contact():
    lead = new_lead()
    with pytest.raises(Refused, match="^cannot log a contact for lead L-7: role marketing may not$"):
        lead.execute(LogContact(by=MARKETING), LATER)


@pytest.mark.parametrize("make,stage", [(disqualified_lead, "disqualified"), (lost_lead, "lost")])
def test_no_contact_on_a_closed_lead(make, stage):
    lead = make()
    with pytest.raises(Refused, match=f"^cannot log a contact for lead L-7: it is {stage} \\(closed\\)$"):
        lead.execute(LogContact(by=SALES), LATER)


# --------------------------------------------------------------------------- close


def test_close_won():
    lead = sql_lead()
    lead.execute(Close(by=SALES, outcome="won"), LATER)
    assert lead.state.stage == Stage.WON
    fx = lead.take_effects()
    assert stage_changes(fx) == [(Stage.SQL, Stage.WON, "won")]
    assert [a.rule for a in of_kind(fx, AuditKind.SLA_CANCELLED)] == ["first_sales_contact"]
    assert lead.state.slas == [] and lead.state.cool_off_until is None


def test_close_lost_needs_a_reason():
    lead = sql_lead()
    with pytest.raises(Refused, match="^cannot close lead L-7 as lost without a reason code$"):
        lead.execute(Close(by=SALES, outcome="lost"), LATER)
    lead.execute(Close(by=SALES, outcome="lost", reason="price"), LATER)
    s = lead.state
    assert s.stage == Stage.LOST
    assert s.cool_off_until == LATER + days(90)
    [change] = of_kind(lead.take_effects(), AuditKind.STAGE_CHANGED)
    assert change.detail == "sql -> lost: deal lost (price)"


def test_presales_may_not_close():
    lead = sql_lead()
    with pytest.raises(Refused, match="^cannot close as won lead L-7: role presales may not; allowed: manager, sales$"):
        lead.execute(Close(by=PRESALES, outcome="won"), LATER)


def test_only_an_sql_can_close():
    lead = sal_lead()
    with pytest.raises(Refused, match="^cannot close as won lead L-7: it is sal, not sql$"):
        lead.execute(Close(by=SALES, outcome="won"), LATER)


# --------------------------------------------------------------------------- reopen


@pytest.mark.parametrize("make", [disqualified_lead, lost_lead])
def test_a_manager_reopens_into_recycled(make):
    lead = make()
    lead.execute(Reopen(by=MANAGER, reason="new_budget"), LATER)
    s = lead.state
    assert s.stage == Stage.RECYCLED
    assert s.history[-1].trigger == Trigger.REOPEN
    assert s.cool_off_until == LATER + days(30)
    [change] = of_kind(lead.take_effects(), AuditKind.STAGE_CHANGED)
    assert change.detail.endswith(": manager reopened (new_budget)")


@pytest.mark.parametrize("actor", [PRESALES, SALES, MARKETING])
def test_only_a_manager_reopens(actor):
    lead = disqualified_lead()
    with pytest.raises(Refused, match=f"cannot reopen lead L-7: role {actor.role.value} may not; allowed: manager$"):
        lead.execute(Reopen(by=actor, reason="x"), LATER)


def test_a_won_lead_cannot_be_reopened():
    lead = sql_lead()
    lead.execute(Close(by=SALES, outcome="won"), T0)
    with pytest.raises(Refused, match="^cannot reopen lead L-7: it is won, not disqualified or lost$"):
        lead.execute(Reopen(by=MANAGER, reason="x"), LATER)


# --------------------------------------------------------------------------- refusals change nothing

REFUSALS = [
    (new_lead, Accept(by=PRESALES)),
    (new_lead, Reject(by=PRESALES, reason="x")),
    (new_lead, Qualify(by=SALES, bant=BANT_3)),
    (new_lead, Close(by=SALES, outcome="won")),
    (new_lead, Reopen(by=MANAGER, reason="x")),
    (new_lead, LogContact(by=MARKETING)),
    (mql_lead, Accept(by=SALES)),
    (mql_lead, Reject(by=MARKETING, reason="x", recycle=True)),
    (mql_lead, Qualify(by=PRESALES, bant=BANT_3)),
    (sal_lead, Qualify(by=SALES, bant=Bant(budget=True, need=True))),
    (sal_lead, Qualify(by=SALES, framework="meddic", meddic=Meddic(metrics=True))),
    (sal_lead, Accept(by=PRESALES)),
    (sql_lead, Close(by=SALES, outcome="lost")),
    (sql_lead, Close(by=PRESALES, outcome="won")),
    (sql_lead, Reject(by=PRESALES, reason="x")),
    (lost_lead, Reopen(by=SALES, reason="x")),
    (lost_lead, LogContact(by=SALES)),
    (disqualified_lead, Accept(by=MANAGER)),
    (recycled_lead, Accept(by=PRESALES)),
    (recycled_lead, Reopen(by=MANAGER, reason="x")),
]


@pytest.mark.parametrize("make,command", REFUSALS, ids=lambda x: getattr(x, "__name__", None) or x.kind)
def test_a_refused_command_changes_nothing(make, command):
    lead = make()
    lead.take_effects()
    before = lead.state.model_dump()
    with pytest.raises(Refused) as checked:
        lead.check(command)
    with pytest.raises(Refused) as executed:
        lead.execute(command, LATER)
    assert str(checked.value) == str(executed.value)
    assert str(executed.value).startswith("cannot ")
    assert "L-7" in str(executed.value)
    assert lead.state.model_dump() == before
    fx = lead.take_effects()
    assert fx.audit == [] and fx.outbound == []


def test_check_of_a_valid_command_changes_nothing():
    lead = mql_lead()
    before = lead.state.model_dump()
    lead.check(Accept(by=PRESALES))
    lead.check(Reject(by=PRESALES, reason="x"))
    assert lead.state.model_dump() == before
    assert lead.take_effects().audit == []


# --------------------------------------------------------------------------- a whole life


def test_a_whole_life_is_audited_in_order():
    lead = new_lead(keep_effects=True)
    feed(lead, "demo_request", T0 + hours(1))
    lead.assign_owner("pia", T0 + hours(1))
    lead.execute(Accept(by=PRESALES), T0 + hours(2))
    lead.execute(Qualify(by=PRESALES, bant=BANT_3), T0 + hours(3))
    lead.execute(LogContact(by=SALES), T0 + hours(4))
    lead.execute(Close(by=SALES, outcome="won"), T0 + days(10))
    fx = lead.take_effects()
    assert [a.seq for a in fx.audit] == list(range(1, len(fx.audit) + 1))
    assert len({a.entry_id for a in fx.audit}) == len(fx.audit)
    assert stage_changes(fx) == [
        (Stage.IQL, Stage.MQL, "fast_track"), (Stage.MQL, Stage.SAL, "accept"),
        (Stage.SAL, Stage.SQL, "qualify"), (Stage.SQL, Stage.WON, "won")]
    assert [a.at for a in fx.audit] == sorted(a.at for a in fx.audit)
    assert [o.kind for o in fx.outbound] == [OutboundKind.HANDOVER, OutboundKind.OPPORTUNITY]
    assert fx.outbound[1].payload["presales_owner"] == "pia" and fx.outbound[1].assign_to == "sales"
    assert len({o.message_id for o in fx.outbound}) == 2
    [owner] = of_kind(fx, AuditKind.OWNER_ASSIGNED)
    assert owner.detail == "owner pia (handover to presales)"
    assert [v.stage for v in lead.state.history] == [Stage.IQL, Stage.MQL, Stage.SAL, Stage.SQL, Stage.WON]
    assert lead.state.stage_since == T0 + days(10)
    view = lead.view()
    assert view.stage == Stage.WON and view.qualified_by == "bant 3/4: budget, authority, need"
    assert view.owner == "pia" and view.events_applied == 1


def test_assigning_the_same_owner_twice_is_recorded_once():
    lead = mql_lead()
    lead.assign_owner("pia", T0)
    lead.assign_owner("pia", T0)
    assert len(of_kind(lead.take_effects(), AuditKind.OWNER_ASSIGNED)) == 1


def test_recycle_clears_the_owner():
    lead = mql_lead()
    lead.assign_owner("pia", T0)
    lead.execute(Reject(by=PRESALES, reason="not_now", recycle=True), LATER)
    assert lead.state.owner is None


# --------------------------------------------------------------------------- continue-as-new


def _clone(lead: Lead) -> Lead:
    state = LeadState.model_validate_json(lead.state.model_dump_json())
    return Lead(state, default_model())


def _rich_lead() -> Lead:
    lead = new_lead()
    lead.update_profile(facts("p-1", target_account=True, industry="software"), T0)
    feed(lead, "website_visit", T0 + hours(1), event_id="seen-1")
    feed(lead, "website_visit", T0 + hours(2), event_id="seen-2")
    feed(lead, "webinar_attended", T0 + hours(3), event_id="seen-3")
    lead.tick(T0 + days(2))
    lead.take_effects()
    return lead


def test_state_round_trips_through_json():
    lead = _rich_lead()
    clone = _clone(lead)
    assert clone.state == lead.state
    assert clone.state.model_dump() == lead.state.model_dump()
    assert clone.next_wakeup() == lead.next_wakeup()
    assert clone.view() == lead.view()


def test_a_restored_lead_behaves_identically():
    lead = _rich_lead()
    clone = _clone(lead)
    script = [
        lambda x: x.ingest(event("seen-2", "website_visit", T0 + days(3)), T0 + days(3)),  # seen before
        lambda x: x.ingest(event("new-1", "website_visit", T0 + days(3)), T0 + days(3)),  # frequency history
        lambda x: x.tick(T0 + days(5)),
        lambda x: x.ingest(event("new-2", "demo_request", T0 + days(6)), T0 + days(6)),
        lambda x: x.execute(Accept(by=PRESALES), T0 + days(6)),
        lambda x: x.tick(T0 + days(60)),
    ]
    for step in script:
        step(lead)
        step(clone)
        a, b = lead.take_effects(), clone.take_effects()
        assert a == b
        assert lead.state == clone.state
        assert lead.next_wakeup() == clone.next_wakeup()
    assert lead.state.duplicates_ignored == clone.state.duplicates_ignored == 1
    assert lead.state.stage == Stage.SAL


def test_a_restored_lead_refuses_a_duplicate_it_saw_before():
    clone = _clone(_rich_lead())
    clone.ingest(event("seen-1", "website_visit", T0 + days(3)), T0 + days(3))
    fx = clone.take_effects()
    assert [a.kind for a in fx.audit] == [AuditKind.DUPLICATE_IGNORED]
    assert counts(clone)["website_visit"] == 2


def test_restored_audit_sequence_continues():
    lead = _rich_lead()
    seq = lead.state.audit_seq
    clone = _clone(lead)
    clone.execute(LogContact(by=SALES), T0 + days(3))
    [entry] = clone.take_effects().audit
    assert entry.seq == seq + 1


def _scenario() -> tuple:
    lead = new_lead(keep_effects=True)
    lead.update_profile(facts("p-1", target_account=True), T0)
    feed(lead, "webinar_attended", T0 + hours(1), event_id="w-1")
    feed(lead, "demo_request", T0 + hours(2), event_id="d-1")
    lead.tick(T0 + days(3))
    lead.execute(Accept(by=PRESALES), T0 + days(3))
    lead.tick(T0 + days(100))
    return lead.state.model_dump(), lead.take_effects(), lead.next_wakeup(), lead.view()


def test_the_core_never_reads_the_clock():
    with freeze_time("2020-05-05 12:00:00"):
        early = _scenario()
    with freeze_time("2031-11-11 03:00:00"):
        late = _scenario()
    assert early == late


def test_a_command_key_is_remembered_with_its_outcome_and_marks_its_entries():
    lead = mql_lead()
    lead.execute(Accept(by=PRESALES), LATER, command_id="k-1")
    assert lead.outcome_of("k-1") == "applied"
    assert {a.command_id for a in lead.take_effects().audit} == {"k-1"}
    with pytest.raises(Refused):
        lead.execute(Accept(by=PRESALES), LATER, command_id="k-2")
    assert lead.outcome_of("k-2") == "refused: cannot accept lead L-7: it is sal, not mql"
    assert lead.outcome_of("k-9") is None and lead.outcome_of(None) is None
    clone = _clone(lead)  # carried across continue-as-new
    assert clone.outcome_of("k-1") == "applied"


def test_the_memory_of_command_keys_is_bounded():
    from funnel.lead import COMMANDS_MAX

    lead = sql_lead()
    for i in range(COMMANDS_MAX + 5):
        lead.execute(LogContact(by=SALES), LATER, command_id=f"c-{i}")
    assert len(lead.state.commands) == COMMANDS_MAX
    assert lead.outcome_of("c-0") is None and lead.outcome_of(f"c-{COMMANDS_MAX + 4}") == "applied"
