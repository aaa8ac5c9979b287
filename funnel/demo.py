"""A realistic population to try Leadflow on (`leadflow demo-data`): leads from several
channels and campaigns, sessions of visits, webinars, downloads and demo requests, profile
facts, presales and sales decisions and won/lost outcomes, each lead played through the real
core (funnel.lead.Lead) so its history is exactly what the service would have recorded.

Every lead has a hidden propensity to buy: the log-odds of winning are a sum of known
effects (EVENT_EFFECTS per event type it showed, FIT_EFFECTS per profile fact), so a
model learned from the outcomes can be checked against the truth. Pure and seeded: the same
seed gives the same population.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Iterator

from funnel.lead import Lead
from funnel.models import (
    Accept, ActivityEvent, Actor, AuditEntry, Bant, Close, LogContact, ProfileUpdate, Qualify, Refused, Reject, Role,
    Stage,
)
from funnel.scoring_model import ScoringModel

# The truth behind the outcomes: log-odds of winning added per event type shown (once per
# type) and per fact, over a base. A learned model should rank them alike.
BASE_LOG_ODDS = -3.2
EVENT_EFFECTS = {
    "demo_request": 1.6, "webinar_attended": 1.0, "pricing_page_visit": 0.7, "content_download": 0.35,
    "email_click": 0.2, "website_visit": 0.05, "email_open": 0.0, "newsletter_signup": 0.1, "unsubscribe": -1.2,
}
FIT_EFFECTS = {"target_account": 0.8, "decision_maker": 0.6, "industry": 0.4, "student": -1.5}
CHANNELS = {  # channel: (share of leads, engagement tilt, campaigns)
    "web": (0.35, 0.0, ["seo", "blog"]),
    "webinar": (0.2, 0.6, ["summit", "deep-dive"]),
    "partner": (0.1, 0.8, ["reseller"]),
    "paid_search": (0.2, -0.4, ["brand", "generic"]),
    "email": (0.15, -0.2, ["newsletter", "spring"]),
}
PRESALES = ["presales-1", "presales-2", "presales-3"]
SALES = ["sales-1", "sales-2"]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass
class DemoLead:
    lead_id: str
    channel: str
    propensity: float  # the hidden probability of winning, given what the lead shows
    entries: list[AuditEntry] = field(default_factory=list)
    events: list[tuple[ActivityEvent, datetime]] = field(default_factory=list)  # (event, received at)
    updates: list[tuple[ProfileUpdate, datetime]] = field(default_factory=list)


def _facts(rng: random.Random, quality: float) -> dict:
    facts: dict = {
        "company_size": int(math.exp(rng.gauss(4.0 + 0.6 * quality, 1.2))),
        "industry": rng.choice(["software", "manufacturing", "finance"] if rng.random() < _sigmoid(quality)
                               else ["retail", "education", "public"]),
        "seniority": rng.choice(["c_level", "vp", "director"] if rng.random() < _sigmoid(quality - 0.5)
                                else ["manager", "staff"]),
        "country": rng.choice(["DE", "DE", "AT", "CH", "FR", "US"]),
    }
    if rng.random() < _sigmoid(quality - 1.0):
        facts["target_account"] = True
    if quality < -0.8 and rng.random() < 0.3:
        facts["student"] = True
    return facts


def _sessions(rng: random.Random, quality: float, start: datetime, horizon: timedelta) -> list[tuple[str, datetime]]:
    """Sessions of activity over the lead's life: what it did, when."""
    found: list[tuple[str, datetime]] = []
    for n in range(1 + int(rng.expovariate(1 / (1.5 + 2.5 * _sigmoid(quality))))):
        at = start + timedelta(seconds=rng.uniform(0, horizon.total_seconds()) if n else 0)
        kinds = ["website_visit"] * rng.randint(1, 4)
        if rng.random() < 0.5:
            kinds += ["email_open"] + (["email_click"] if rng.random() < 0.4 else [])
        if rng.random() < 0.45 * _sigmoid(quality):
            kinds.append("pricing_page_visit")
        if rng.random() < 0.3 * _sigmoid(quality + 0.5):
            kinds.append("content_download")
        if rng.random() < 0.2 * _sigmoid(quality):
            kinds += ["webinar_registration", "webinar_attended"]
        if rng.random() < 0.06 * _sigmoid(2 * quality):
            kinds.append("demo_request")
        if rng.random() < 0.04 * _sigmoid(-quality):
            kinds.append("unsubscribe")
        for i, kind in enumerate(kinds):
            found.append((kind, at + timedelta(minutes=3 * i + rng.uniform(0, 2))))
    return found


def generate(count: int, model: ScoringModel, now: datetime, seed: int = 7, days: int = 365,
             decision_delay: timedelta = timedelta(0), prefix: str = "demo") -> list[DemoLead]:
    """`count` leads created over the `days` before `now`, each played through the core
    (with the service's decision delay, as its leads decide)."""
    return list(generate_each(count, model, now, seed, days, decision_delay, prefix))


def generate_each(count: int, model: ScoringModel, now: datetime, seed: int = 7, days: int = 365,
                  decision_delay: timedelta = timedelta(0), prefix: str = "demo") -> Iterator[DemoLead]:
    """The leads of `generate`, the same ones, one at a time: a big population need not fit
    in memory (100,000 demo leads held at once took 7 GB)."""
    rng = random.Random(seed)
    names = list(CHANNELS)
    weights = [CHANNELS[c][0] for c in names]
    for n in range(count):
        yield _one(rng, f"{prefix}-{n:06d}", rng.choices(names, weights)[0], model, now, days, decision_delay)


