"""The core's fast paths give what the general path gives (speed work, bench/backtest.py).

- `funnel.models.assign` writes a field as pydantic's `setattr` does (value, fields set),
  for every state model the core assigns with it.
- `Lead._due` answers tick's question ("is any timer due by now?") as the listed timers do,
  for every lead state a demo population passes through, at and around each timer's time.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from config import DEFAULT_MODEL
from funnel import demo, engagement as eng
from funnel.lead import Lead
from funnel.models import ConsentRecord, EngagementLog, FoldState, LeadState, Score, WindowEvent, assign
from funnel.scoring_model import load_model

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
MODEL = load_model(DEFAULT_MODEL)
CONSENT = ConsentRecord(email=False, since=NOW, source="unsubscribe e-1")


def _fresh(cls):
    return cls(lead_id="L-1", created_at=NOW, stage_since=NOW) if cls is LeadState else cls()


@pytest.mark.parametrize("cls, values", [
    (Score, {"engagement": 12.5, "breakdown": {"website_visit": 12.5}}),
    (Score, {"fit": -3.0}),
    (LeadState, {"evaluated_at": NOW, "next_decay_at": None, "event_consent": CONSENT}),
    (LeadState, {"channel": "web", "audit_seq": 7, "events_applied": 3}),
    (FoldState, {"positive": 4.0, "decay_steps": 2}),
    (EngagementLog, {"window": []}),
])
def test_assign_is_setattr(cls, values):
    assert not cls.model_config.get("validate_assignment") and not cls.model_config.get("frozen")
    assert not cls.__private_attributes__
    fast, slow = _fresh(cls), _fresh(cls)
    assign(fast, **values)
    for name, value in values.items():
        setattr(slow, name, value)
    assert list(fast.__dict__.items()) == list(slow.__dict__.items())
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.model_dump_json() == slow.model_dump_json()


def _probes(lead: Lead, at: datetime) -> list[datetime]:
    times = [at] + [t for t, _, _ in lead._timers()]
    return [t + d for t in times for d in (timedelta(0), timedelta(microseconds=-1), timedelta(microseconds=1))]


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), delay=st.sampled_from([timedelta(0), timedelta(seconds=5)]))
def test_due_is_what_the_timers_say(seed, delay):
    """Every tick of a demo population (events, profile updates, commands, timers of every
    kind: decay, SLAs, decisions, nurture, cool-off) asks both and gets one answer."""
    checked = []
    tick = Lead.tick

    def checking_tick(lead: Lead, now: datetime) -> None:
        for t in _probes(lead, now):
            assert lead._due(t) == any(at <= t for at, _, _ in lead._timers()), (lead.state.lead_id, t)
        checked.append(bool(lead._timers()))
        tick(lead, now)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Lead, "tick", checking_tick)
        demo.generate(25, MODEL, NOW, seed=seed, decision_delay=delay)
    assert any(checked) and len(checked) > 100  # leads with timers were asked, many times


def _log(events: list[tuple[str, int]]) -> EngagementLog:
    log = EngagementLog()
    for i, (kind, hour) in enumerate(events):
        log.add(WindowEvent(event_id=f"e-{i}", type=kind, occurred_at=NOW + timedelta(hours=hour), channel="web"))
    return log


@settings(max_examples=60, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["website_visit", "demo_request", "webinar_attended",
                                                  "unsubscribe", "pricing_page_visit"]), st.integers(0, 2000)),
                       min_size=1, max_size=8),
       offsets=st.lists(st.integers(0, 400 * 24), min_size=1, max_size=8))
def test_a_fold_that_decays_on_from_the_cache_is_a_fold_from_scratch(events, offsets):
    """Folds with nothing new after the cached point, at later (and sometimes earlier) times
    after the newest event: an idle lead's timers, which decay on from the last such fold.
    The same state as a fold of everything, and the same decay steps after the latest time
    folded to before (the lead's last evaluation: what Lead._rescore reads of them)."""
    log = _log(events)
    cache = eng.FoldCache()
    newest = evaluated = log.window[-1].occurred_at
    eng.fold(MODEL, log, newest, cache, explain=False)
    for offset in offsets:
        until = newest + timedelta(hours=offset)
        cached, full = eng.fold(MODEL, log, until, cache), eng.fold(MODEL, log, until)
        assert cached.state.model_dump() == full.state.model_dump()
        assert ([c for c in cached.contributions if c.at > evaluated]
                == [c for c in full.contributions if c.key.startswith("d:") and c.at > evaluated])
        assert cache.decayed is not None  # the path under test was taken
        evaluated = max(evaluated, until)
