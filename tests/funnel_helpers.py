"""Shared helpers for the direct tests of the pure core (funnel/).

A plain module (not a conftest): tests import what they need explicitly.
Every time is a fixed, aware UTC datetime; the core never reads the clock.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

from funnel.lead import Effects, Lead
from funnel.models import (
    SYSTEM,
    Accept,
    ActivityEvent,
    Actor,
    AuditEntry,
    AuditKind,
    Bant,
    Close,
    LogContact,
    Meddic,
    Outbound,
    OutboundKind,
    ProfileUpdate,
    Qualify,
    Reject,
    Reopen,
    Role,
    Stage,
)
from funnel.scoring_model import ScoringModel, load_model, parse_model

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_PATH = ROOT / "scoring_models" / "default.toml"
DEFAULT_TOML = DEFAULT_MODEL_PATH.read_text(encoding="utf-8")

T0 = datetime(2026, 1, 1, tzinfo=UTC)
LEAD = "L-7"

PRESALES = Actor(name="pia", role=Role.PRESALES)
SALES = Actor(name="sam", role=Role.SALES)
MANAGER = Actor(name="mona", role=Role.MANAGER)
MARKETING = Actor(name="mark", role=Role.MARKETING)
SYSTEM_ACTOR = SYSTEM
ACTORS = {Role.SYSTEM: SYSTEM, Role.MARKETING: MARKETING, Role.PRESALES: PRESALES, Role.SALES: SALES,
          Role.MANAGER: MANAGER}

BANT_3 = Bant(budget=True, authority=True, need=True)
MEDDIC_5 = Meddic(metrics=True, economic_buyer=True, decision_criteria=True, decision_process=True, identify_pain=True)


def days(n: float) -> timedelta:
    return timedelta(days=n)


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def default_model() -> ScoringModel:
    return load_model(DEFAULT_MODEL_PATH)


def model_text(*replacements: tuple[str, str]) -> str:
    """The default TOML with each (old, new) replaced once; `old` must be there (no silent no-op)."""
    text = DEFAULT_TOML
    for old, new in replacements:
        assert old in text, f"{old!r} not in default.toml: the test's variant is stale"
        text = text.replace(old, new, 1)
    return text


def variant(*replacements: tuple[str, str]) -> ScoringModel:
    return parse_model(model_text(*replacements), "variant.toml")


def points_decay_model(points: float = 10) -> ScoringModel:
    return variant(("percent = 25", f"points = {points:g}"))


def auto_accept_model() -> ScoringModel:
    return variant(("auto_accept = false", "auto_accept = true"))


def qualify_from_mql_model() -> ScoringModel:
    return variant(("qualify_from_mql = false", "qualify_from_mql = true"))


def event(event_id: str, type_: str, at: datetime, lead_id: str = LEAD, channel: str | None = None,
          **attributes) -> ActivityEvent:
    return ActivityEvent(event_id=event_id, lead_id=lead_id, type=type_, occurred_at=at, channel=channel,
                         attributes=attributes)


def facts(update_id: str, lead_id: str = LEAD, actor: Actor = SYSTEM, **values) -> ProfileUpdate:
    return ProfileUpdate(update_id=update_id, lead_id=lead_id, facts=values, actor=actor)


def new_lead(model: ScoringModel | None = None, now: datetime = T0, lead_id: str = LEAD, keep_effects: bool = False,
             **kwargs) -> Lead:
    """A fresh IQL lead; its creation effects are taken away unless `keep_effects`."""
    lead = Lead.create(lead_id, model or default_model(), now, **kwargs)
    if not keep_effects:
        lead.take_effects()
    return lead


_ids = itertools.count(1)


def feed(lead: Lead, type_: str, at: datetime, event_id: str | None = None, now: datetime | None = None,
         **kwargs) -> None:
    """Ingest one event at `at` (received at `now`, by default the same moment), with a fresh id."""
    event_id = event_id or f"auto-{next(_ids)}"
    lead.ingest(event(event_id, type_, at, lead_id=lead.state.lead_id, **kwargs), at if now is None else now)


def mql_lead(model: ScoringModel | None = None, now: datetime = T0, **kwargs) -> Lead:
    """A lead made MQL by a demo request (fast track) at `now`; effects taken."""
    lead = new_lead(model, now, **kwargs)
    lead.ingest(event("demo-1", "demo_request", now, lead_id=lead.state.lead_id), now)
    assert lead.state.stage == Stage.MQL
    lead.take_effects()
    return lead


def sal_lead(model: ScoringModel | None = None, now: datetime = T0, **kwargs) -> Lead:
    lead = mql_lead(model, now, **kwargs)
    lead.execute(Accept(by=PRESALES), now)
    assert lead.state.stage == Stage.SAL
    lead.take_effects()
    return lead


def sql_lead(model: ScoringModel | None = None, now: datetime = T0, **kwargs) -> Lead:
    lead = sal_lead(model, now, **kwargs)
    lead.execute(Qualify(by=PRESALES, bant=BANT_3), now)
    assert lead.state.stage == Stage.SQL
    lead.take_effects()
    return lead


def lost_lead(model: ScoringModel | None = None, now: datetime = T0, **kwargs) -> Lead:
    lead = sql_lead(model, now, **kwargs)
    lead.execute(Close(by=SALES, outcome="lost", reason="no_budget"), now)
    assert lead.state.stage == Stage.LOST
    lead.take_effects()
    return lead


def disqualified_lead(model: ScoringModel | None = None, now: datetime = T0, **kwargs) -> Lead:
    lead = mql_lead(model, now, **kwargs)
    lead.execute(Reject(by=PRESALES, reason="competitor"), now)
    assert lead.state.stage == Stage.DISQUALIFIED
    lead.take_effects()
    return lead


def recycled_lead(model: ScoringModel | None = None, now: datetime = T0, **kwargs) -> Lead:
    lead = mql_lead(model, now, **kwargs)
    lead.execute(Reject(by=PRESALES, reason="not_now", recycle=True), now)
    assert lead.state.stage == Stage.RECYCLED
    lead.take_effects()
    return lead


def of_kind(effects: Effects, kind: AuditKind) -> list[AuditEntry]:
    return [a for a in effects.audit if a.kind == kind]


def outbound_of(effects: Effects, kind: OutboundKind) -> list[Outbound]:
    return [o for o in effects.outbound if o.kind == kind]


def stage_changes(effects: Effects) -> list[tuple[Stage | None, Stage | None, str | None]]:
    return [(a.from_stage, a.to_stage, a.trigger and a.trigger.value)
            for a in effects.audit if a.kind == AuditKind.STAGE_CHANGED]


__all__ = [
    "ACTORS",
    "BANT_3",
    "DEFAULT_MODEL_PATH",
    "DEFAULT_TOML",
    "LEAD",
    "MANAGER",
    "MARKETING",
    "MEDDIC_5",
    "PRESALES",
    "SALES",
    "SYSTEM_ACTOR",
    "T0",
    "Accept",
    "Bant",
    "Close",
    "LogContact",
    "Meddic",
    "Qualify",
    "Reject",
    "Reopen",
    "assert_score_consistent",
    "counts",
    "folded",
    "auto_accept_model",
    "days",
    "default_model",
    "disqualified_lead",
    "event",
    "facts",
    "feed",
    "hours",
    "lost_lead",
    "model_text",
    "mql_lead",
    "new_lead",
    "of_kind",
    "outbound_of",
    "points_decay_model",
    "qualify_from_mql_model",
    "recycled_lead",
    "sal_lead",
    "sql_lead",
    "stage_changes",
    "variant",
]


def assert_score_consistent(lead: Lead) -> None:
    """The breakdown explains the score exactly: per rule, fit and engagement parts add up."""
    score = lead.state.score
    fit = sum(v for k, v in score.breakdown.items() if k.startswith("fit:"))
    engagement = sum(v for k, v in score.breakdown.items() if not k.startswith("fit:"))
    assert round(fit, 2) == round(score.fit, 2), score
    assert round(engagement, 2) == round(score.engagement, 2), score
    assert round(fit + engagement, 2) == score.total, score
    assert all(v != 0 for v in score.breakdown.values()), score


def folded(lead: Lead):
    """The lead's engagement fold as of its last evaluation (counts, clock, decay steps)."""
    from funnel.engagement import fold

    return fold(lead.model, lead.state.engagement, lead.state.evaluated_at).state


def counts(lead: Lead) -> dict[str, int]:
    return {t: tally.counted for t, tally in folded(lead).tallies.items() if tally.counted}
