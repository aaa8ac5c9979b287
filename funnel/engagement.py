"""Engagement as a function of what happened and when: a fold over time-sorted events.

A lead's engagement (behaviour points, negative criteria, frequency weighting, caps,
decay) used to be added up in arrival order, so the same events scored differently
depending on how webhooks happened to arrive. Here it is *recomputed* from the lead's
events sorted by `occurred_at` (ties by event id) whenever the set changes:

    engagement(now) = fold(checkpoint, window events + anchors in time order, until=now)

- The **window** holds the lead's recent events (at most `late_events.max_events`, none
  older than `late_events.horizon` before the newest). Any event that falls into it
  re-scores it exactly, whatever the order and batching it arrived in.
- The **checkpoint** is the folded state of everything older. It is small (a few numbers
  per event type), so the lead's state stays bounded across continue-as-new.
- **Anchors** are the stage changes that touch engagement: entering MQL restarts the
  inactivity clock (the decay that recycles an unaccepted MQL counts from its MQL entry),
  and recycling resets positive engagement when the model says so.
- An event older than the checkpoint is applied as it is (`apply_beyond_horizon`): its
  negative points, its consent and its count take effect, its positive points do not.

Decay applies to positive engagement only: negative criteria do not decay away.
Pure: no clock, no I/O; every time is an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from funnel.models import Anchor, ConsentRecord, EngagementLog, FoldState, TypeTally, WindowEvent
from funnel.scoring_model import ScoringModel, format_duration, humanize

# Below this much positive engagement, decay rounds to zero (and stops waking the lead).
DECAY_FLOOR = 1.0
# Frequency weighting needs the times of at most this many earlier events of a type.
FREQUENCY_MEMORY_MAX = 50


def _r(x: float) -> float:
    return round(x + 0.0, 2)


@dataclass(slots=True)
class Contribution:
    """One scored item of a fold: an event, a decay step, a reset or a take-back."""

    key: str  # "e:<event id>", "d:<due time>", "r:<time>", "c:<event id>:<type>"
    rule: str
    points: float
    at: datetime
    why: str = ""
    event_id: str | None = None


@dataclass
class FoldResult:
    work: "_Work"
    contributions: list[Contribution]

    @property
    def state(self) -> FoldState:
        return self.work.state()

    def by_key(self) -> dict[str, Contribution]:
        return {c.key: c for c in self.contributions}


# The fold works on plain mutable objects (a pydantic model checks every attribute it is
# given, and the fold sets thousands); FoldState/TypeTally are what the lead's state keeps.
_FIELDS = tuple(FoldState.model_fields)
_TALLY_FIELDS = tuple(TypeTally.model_fields)


@dataclass(slots=True)
class _Tally:
    counted: int = 0
    last_at: datetime | None = None
    cancelled_at: datetime | None = None
    cap_from: datetime | None = None
    cap_points: float = 0.0
    recent: list[datetime] = field(default_factory=list)


@dataclass(slots=True)
class _Work:
    at: datetime | None = None
    after_id: str = ""
    positive: float = 0.0
    negative: float = 0.0
    clock_from: datetime | None = None
    last_activity: datetime | None = None
    decay_steps: int = 0
    tallies: dict[str, _Tally] = field(default_factory=dict)
    breakdown: dict[str, float] = field(default_factory=dict)
    consent: ConsentRecord | None = None
    first_touch: tuple[datetime, str] | None = None
    newest_activity: datetime | None = None

    @property
    def engagement(self) -> float:
        return _r(self.positive + self.negative)

    @classmethod
    def of(cls, state: FoldState) -> "_Work":
        work = cls(**{name: getattr(state, name) for name in _FIELDS if name != "tallies"})
        work.breakdown = dict(state.breakdown)
        work.tallies = {name: _Tally(**{f: getattr(t, f) for f in _TALLY_FIELDS}) for name, t in state.tallies.items()}
        for tally in work.tallies.values():
            tally.recent = list(tally.recent)
        return work

    def state(self) -> FoldState:
        values = {name: getattr(self, name) for name in _FIELDS if name not in ("tallies", "breakdown")}
        tallies = {name: TypeTally.model_construct(**{f: getattr(t, f) for f in _TALLY_FIELDS})
                   for name, t in self.tallies.items()}
        return FoldState.model_construct(**values, tallies=tallies, breakdown=dict(self.breakdown))

    def copy(self) -> "_Work":
        # Spelled out: dataclasses.replace costs as much again, and the fold copies often.
        tallies = {name: _Tally(t.counted, t.last_at, t.cancelled_at, t.cap_from, t.cap_points, list(t.recent))
                   for name, t in self.tallies.items()}
        return _Work(self.at, self.after_id, self.positive, self.negative, self.clock_from, self.last_activity,
                     self.decay_steps, tallies, dict(self.breakdown), self.consent, self.first_touch,
                     self.newest_activity)


# --------------------------------------------------------------------------- the fold


class FoldCache:
    """The folded state just after a lead's newest event, so events in time order continue
    from there (re-applying the stage anchors after it) instead of refolding the window.
    Valid while nothing before that point changes: an event that sorts before it folds
    everything again, and the lead drops the cache when the checkpoint changes.

    The cached state is shared, not copied, with the fold that kept it (`fold` copies it
    before it changes it further) and with the next fold that continues it with new events
    (that fold keeps a later point, so this one is not needed again): most events in order
    then cost no copy at all.

    A fold with nothing new after that point (a decay timer, an input that is no event)
    only decays it; the cache keeps that result too (`decayed`), and the next such fold
    decays on from there instead of from the point again: an idle lead's timers fired each
    decay step again at every later step. Decay steps are the same from either start (each
    depends on the state the one before left); the steps before `decayed` are left out of
    the contributions, and they are all at or before the lead's last evaluation (the fold
    that made `decayed` was up to then), which is where the lead stops reading them."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.ref: str | None = None
        self.events = self.anchors = 0  # how many of each are folded in `work`
        self.last: tuple | None = None  # the key of the last event folded
        self.work: _Work | None = None
        self.at: datetime | None = None  # work.at when kept (the fold that shares it moves its own on)
        self.decayed: _Work | None = None  # the last fold with nothing new: `work` decayed to its `at`

    def tail(self, model: ScoringModel, log: EngagementLog, until: datetime) -> tuple[_Work, list] | None:
        """(the cached state, the items after it), if nothing before it changed: with no
        items, the latest decayed state up to `until`, when there is one."""
        if self.work is None or self.ref != model.ref:
            return None
        window, anchors = log.window, log.anchors
        if len(window) < self.events or len(anchors) < self.anchors:
            return None
        if self.events and _item_key(window[self.events - 1]) != self.last:
            return None  # an event arrived before the cached point: fold it all again
        if self.anchors and _item_key(anchors[self.anchors - 1]) > self.last:  # type: ignore[operator]
            return None
        new = [*window[self.events:], *anchors[self.anchors:]]
        if not new and self.decayed is not None and self.decayed.at <= until:  # type: ignore[operator]
            return self.decayed.copy(), new
        # Without a new event the cache stays where it is: the fold gets a copy to change.
        work = self.work if len(window) > self.events else self.work.copy()
        work.at = self.at
        return work, sorted(new, key=_item_key) if len(new) > 1 else new

    def keep(self, model: ScoringModel, events: int, anchors: int, work: _Work, last: tuple) -> None:
        self.ref, self.events, self.anchors, self.last, self.work, self.at = (
            model.ref, events, anchors, last, work, work.at)
        self.decayed = None


