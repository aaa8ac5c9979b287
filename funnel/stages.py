"""The stage machine: one explicit table of every legal move through the funnel.

A move is (from stage, trigger) -> to stage, with the roles allowed to cause
it and, for configured shortcuts, the model switch that enables it. Anything
not in the table is refused with a message that says why.
"""

from __future__ import annotations

from typing import NamedTuple

from funnel.models import Refused, Role, Stage, Trigger
from funnel.scoring_model import Shortcuts

S, T, R = Stage, Trigger, Role
HUMANS_PRESALES = frozenset({R.PRESALES, R.MANAGER})
HUMANS_SALES = frozenset({R.PRESALES, R.SALES, R.MANAGER})
SALES = frozenset({R.SALES, R.MANAGER})
MANAGER = frozenset({R.MANAGER})
SYSTEM = frozenset({R.SYSTEM})


class Transition(NamedTuple):
    source: Stage
    trigger: Trigger
    target: Stage
    roles: frozenset[Role]
    shortcut: str | None = None  # name of the Shortcuts flag that must be on
    why: str = ""


TRANSITIONS: tuple[Transition, ...] = (
    # marketing qualifies: score or a fast-track activity
    Transition(S.IQL, T.SCORE_THRESHOLD, S.MQL, SYSTEM, why="score reached the MQL threshold"),
    Transition(S.IQL, T.FAST_TRACK, S.MQL, SYSTEM, why="fast-track activity"),
    # presales decides on the MQL
    Transition(S.MQL, T.ACCEPT, S.SAL, HUMANS_PRESALES, why="presales accepted"),
    Transition(S.MQL, T.AUTO_ACCEPT, S.SAL, SYSTEM, shortcut="auto_accept", why="auto-accept shortcut"),
    Transition(S.MQL, T.REJECT_DISQUALIFY, S.DISQUALIFIED, HUMANS_PRESALES, why="presales disqualified"),
    Transition(S.MQL, T.REJECT_RECYCLE, S.RECYCLED, HUMANS_PRESALES, why="presales: not now"),
    Transition(S.MQL, T.DECAY_BELOW_THRESHOLD, S.RECYCLED, SYSTEM, why="decayed below threshold before acceptance"),
    Transition(S.MQL, T.NEGATIVE_CRITERIA, S.RECYCLED, SYSTEM,
               why="negative criteria took it below the threshold before acceptance"),
    Transition(
        S.MQL, T.QUALIFY, S.SQL, HUMANS_PRESALES, shortcut="qualify_from_mql", why="qualified straight from MQL"
    ),
    # presales/sales qualify the accepted lead
    Transition(S.SAL, T.QUALIFY, S.SQL, HUMANS_SALES, why="qualified (BANT/MEDDIC)"),
    Transition(S.SAL, T.REJECT_DISQUALIFY, S.DISQUALIFIED, HUMANS_SALES, why="disqualified after acceptance"),
    Transition(S.SAL, T.REJECT_RECYCLE, S.RECYCLED, HUMANS_SALES, why="not now, after acceptance"),
    # sales works the opportunity
    Transition(S.SQL, T.WON, S.WON, SALES, why="deal won"),
    Transition(S.SQL, T.LOST, S.LOST, SALES, why="deal lost"),
    Transition(S.SQL, T.REJECT_DISQUALIFY, S.DISQUALIFIED, SALES, why="disqualified by sales"),
    Transition(S.SQL, T.REJECT_RECYCLE, S.RECYCLED, SALES, why="not now, by sales"),
    # leads are never dropped: they come back
    Transition(S.LOST, T.COOL_OFF_ENDED, S.RECYCLED, SYSTEM, why="lost deal back to nurturing after cool-off"),
    Transition(S.RECYCLED, T.REQUALIFY, S.MQL, SYSTEM, why="requalified after cool-off"),
    Transition(S.DISQUALIFIED, T.REOPEN, S.RECYCLED, MANAGER, why="manager reopened"),
    Transition(S.LOST, T.REOPEN, S.RECYCLED, MANAGER, why="manager reopened"),
)

_BY_KEY: dict[tuple[Stage, Trigger], Transition] = {(t.source, t.trigger): t for t in TRANSITIONS}
assert len(_BY_KEY) == len(TRANSITIONS), "one move per (stage, trigger)"

# What each trigger expects the lead to be in, for the refusal message.
_VERB = {
    T.ACCEPT: "accept",
    T.REJECT_DISQUALIFY: "disqualify",
    T.REJECT_RECYCLE: "recycle",
    T.QUALIFY: "qualify",
    T.WON: "close as won",
    T.LOST: "close as lost",
    T.REOPEN: "reopen",
}


def find(stage: Stage, trigger: Trigger, shortcuts: Shortcuts) -> Transition | None:
    move = _BY_KEY.get((stage, trigger))
    if move is None or (move.shortcut and not getattr(shortcuts, move.shortcut)):
        return None
    return move


def sources(trigger: Trigger, shortcuts: Shortcuts) -> list[Stage]:
    return [t.source for t in TRANSITIONS if t.trigger == trigger and find(t.source, trigger, shortcuts)]


def check(lead_id: str, stage: Stage, trigger: Trigger, role: Role, shortcuts: Shortcuts) -> Transition:
    """The move for `trigger` from `stage`, or Refused saying why not."""
    move = find(stage, trigger, shortcuts)
    verb = _VERB.get(trigger, trigger.value.replace("_", " "))
    if move is None:
        allowed = sources(trigger, shortcuts)
        if not allowed:
            raise Refused(f"cannot {verb} lead {lead_id}: this scoring model does not enable it")
        expected = " or ".join(s.value for s in allowed)
        raise Refused(f"cannot {verb} lead {lead_id}: it is {stage.value}, not {expected}")
    if role not in move.roles:
        may = ", ".join(sorted(r.value for r in move.roles))
        raise Refused(f"cannot {verb} lead {lead_id}: role {role.value} may not; allowed: {may}")
    return move
