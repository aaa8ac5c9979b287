"""The transition table, row by row and role by role, and every move it does not contain."""

from __future__ import annotations

import itertools

import pytest

from funnel import stages
from funnel.models import AuditKind, OutboundKind, Refused, Role, Stage, Trigger
from funnel.scoring_model import Shortcuts
from funnel.stages import TRANSITIONS, Transition
from tests.funnel_helpers import (
    BANT_3,
    MANAGER,
    PRESALES,
    SALES,
    T0,
    Accept,
    Qualify,
    auto_accept_model,
    event,
    mql_lead,
    new_lead,
    of_kind,
    outbound_of,
    qualify_from_mql_model,
    stage_changes,
)

S, T, R = Stage, Trigger, Role
ALL_ON = Shortcuts(auto_accept=True, qualify_from_mql=True)
ALL_OFF = Shortcuts()

# The table as the domain describes it, written out independently of funnel/stages.py:
# (from, trigger) -> (to, roles allowed, shortcut flag).
EXPECTED = {
    (S.IQL, T.SCORE_THRESHOLD): (S.MQL, {R.SYSTEM}, None),
    (S.IQL, T.FAST_TRACK): (S.MQL, {R.SYSTEM}, None),
    (S.MQL, T.ACCEPT): (S.SAL, {R.PRESALES, R.MANAGER}, None),
    (S.MQL, T.AUTO_ACCEPT): (S.SAL, {R.SYSTEM}, "auto_accept"),
    (S.MQL, T.REJECT_DISQUALIFY): (S.DISQUALIFIED, {R.PRESALES, R.MANAGER}, None),
    (S.MQL, T.REJECT_RECYCLE): (S.RECYCLED, {R.PRESALES, R.MANAGER}, None),
    (S.MQL, T.DECAY_BELOW_THRESHOLD): (S.RECYCLED, {R.SYSTEM}, None),
    (S.MQL, T.NEGATIVE_CRITERIA): (S.RECYCLED, {R.SYSTEM}, None),
    (S.MQL, T.QUALIFY): (S.SQL, {R.PRESALES, R.MANAGER}, "qualify_from_mql"),
    (S.SAL, T.QUALIFY): (S.SQL, {R.PRESALES, R.SALES, R.MANAGER}, None),
    (S.SAL, T.REJECT_DISQUALIFY): (S.DISQUALIFIED, {R.PRESALES, R.SALES, R.MANAGER}, None),
    (S.SAL, T.REJECT_RECYCLE): (S.RECYCLED, {R.PRESALES, R.SALES, R.MANAGER}, None),
    (S.SQL, T.WON): (S.WON, {R.SALES, R.MANAGER}, None),
    (S.SQL, T.LOST): (S.LOST, {R.SALES, R.MANAGER}, None),
    (S.SQL, T.REJECT_DISQUALIFY): (S.DISQUALIFIED, {R.SALES, R.MANAGER}, None),
    (S.SQL, T.REJECT_RECYCLE): (S.RECYCLED, {R.SALES, R.MANAGER}, None),
    (S.LOST, T.COOL_OFF_ENDED): (S.RECYCLED, {R.SYSTEM}, None),
    (S.RECYCLED, T.REQUALIFY): (S.MQL, {R.SYSTEM}, None),
    (S.DISQUALIFIED, T.REOPEN): (S.RECYCLED, {R.MANAGER}, None),
    (S.LOST, T.REOPEN): (S.RECYCLED, {R.MANAGER}, None),
}

# What the refusal message calls each trigger.
VERB = {
    T.SCORE_THRESHOLD: "score threshold",
    T.FAST_TRACK: "fast track",
    T.AUTO_ACCEPT: "auto accept",
    T.ACCEPT: "accept",
    T.REJECT_DISQUALIFY: "disqualify",
    T.REJECT_RECYCLE: "recycle",
    T.QUALIFY: "qualify",
    T.WON: "close as won",
    T.LOST: "close as lost",
    T.DECAY_BELOW_THRESHOLD: "decay below threshold",
    T.NEGATIVE_CRITERIA: "negative criteria",
    T.COOL_OFF_ENDED: "cool off ended",
    T.REQUALIFY: "requalify",
    T.REOPEN: "reopen",
}

