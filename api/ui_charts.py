"""The dashboard's pictures as plain geometry: the templates (api/templates/) draw it as
inline SVG, made on the server. No chart library and no script in the browser: the pages
work offline and under a strict Content-Security-Policy."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from funnel.models import Stage
from funnel.report import MAIN_PATH, StageStats


@dataclass(frozen=True)
class FunnelBar:
    stage: Stage
    reached: int
    x: float  # left edge: bars are centred, so the picture narrows like a funnel
    width: float
    conversion: float | None  # to the next stage (SQL: the win rate over closed)


def funnel_bars(stages: list[StageStats], width: float = 600.0) -> list[FunnelBar]:
    """One centred bar per main stage, as wide as the share of leads that reached it."""
    by_stage = {s.stage: s for s in stages}
    top = max((by_stage[s].reached for s in MAIN_PATH if s in by_stage), default=0) or 1
    bars = []
    for stage in MAIN_PATH:
        stats = by_stage.get(stage)
        reached = stats.reached if stats else 0
        w = max(width * reached / top, 2.0)
        bars.append(FunnelBar(stage, reached, (width - w) / 2, w, stats.conversion_rate if stats else None))
    return bars


@dataclass(frozen=True)
class RateBar:
    group: str
    rate: float | None
    width: float  # of the whole scale


def rate_bars(rows: list[tuple[str, float | None]], benchmark: float | None,
              width: float = 400.0) -> tuple[list[RateBar], float | None, float]:
    """Bars of shares (0..1) per group on one scale that also holds the benchmark line:
    (bars, the line's x or None, the scale's top share)."""
    top = max([r for _, r in rows if r is not None] + ([benchmark] if benchmark is not None else []) + [0.01])
    bars = [RateBar(group, rate, width * (rate or 0.0) / top) for group, rate in rows]
    return bars, (width * benchmark / top if benchmark is not None else None), top


@dataclass(frozen=True)
class LineChart:
    points: str  # "x,y x,y ..." for a polyline
    dots: list[tuple[float, float, str]]  # (x, y, title) per point
    y_ticks: list[tuple[float, str]]
    x_ticks: list[tuple[float, str]]
    width: float
    height: float


def score_chart(series: list[tuple[datetime, float]], width: float = 640.0, height: float = 200.0,
                pad: float = 40.0) -> LineChart | None:
    """A lead's score over time: its total after each history entry, in the order recorded
    (a late event's entry is when it was recorded, its re-scoring after it), as steps."""
    if not series:
        return None
    t0, t1 = series[0][0], series[-1][0]
    span = (t1 - t0).total_seconds() or 1.0
    low, high = min(0.0, min(v for _, v in series)), max(v for _, v in series)
    high = high if high > low else low + 1.0

    def x(t: datetime) -> float:
        return pad + (width - 2 * pad) * (t - t0).total_seconds() / span

    def y(v: float) -> float:
        return height - pad + (2 * pad - height) * (v - low) / (high - low)

    dots = [(round(x(t), 1), round(y(v), 1), f"{t:%Y-%m-%d %H:%M} UTC: {v:g}") for t, v in series]
    steps = [dots[0][:2]]
    for px, py, _ in dots[1:]:
        steps += [(px, steps[-1][1]), (px, py)]  # the score holds until the next entry changes it
    y_ticks = [(round(y(v), 1), f"{v:g}") for v in (low, (low + high) / 2, high)]
    x_ticks = [(round(x(t), 1), f"{t:%Y-%m-%d}") for t in (t0, t1)] if t1 != t0 else [(round(x(t0), 1), f"{t0:%Y-%m-%d}")]
    return LineChart(" ".join(f"{px},{py}" for px, py in steps), dots, y_ticks, x_ticks, width, height)


@dataclass(frozen=True)
class TimelineSegment:
    stage: Stage
    entered_at: datetime
    x: float
    width: float


def stage_timeline(visits: list[tuple[Stage, datetime]], now: datetime, width: float = 640.0) -> list[TimelineSegment]:
    """The lead's stages side by side, each as long as it lasted (the last one up to now)."""
    if not visits:
        return []
    t0 = visits[0][1]
    span = max((now - t0).total_seconds(), 1.0)
    ends = [at for _, at in visits[1:]] + [max(now, visits[-1][1])]
    return [TimelineSegment(stage, at, width * (at - t0).total_seconds() / span,
                            max(width * (end - at).total_seconds() / span, 1.0))
            for (stage, at), end in zip(visits, ends)]


@dataclass(frozen=True)
class CohortFunnel:
    cohort: str
    leads: int
    steps: list[tuple[str, int, float]]  # (label, count, bar width): leads, opportunities, won
    maturity_days: float | None


def cohort_funnels(rows: list, width: float = 300.0) -> list[CohortFunnel]:
    """Per creation cohort, the funnel from lead to opportunity to won, on one scale for
    all cohorts (the biggest cohort's leads fill the width), so cohorts compare at a glance."""
    top = max((r.leads for r in rows), default=0) or 1
    return [CohortFunnel(r.group, r.leads, [(label, n, max(width * n / top, 1.0 if n else 0.0)) for label, n in
                                            (("leads", r.leads), ("opportunities", r.opportunities), ("won", r.won))],
                         r.maturity_days) for r in rows]
