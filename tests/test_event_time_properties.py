"""Event time is the truth: properties over generated event sets (hypothesis).

A lead's score, breakdown, stage path and outbound messages are a function of its
events (by occurred_at), facts (by observed_at), commands and model. They must not
depend on the order the inputs arrive in, on how they are batched, or on how often
a webhook redelivers them. The sets include decay gaps, caps, negative criteria,
count-once types, consent, fast-track events, blocking fit rules and profile facts.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from funnel.engagement import fold
from funnel.kpis import lead_slas
from funnel.lead import Lead
from funnel.models import ActivityEvent, AuditKind, LogContact, OutboundKind, ProfileUpdate, Refused, Reject
from tests.funnel_helpers import LEAD, PRESALES, SALES, T0, days, default_model, hours, variant

MODEL = default_model()
DELAY = timedelta(seconds=30)  # the lead's decision delay in these tests
EVENT_TYPES = [
    "website_visit", "pricing_page_visit", "email_open", "email_click", "content_download", "webinar_attended",
    "newsletter_signup", "live_chat", "video_view", "demo_request", "unsubscribe", "email_bounced", "resubscribe",
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Occurred times cluster (sessions of a few hours) with gaps long enough for decay.
offsets = st.one_of(
    st.integers(0, 200 * 24).map(lambda h: timedelta(hours=h)),
    st.sampled_from([0, 1, 2, 29, 30, 31, 45, 60, 61, 90]).map(lambda d: timedelta(days=d)),
)
fact_values = st.fixed_dictionaries({}, optional={
    "target_account": st.booleans(),
    "company_size": st.integers(10, 10_000),
    "industry": st.sampled_from(["software", "retail", "finance"]),
    "competitor": st.booleans(),
    "student": st.booleans(),
    "email_consent": st.booleans(),
}).filter(bool)


@st.composite
def inputs(draw, max_events: int = 14):
    """Events and profile updates of one lead, each with a unique id."""
    n = draw(st.integers(1, max_events))
    events = [
        ActivityEvent(event_id=f"e-{i}", lead_id=LEAD, type=draw(st.sampled_from(EVENT_TYPES)),
                      occurred_at=T0 + draw(offsets), channel=draw(st.sampled_from([None, "web", "webinar", "ads"])))
        for i in range(n)
    ]
    updates = [
        ProfileUpdate(update_id=f"p-{i}", lead_id=LEAD, facts=draw(fact_values),
                      observed_at=T0 + draw(offsets))
        for i in range(draw(st.integers(0, 3)))
    ]
    return events + updates


@st.composite
def deliveries(draw, items: list):
    """The same items in some order, split into batches, some delivered more than once."""
    order = draw(st.permutations(items))
    repeats = draw(st.lists(st.sampled_from(items), max_size=3)) if items else []
    order = list(order) + repeats
    cuts = sorted(draw(st.sets(st.integers(1, max(len(order) - 1, 1)), max_size=len(order))))
    batches, start = [], 0
    for cut in cuts + [len(order)]:
        if cut > start:
            batches.append(order[start:cut])
            start = cut
    return batches


def deliver(batches, received, model=MODEL, delay=DELAY, tick_until=None) -> Lead:
    """Everything received at `received`, batch by batch (each a webhook call or a signal),
    then the lead's clock runs on to `tick_until`."""
    lead = Lead.create(LEAD, model, received, decision_delay=delay)
    for batch in batches:
        events = [x for x in batch if isinstance(x, ActivityEvent)]
        if events:
            lead.ingest_many(events, received)
        for update in (x for x in batch if isinstance(x, ProfileUpdate)):
            lead.update_profile(update, received)
    lead.tick(tick_until or received + delay)
    return lead