# Which stages a trigger is legal from, in table order, as the message lists them.
SOURCES_ON = {
    T.SCORE_THRESHOLD: "iql",
    T.FAST_TRACK: "iql",
    T.AUTO_ACCEPT: "mql",
    T.ACCEPT: "mql",
    T.REJECT_DISQUALIFY: "mql or sal or sql",
    T.REJECT_RECYCLE: "mql or sal or sql",
    T.QUALIFY: "mql or sal",
    T.WON: "sql",
    T.LOST: "sql",
    T.DECAY_BELOW_THRESHOLD: "mql",
    T.NEGATIVE_CRITERIA: "mql",
    T.COOL_OFF_ENDED: "lost",
    T.REQUALIFY: "recycled",
    T.REOPEN: "disqualified or lost",
}
SOURCES_OFF = {**SOURCES_ON, T.AUTO_ACCEPT: None, T.QUALIFY: "sal"}  # None: the model does not enable it


def _row_id(t: Transition) -> str:
    return f"{t.source.value}-{t.trigger.value}"


def test_the_table_is_exactly_the_agreed_funnel():
    actual = {(t.source, t.trigger): (t.target, set(t.roles), t.shortcut) for t in TRANSITIONS}
    assert actual == EXPECTED
    assert len(TRANSITIONS) == len(EXPECTED)  # one move per (stage, trigger): no duplicate rows


def test_every_row_explains_itself():
    for t in TRANSITIONS:
        assert t.why.strip(), f"{_row_id(t)} has no why"


def test_terminal_stages_have_no_way_out_but_reopen_or_cool_off():
    assert {t.trigger for t in TRANSITIONS if t.source == S.WON} == set()
    assert {t.trigger for t in TRANSITIONS if t.source == S.DISQUALIFIED} == {T.REOPEN}
    assert {t.trigger for t in TRANSITIONS if t.source == S.LOST} == {T.REOPEN, T.COOL_OFF_ENDED}


def test_leads_are_never_dropped_every_stage_but_won_leads_somewhere():
    """Domain: leads are never dropped. Every stage except won has an exit, and all roads can reach MQL again."""
    reach = {S.MQL}
    changed = True
    while changed:
        changed = False
        for t in TRANSITIONS:
            if t.target in reach and t.source not in reach:
                reach.add(t.source)
                changed = True
    assert reach == set(Stage) - {S.WON}


@pytest.mark.parametrize("row", TRANSITIONS, ids=_row_id)
@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_each_row_is_allowed_for_its_roles_and_refused_for_every_other(row: Transition, role: Role):
    if role in row.roles:
        move = stages.check("L-7", row.source, row.trigger, role, ALL_ON)
        assert move.target == row.target
        assert move == row
    else:
        with pytest.raises(Refused) as err:
            stages.check("L-7", row.source, row.trigger, role, ALL_ON)
        allowed = ", ".join(sorted(r.value for r in row.roles))
        assert str(err.value) == (
            f"cannot {VERB[row.trigger]} lead L-7: role {role.value} may not; allowed: {allowed}"
        )


NOT_IN_TABLE = [
    (stage, trigger) for stage, trigger in itertools.product(Stage, Trigger) if (stage, trigger) not in EXPECTED
]


@pytest.mark.parametrize("stage,trigger", NOT_IN_TABLE, ids=lambda x: x.value)
@pytest.mark.parametrize("shortcuts", [ALL_ON, ALL_OFF], ids=["shortcuts-on", "shortcuts-off"])
def test_every_move_not_in_the_table_is_refused_for_every_role(stage: Stage, trigger: Trigger, shortcuts):
    expected = SOURCES_ON[trigger] if shortcuts is ALL_ON else SOURCES_OFF[trigger]
    for role in Role:
        with pytest.raises(Refused) as err:
            stages.check("L-7", stage, trigger, role, shortcuts)
        if expected is None:
            assert str(err.value) == f"cannot {VERB[trigger]} lead L-7: this scoring model does not enable it"
        else:
            assert str(err.value) == f"cannot {VERB[trigger]} lead L-7: it is {stage.value}, not {expected}"
        assert stages.find(stage, trigger, shortcuts) is None