def _item_key(item: WindowEvent | Anchor) -> tuple:
    return (item.occurred_at, 0, item.event_id) if isinstance(item, WindowEvent) else (item.at, 1, item.kind)


def fold(model: ScoringModel, log: EngagementLog, until: datetime, cache: FoldCache | None = None,
         explain: bool = True) -> FoldResult:
    """Engagement at `until` from the checkpoint, the window's events and the anchors.

    With a `cache` that still holds (every change since came after its point), only the
    items after that point are folded: the same result, for events that arrive in order
    (its contributions leave out decay steps up to the cache's last fold with nothing new:
    see FoldCache).
    Without `explain`, contributions carry no `why` (a backtest reads no text; formatting
    it was a tenth of its time)."""
    hit = cache.tail(model, log, until) if cache is not None else None
    if hit is not None:
        work, items = hit
        events, anchors = cache.events, cache.anchors  # type: ignore[union-attr]
    else:
        work = _Work.of(log.checkpoint)
        items = sorted([*log.window, *log.anchors], key=_item_key)
        events = anchors = 0
    last_event = max((i for i, item in enumerate(items) if isinstance(item, WindowEvent)), default=-1)
    out: list[Contribution] = []
    shared = False  # `work` is the cache's: copy it before changing it any further
    for i, item in enumerate(items):  # an event may be a little ahead of `until` (clock skew): it counts
        if shared:
            work, shared = work.copy(), False
        if isinstance(item, WindowEvent):
            _decay_until(model, work, min(item.occurred_at, until), out, explain)
            _apply_event(model, work, item, out, explain)
            work.at = item.occurred_at
            events += 1
        else:
            _decay_until(model, work, min(item.at, until), out, explain)
            _apply_anchor(model, work, item, out, explain)
            work.at = item.at
            anchors += 1
        if i == last_event and cache is not None:
            cache.keep(model, events, anchors, work, _item_key(item))
            shared = True
    if shared and (due := next_decay_at(model, work)) is not None and due <= until:
        work = work.copy()  # decay is due: the cache keeps the state before it
    _decay_until(model, work, until, out, explain)
    if work.at is None or until > work.at:
        work.at = until
    if hit is not None and not items:
        cache.decayed = work  # type: ignore[union-attr]  # (nothing changes a fold's result: see FoldCache)
    return FoldResult(work=work, contributions=out)