def outcome(lead: Lead, effects) -> dict:
    s = lead.state
    return {
        "score": s.score.model_dump(),
        "stage": s.stage,
        "path": [(v.stage, v.entered_at, v.trigger) for v in s.history],
        "profile": s.profile,
        "consent": lead.consent().model_dump(),
        "channel": s.channel,
        "outbound": [o.model_dump() for o in effects.outbound],
        "slas": [x.model_dump() for x in s.slas],
        "next_wakeup": lead.next_wakeup(),
    }


def audit_explains_the_score(lead: Lead, effects) -> None:
    """Every point of the score is in the audit, per rule: corrections are entries, not rewrites."""
    per_rule: dict[str, float] = defaultdict(float)
    for entry in effects.audit:
        if entry.kind == AuditKind.SCORE_CHANGED:
            per_rule[entry.rule] += entry.points
    explained = {rule: round(points, 2) for rule, points in per_rule.items() if round(points, 2)}
    assert explained == lead.state.score.breakdown
    # each applied event has exactly one entry of its own, however often it was delivered
    own = [e.event_id for e in effects.audit if e.kind == AuditKind.SCORE_CHANGED and e.event_id]
    assert len(own) == len(set(own)) == lead.state.events_applied


@SETTINGS
@given(data=st.data(), items=inputs(), late=st.integers(0, 72), extra=st.sampled_from([0, 1, 3, 20, 45, 100]))
def test_order_batching_and_redelivery_never_change_the_outcome(data, items, late, extra):
    received = max((x.occurred_at for x in items if isinstance(x, ActivityEvent)), default=T0) + timedelta(hours=late)
    end = received + DELAY + days(extra)
    reference = deliver([sorted(items, key=lambda x: getattr(x, "occurred_at", T0))], received, tick_until=end)
    expected = outcome(reference, reference.take_effects())
    batches = data.draw(deliveries(items))
    lead = deliver(batches, received, tick_until=end)
    effects = lead.take_effects()
    assert outcome(lead, effects) == expected
    audit_explains_the_score(lead, effects)


@SETTINGS
@given(data=st.data(), items=inputs(), gaps=st.lists(st.integers(0, 40 * 24), min_size=1, max_size=6))
def test_the_score_is_a_function_of_the_events_whenever_they_arrive(data, items, gaps):
    """With nothing to decide (threshold out of reach, no fast track), batches may arrive at
    any times, with decay timers firing in between: the final score is the fold of all events."""
    quiet = variant(("mql = 100", "mql = 100000"), ('fast_track = ["demo_request"]', "fast_track = []"))
    batches = data.draw(deliveries(items))
    start = max((x.occurred_at for x in items if isinstance(x, ActivityEvent)), default=T0)
    lead = Lead.create(LEAD, quiet, start, decision_delay=DELAY)
    received = start
    for i, batch in enumerate(batches):
        received += timedelta(hours=gaps[i % len(gaps)])
        lead.tick(received)
        events = [x for x in batch if isinstance(x, ActivityEvent)]
        if events:
            lead.ingest_many(events, received)
        for update in (x for x in batch if isinstance(x, ProfileUpdate)):
            lead.update_profile(update, received)
    end = received + days(3)
    lead.tick(end)
    once = deliver([items], end, model=quiet)
    assert lead.state.score == once.state.score
    assert lead.state.stage == once.state.stage
    audit_explains_the_score(lead, lead.take_effects())


@SETTINGS
@given(items=inputs(max_events=40), window=st.integers(10, 15))
def test_a_bounded_window_scores_exactly_like_an_unbounded_one_for_events_in_order(items, window):
    """The checkpoint that keeps the state small loses nothing for events in time order."""
    small = variant(("max_events = 500", f"max_events = {window}"))
    events = sorted((x for x in items if isinstance(x, ActivityEvent)), key=lambda e: (e.occurred_at, e.event_id))
    bounded = Lead.create(LEAD, small, T0, decision_delay=DELAY)
    unbounded = Lead.create(LEAD, MODEL, T0, decision_delay=DELAY)
    for event in events:
        at = max(event.occurred_at, T0)
        bounded.ingest(event, at)
        unbounded.ingest(event, at)
        assert len(bounded.state.engagement.window) <= window
        assert bounded.state.score == unbounded.state.score
        assert bounded.state.stage == unbounded.state.stage