def _one(rng: random.Random, lead_id: str, channel: str, model: ScoringModel, now: datetime, days: int,
         decision_delay: timedelta) -> DemoLead:
    _, tilt, campaigns = CHANNELS[channel]
    quality = rng.gauss(tilt, 1.0)
    created = now - timedelta(days=rng.uniform(1, days), seconds=rng.uniform(0, 3600))
    activity = sorted(((kind, at) for kind, at in _sessions(rng, quality, created, timedelta(days=120)) if at < now),
                      key=lambda x: x[1])  # what would happen after now has not happened yet
    facts = _facts(rng, quality)
    shown = {kind for kind, _ in activity}
    fit = {"target_account": facts.get("target_account", False), "student": facts.get("student", False),
           "decision_maker": facts["seniority"] in ("c_level", "vp", "director"),
           "industry": facts["industry"] in ("software", "manufacturing", "finance")}
    log_odds = (BASE_LOG_ODDS + sum(EVENT_EFFECTS.get(k, 0.0) for k in shown)
                + sum(effect for name, effect in FIT_EFFECTS.items() if fit[name]))
    demo = DemoLead(lead_id, channel, _sigmoid(log_odds))
    campaign = rng.choice(campaigns)

    # Inputs in time order; decisions are scheduled as the lead reaches the stages that call for them.
    # Presales decides a lead's fate once, at its first handover (later handovers are "not
    # now" again): otherwise busier leads would get more tries, and what is learned from
    # the outcomes would be how busy a lead is rather than its propensity.
    queue: list[tuple[datetime, int, str, object]] = []
    n = 0

    def push(at: datetime, kind: str, item: object) -> None:
        nonlocal n
        if at <= now:
            heapq.heappush(queue, (at, n, kind, item))
            n += 1

    first_at = activity[0][1]
    lead = Lead.create(lead_id, model, first_at, channel=channel, decision_delay=decision_delay)
    push(first_at + timedelta(minutes=1), "facts", ProfileUpdate(update_id=f"{lead_id}-p1", lead_id=lead_id, facts=facts))
    for i, (kind, at) in enumerate(activity):
        push(at + timedelta(seconds=rng.uniform(1, 90)), "event", ActivityEvent(
            event_id=f"{lead_id}-e{i}", lead_id=lead_id, type=kind, occurred_at=at, channel=channel,
            campaign=campaign if i == 0 or rng.random() < 0.3 else None, source="demo-data"))
    decided_visit = -1
    while queue:
        at, _, kind, item = heapq.heappop(queue)
        if kind == "event":
            lead.ingest(item, at)  # type: ignore[arg-type]
            demo.events.append((item, at))  # type: ignore[arg-type]
        elif kind == "facts":
            lead.update_profile(item, at)  # type: ignore[arg-type]
            demo.updates.append((item, at))  # type: ignore[arg-type]
        elif kind == "tick":  # the lead's own decision, after its delay
            lead.tick(at)
        elif kind == "owner":
            lead.tick(at)
            lead.assign_owner(*item)  # type: ignore[misc]
        else:
            try:
                lead.execute(item, at)  # type: ignore[arg-type]
            except Refused:
                continue
        s = lead.state
        if s.decision_due_at is not None and kind != "tick":
            push(s.decision_due_at, "tick", None)
        if s.stage == Stage.MQL and len(s.history) - 1 != decided_visit:  # a new handover: presales decides
            first = decided_visit < 0
            decided_visit = len(s.history) - 1
            who = Actor(name=rng.choice(PRESALES), role=Role.PRESALES)
            push(at, "owner", (who.name, at))
            later = at + timedelta(hours=rng.uniform(2, 72))
            if not first:  # the lead's fate was decided at its first handover: "not now" stays not now
                push(later, "command", Reject(by=who, reason="not_now", recycle=True))
            elif rng.random() < _sigmoid(log_odds + 0.5):
                push(later - timedelta(hours=1), "command", LogContact(by=who))
                push(later, "command", Accept(by=who))
                push(later + timedelta(days=rng.uniform(1, 10)), "command",
                     Qualify(by=who, bant=Bant(budget=True, authority=True, need=True, timing=rng.random() < 0.7)))
            elif rng.random() < 0.6:
                push(later, "command", Reject(by=who, reason=rng.choice(["no_budget", "no_need", "wrong_audience"])))
            else:
                push(later, "command", Reject(by=who, reason="not_now", recycle=True))
        elif s.stage == Stage.SQL and s.owner not in SALES:
            seller = Actor(name=rng.choice(SALES), role=Role.SALES)
            push(at, "owner", (seller.name, at, "sales"))
            push(at + timedelta(days=rng.uniform(0.5, 3)), "command", LogContact(by=seller))
            won = rng.random() < demo.propensity
            push(at + timedelta(days=rng.uniform(5, 40)), "command",
                 Close(by=seller, outcome="won" if won else "lost",
                       reason=None if won else rng.choice(["price", "competitor", "no_decision"])))
    lead.tick(now)
    demo.entries = lead.take_effects().audit
    return demo