def next_decay_at(model: ScoringModel, state: FoldState | _Work) -> datetime | None:
    if state.clock_from is None or state.positive <= 0:
        return None
    decay = model.decay
    return state.clock_from + decay.after + decay.every * state.decay_steps


def _decay_until(model: ScoringModel, state: _Work, t: datetime, out: list[Contribution], explain: bool = True) -> None:
    clock = state.clock_from
    if clock is None or state.positive <= 0:
        return  # nothing decays (next_decay_at is None)
    decay = model.decay
    due = clock + decay.after + decay.every * state.decay_steps  # next_decay_at, spelled out
    while due <= t:  # later: most calls, one per item folded
        positive = state.positive
        loss = positive * decay.percent / 100 if decay.percent is not None else min(decay.points or 0.0, positive)
        below = positive - loss < DECAY_FLOOR
        why = ""
        if explain:
            label = f"{decay.percent:g}%" if decay.percent is not None else f"{decay.points:g} points"
            floor = (f", and the {_r(positive - loss):g} left below the {DECAY_FLOOR:g}-point floor"
                     if below and loss < positive else "")
            why = f"{label} after {humanize(due - state.clock_from)} without activity{floor}"  # type: ignore[operator]
        loss = _r(positive if below else loss)
        state.positive = _r(positive - loss)
        state.decay_steps += 1
        _add(state, "decay", -loss)
        out.append(Contribution(f"d:{due.isoformat()}", "decay", -loss, due, why))
        if state.positive <= 0:
            return  # next_decay_at is None
        due = clock + decay.after + decay.every * state.decay_steps


def _apply_event(model: ScoringModel, state: _Work, event: WindowEvent, out: list[Contribution],
                 explain: bool = True) -> None:
    t = event.occurred_at
    if event.channel and (state.first_touch is None or (t, event.channel) < state.first_touch):
        state.first_touch = (t, event.channel)
    rule = model.events.get(event.type)
    if rule is None:
        out.append(Contribution(f"e:{event.event_id}", event.type, 0.0, t, f": not an event type of {model.ref}",
                                event.event_id))
        return
    for cancelled in rule.cancels:
        _cancel(state, cancelled, t, event, out, explain)
    if rule.consent is not None:
        state.consent = ConsentRecord(email=rule.consent == "grant", since=t, source=f"{event.type} {event.event_id}")
    if rule.activity:
        state.clock_from = t if state.clock_from is None else max(state.clock_from, t)
        state.last_activity = state.clock_from
        state.newest_activity = t if state.newest_activity is None else max(state.newest_activity, t)
        state.decay_steps = 0
    tally = state.tallies.get(event.type)
    if tally is None:
        tally = state.tallies[event.type] = _Tally()
    tally.counted += 1
    tally.last_at = t
    points, why = _event_points(model, rule, tally, t, explain)
    if rule.points > 0 and model.frequency.bonus > 0 and model.frequency.max_multiplier > 1:
        horizon = t - model.frequency.window
        recent = [x for x in tally.recent if x > horizon]
        recent.append(t)
        tally.recent = recent[-FREQUENCY_MEMORY_MAX:]
    if points > 0:
        state.positive = _r(state.positive + points)
    elif points < 0:
        state.negative = _r(state.negative + points)
    _add(state, event.type, points)
    out.append(Contribution(f"e:{event.event_id}", event.type, points, t, why, event.event_id))


def _event_points(model: ScoringModel, rule, tally: _Tally, t: datetime, explain: bool = True) -> tuple[float, str]:
    """Points for this event of its type at `t`, and why (weighting, cap, count-once)."""
    if rule.count_once and tally.counted > 1:
        return 0.0, ": counts once"
    points, why = rule.points, ""
    if points <= 0:
        return _r(points), why
    freq = model.frequency
    horizon = t - freq.window
    earlier = sum(1 for x in tally.recent if x > horizon)
    multiplier = min(1 + freq.bonus * earlier, freq.max_multiplier)
    if multiplier > 1:
        points *= multiplier
        if explain:
            why = f", x{multiplier:g}: {earlier + 1} in {format_duration(freq.window)}"
    if rule.cap is not None:
        window = model.cap_window(rule)
        if tally.cap_from is None or t >= tally.cap_from + window:
            tally.cap_from, tally.cap_points = t, 0.0
        room = max(0.0, rule.cap - tally.cap_points)
        if points > room:
            points = room
            if explain:
                why += f", capped at {rule.cap:g} per {format_duration(window)}"
        tally.cap_points = _r(tally.cap_points + points)
    return _r(points), why