@SETTINGS
@given(items=inputs())
def test_the_fold_is_what_the_lead_shows(items):
    """The lead's score is exactly the fold of its window at its last evaluation."""
    events = [x for x in items if isinstance(x, ActivityEvent)]
    received = max(e.occurred_at for e in events) if events else T0
    lead = deliver([items], received)
    state = fold(lead.model, lead.state.engagement, lead.state.evaluated_at).state
    assert state.breakdown == {k: v for k, v in lead.state.score.breakdown.items() if not k.startswith("fit:")}
    assert state.engagement == lead.state.score.engagement


FOLLOW_UP = default_model().sla[0]  # webinar_follow_up: an attendance is followed up (a contact) within 12 h
# A demo request fast-tracks the lead at T0; nothing else hands it over (or back, once recycled).
HANDED_ONCE = variant(("mql = 100", "mql = 100000"))


@SETTINGS
@given(attended=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 11)), min_size=1, max_size=6),
       contacts=st.lists(st.integers(0, 40), max_size=3), contact_first=st.booleans(),
       rejected=st.one_of(st.none(), st.tuples(st.integers(1, 40), st.booleans())))
def test_follow_up_deadlines_end_as_in_time_order_whatever_arrives_late(attended, contacts, contact_first, rejected):
    """Webinar attendances (hour, hours late), contacts (hour) and maybe presales rejecting
    the lead (hour, recycled or disqualified) after a demo request made it an MQL at T0. In time order each input is
    taken when it happened; delivered, an attendance arrives late, though before its
    follow-up is due. What escalates, what still runs at the end, and the SLA report's runs
    (outcome, time to met) are the same. `contact_first`: of a contact and an attendance of
    the same hour, which came first."""
    assert FOLLOW_UP.on_event == "webinar_attended" and FOLLOW_UP.due == hours(12)
    events = [ActivityEvent(event_id=f"w-{i}", lead_id=LEAD, type="webinar_attended", occurred_at=T0 + hours(h))
              for i, (h, _) in enumerate(attended)]
    people = [(T0 + hours(h), 0 if contact_first else 2, LogContact(by=SALES)) for h in sorted(contacts)]
    if rejected is not None:
        # (at the same moment a stage change comes first: see funnel.lead.Lead._stage_at)
        hour, recycle = rejected
        people.append((T0 + hours(hour), -1, Reject(by=PRESALES, reason="not_now", recycle=recycle)))

    def run(arrivals: list) -> tuple:
        lead = Lead.create(LEAD, HANDED_ONCE, T0, decision_delay=DELAY)
        lead.ingest(ActivityEvent(event_id="demo", lead_id=LEAD, type="demo_request", occurred_at=T0), T0)
        for at, _, item in sorted(arrivals, key=lambda x: (x[0], x[1])):
            lead.tick(at)
            if isinstance(item, ActivityEvent):
                lead.ingest(item, at)
            else:
                with contextlib.suppress(Refused):  # no contact with a disqualified lead
                    lead.execute(item, at)
        lead.tick(T0 + hours(80))
        effects = lead.take_effects()
        follow_ups = [o for o in effects.outbound if o.kind == OutboundKind.ESCALATION and o.payload["sla"] == FOLLOW_UP.name]
        runs = sorted((r.outcome, r.took or 0.0) for r in lead_slas(effects.audit).runs if r.name == FOLLOW_UP.name)
        return (sorted(o.payload["due_at"] for o in follow_ups), [(x.started_at, x.due_at) for x in lead.state.slas],
                runs, [v.stage for v in lead.state.history])

    in_time_order = run([(e.occurred_at, 1, e) for e in events] + people)
    delivered = run([(e.occurred_at + hours(late), 1, e) for e, (_, late) in zip(events, attended)] + people)
    assert delivered == in_time_order