def test_the_documented_example_message():
    with pytest.raises(Refused, match=r"^cannot accept lead L-7: it is iql, not mql$"):
        stages.check("L-7", S.IQL, T.ACCEPT, R.PRESALES, ALL_OFF)


def test_a_stage_error_is_reported_before_a_role_error():
    """Marketing trying to accept an IQL learns the stage is wrong (the more useful fact)."""
    with pytest.raises(Refused, match="it is iql, not mql"):
        stages.check("L-7", S.IQL, T.ACCEPT, R.MARKETING, ALL_OFF)


# --------------------------------------------------------------------------- shortcuts


@pytest.mark.parametrize(
    "stage,trigger,flag,role",
    [(S.MQL, T.AUTO_ACCEPT, "auto_accept", R.SYSTEM), (S.MQL, T.QUALIFY, "qualify_from_mql", R.PRESALES)],
)
def test_shortcuts_only_work_when_enabled_in_the_model(stage, trigger, flag, role):
    off = f"it is mql, not {SOURCES_OFF[trigger]}" if SOURCES_OFF[trigger] else "this scoring model does not enable it"
    with pytest.raises(Refused, match=f"{off}$"):
        stages.check("L-7", stage, trigger, role, ALL_OFF)
    assert stages.find(stage, trigger, ALL_OFF) is None
    only_this = Shortcuts(**{flag: True})
    assert stages.check("L-7", stage, trigger, role, only_this).target in (S.SAL, S.SQL)
    other = Shortcuts(**{f: True for f in ("auto_accept", "qualify_from_mql") if f != flag})
    with pytest.raises(Refused):
        stages.check("L-7", stage, trigger, role, other)


def test_sources_follow_the_shortcuts():
    assert stages.sources(T.QUALIFY, ALL_OFF) == [S.SAL]
    assert stages.sources(T.QUALIFY, ALL_ON) == [S.MQL, S.SAL]
    assert stages.sources(T.AUTO_ACCEPT, ALL_OFF) == []
    assert stages.sources(T.REOPEN, ALL_OFF) == [S.DISQUALIFIED, S.LOST]


def test_default_model_has_both_shortcuts_off():
    lead = mql_lead()
    assert lead.state.stage == S.MQL  # no auto-accept
    with pytest.raises(Refused, match="cannot qualify lead L-7: it is mql, not sal"):
        lead.execute(Qualify(by=PRESALES, bant=BANT_3), T0)
    assert lead.state.stage == S.MQL


def test_auto_accept_shortcut_makes_an_mql_sal_without_presales():
    lead = new_lead(auto_accept_model())
    lead.ingest(event("d-1", "demo_request", T0), T0)
    assert lead.state.stage == S.SAL
    assert [v.stage for v in lead.state.history] == [S.IQL, S.MQL, S.SAL]
    assert [v.trigger for v in lead.state.history] == [None, T.FAST_TRACK, T.AUTO_ACCEPT]
    # the presales decision SLA opened on MQL is cancelled (not met: nobody decided), not left open;
    # the accepted lead has its qualification deadline
    assert [x.name for x in lead.state.slas] == ["presales_qualification"]


def test_auto_accept_effects():
    lead = new_lead(auto_accept_model())
    lead.ingest(event("d-1", "demo_request", T0), T0)
    fx = lead.take_effects()
    assert stage_changes(fx) == [(S.IQL, S.MQL, "fast_track"), (S.MQL, S.SAL, "auto_accept")]
    assert len(outbound_of(fx, OutboundKind.HANDOVER)) == 1
    cancelled = of_kind(fx, AuditKind.SLA_CANCELLED)
    assert [a.rule for a in cancelled] == ["presales_decision"]


def test_qualify_from_mql_shortcut_lets_presales_qualify_directly():
    lead = mql_lead(qualify_from_mql_model())
    with pytest.raises(Refused, match="role sales may not; allowed: manager, presales"):
        lead.execute(Qualify(by=SALES, bant=BANT_3), T0)
    lead.execute(Qualify(by=PRESALES, bant=BANT_3), T0)
    assert lead.state.stage == S.SQL
    assert lead.state.qualified_by == "bant 3/4: budget, authority, need"


def test_manager_may_do_what_presales_may():
    lead = mql_lead()
    lead.execute(Accept(by=MANAGER), T0)
    assert lead.state.stage == S.SAL