def _cancel(state: _Work, cancelled: str, t: datetime, event: WindowEvent, out: list[Contribution],
            explain: bool = True) -> None:
    """Take back what a negative type scored (a resubscribe forgives the unsubscribe)."""
    taken = state.breakdown.get(cancelled, 0.0)
    tally = state.tallies.get(cancelled)
    if tally is not None:
        tally.counted = 0
        tally.cancelled_at = t
    if taken:
        state.negative = _r(state.negative - taken)
        _add(state, cancelled, -taken)
        out.append(Contribution(f"c:{event.event_id}:{cancelled}", cancelled, _r(-taken), t,
                                f": taken back by {event.type} {event.event_id}" if explain else "", event.event_id))


def _apply_anchor(model: ScoringModel, state: _Work, anchor: Anchor, out: list[Contribution],
                  explain: bool = True) -> None:
    if anchor.kind == "clock":
        state.clock_from = anchor.at if state.clock_from is None else max(state.clock_from, anchor.at)
        state.decay_steps = 0
        return
    # reset: back to nurturing with a clean slate of interest; negative criteria stay
    delta = -state.positive
    state.positive = 0.0
    state.decay_steps = 0
    state.tallies = {name: tally for name, tally in state.tallies.items()
                     if name in model.events and model.events[name].points < 0}
    if delta:
        _add(state, "recycle_reset", _r(delta))
        out.append(Contribution(f"r:{anchor.at.isoformat()}", "recycle_reset", _r(delta), anchor.at,
                                "engagement reset on recycle" + (" (negative points kept)" if state.negative else "")))


def _add(state: _Work | FoldState, rule: str, points: float) -> None:
    total = _r(state.breakdown.get(rule, 0.0) + points)
    if total:
        state.breakdown[rule] = total
    else:
        state.breakdown.pop(rule, None)


# --------------------------------------------------------------------------- bounding the window


def trim(model: ScoringModel, log: EngagementLog) -> list[WindowEvent]:
    """Fold the oldest events into the checkpoint when the window is over its horizon or
    size; returns the events folded away."""
    if not log.window:
        return []
    limit = model.late_events
    newest = log.window[-1].occurred_at
    keep_from = 0
    while keep_from < len(log.window) and log.window[keep_from].occurred_at < newest - limit.horizon:
        keep_from += 1
    keep_from = max(keep_from, len(log.window) - limit.max_events)
    if keep_from <= 0:
        return []
    # The checkpoint sits just before the first event kept (by time, then id): every item
    # before it is folded. Anchors at that very time come after its events, so they stay.
    first = log.window[min(keep_from, len(log.window) - 1)]
    cut, cut_id = first.occurred_at, first.event_id
    dropped = log.window[:keep_from]
    older = EngagementLog(checkpoint=log.checkpoint, window=dropped,
                          anchors=[a for a in log.anchors if a.at < cut])
    log.checkpoint = fold(model, older, until=cut, explain=False).state
    log.checkpoint.after_id = cut_id
    log.window = log.window[keep_from:]
    log.anchors = [a for a in log.anchors if a.at >= cut]
    return dropped


def apply_beyond_horizon(model: ScoringModel, log: EngagementLog, event: WindowEvent) -> tuple[float, str]:
    """An event older than the checkpoint, applied as it is: negative points (once, unless
    taken back after it), consent (if it is the latest) and the count. Positive points and
    the inactivity clock are left alone: decay has taken them. Returns (points, why)."""
    cp = log.checkpoint
    rule = model.events.get(event.type)
    if rule is None:
        return 0.0, f": not an event type of {model.ref}"
    if rule.consent is not None and (cp.consent is None or event.occurred_at > cp.consent.since):
        cp.consent = ConsentRecord(email=rule.consent == "grant", since=event.occurred_at,
                                   source=f"{event.type} {event.event_id}")
    if event.channel and (cp.first_touch is None or (event.occurred_at, event.channel) < cp.first_touch):
        cp.first_touch = (event.occurred_at, event.channel)
    if rule.points >= 0:
        return 0.0, f": beyond the rescoring horizon ({format_duration(model.late_events.horizon)})"
    tally = cp.tallies.setdefault(event.type, TypeTally())
    if tally.cancelled_at is not None and event.occurred_at < tally.cancelled_at:
        return 0.0, f": taken back later (by {tally.cancelled_at.date().isoformat()})"
    tally.counted += 1
    if rule.count_once and tally.counted > 1:
        return 0.0, ": counts once"
    points = _r(rule.points)
    cp.negative = _r(cp.negative + points)
    _add(cp, event.type, points)
    return points, ""

