"""The funnel report from summary tables kept on write, aggregated in the database.

`funnel.report.funnel_report` is the definition: it reads every report entry of every
lead. On 100,000 leads and 2,000,000 audit rows that took 16 s (bench/report.py). Here
the store keeps, per lead, what that function derives from the lead's entries:

- `report_lead`: one row per lead: its channel (first touch, see `resolve_touches`),
  campaigns, creation (and cohorts), how far along the main path it got, which side
  stages it saw, and its opportunity milestones;
- `report_visit`: one row per stage visit: stage, cause (recycled), entered, and how long
  it lasted (NULL: still there);
- `report_handover`: one row per MQL visit: owner and outcome of the presales decision;
- `report_sla`, `report_contact`: one row per SLA run (owner, outcome, time to met, open
  breach) and per first contact after a handover.

They are derived with the very functions of funnel/report.py and funnel/kpis.py, from
all of a lead's report entries, whenever a write adds one (`refresh_leads`, in the
write's transaction): so batches in any order, retries and duplicates give the rows the
pure report would derive. On PostgreSQL a transaction-scoped advisory lock per lead makes
concurrent writers of one lead (its workflow, the audit sweeper) derive its rows one
after the other. The report is then a dozen GROUP BY queries (covering indexes let SQLite
read them without sorting) whose results are counts: per channel and stage, per owner
and outcome, and per duration bin (tens of thousands of rows at 100,000 leads).

Durations are binned so that medians and the Kaplan-Meier quantiles come from counted
bins, not from a row per visit: time in stage, days to opportunity and to won are floored
to the hour, SLA times and first contacts to the minute; an open visit's age is now's
hour less the hour it was entered. A median is thus the median of floored durations: at
most one hour (one minute) below the exact figure (an open age: within an hour), and
equal to it when the times are whole hours (minutes). Means and every count are exact.

`since` (store.funnel_report) now means leads created then or later: the summary rows
are per lead, so the report cannot cut a lead's history at a time as the entry-based
report did (entries since then).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

from sqlalchemy import (
    BigInteger, Column, Float, Index, Integer, MetaData, String, Table, and_, bindparam, or_, case, cast, delete, func, literal,
    select, text, update,
)
from sqlalchemy.engine import Connection

from activities.db_types import UtcDateTime
from funnel import kpis
from funnel.kpis import (
    DecisionReport, DecisionStats, OpportunityReport, OpportunityStats, ReportWindows, SlaReport, SlaStats, cohort_of,
)
from funnel.models import AuditKind, ReportEntry, Role, Stage, Trigger
from funnel.report import (
    ALL_STAGES, MAIN_PATH, ChannelReport, FunnelReport, StageStats, _first_touch, _furthest, _visits, km_quantiles,
    median_counted,
)

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
US = 1_000_000
MINUTE, HOUR, DAY = 60 * US, 3600 * US, 86400 * US

# What funnel reports read: creations and stage changes, owners, contacts and SLAs.
REPORT_KINDS = (AuditKind.LEAD_CREATED, AuditKind.STAGE_CHANGED, AuditKind.OWNER_ASSIGNED, AuditKind.CONTACT_LOGGED,
                AuditKind.SLA_SET, AuditKind.SLA_MET, AuditKind.SLA_BREACHED, AuditKind.SLA_CANCELLED,
                AuditKind.SLA_LATE_DATA)
REPORT_KIND_VALUES = frozenset(kind.value for kind in REPORT_KINDS)
REPORT_COLUMNS = tuple(f.name for f in dataclasses.fields(ReportEntry))  # in ReportEntry's order
_BY_VALUE: dict[type, dict[str, Any]] = {enum: {member.value: member for member in enum}
                                         for enum in (AuditKind, Role, Stage, Trigger)}

# Their own metadata: the store creates them with its tables (`create_tables`).
metadata = MetaData()


def _us_column(name: str, **kwargs: Any) -> Column:
    return Column(name, BigInteger, **kwargs)


REPORT_LEAD = Table(
    "report_lead", metadata,
    Column("lead_id", String, primary_key=True),
    Column("own_channel", String, nullable=False),  # as its own entries knew it: the fallback of `channel`
    Column("channel", String, nullable=False),  # first touch (lead_touch) or own_channel
    Column("campaign", String),  # first touch's campaign
    Column("last_campaign", String),  # latest campaign touch up to its first MQL
    _us_column("created_us", nullable=False),
    Column("cohort_month", String, nullable=False),
    Column("cohort_week", String, nullable=False),
    Column("furthest", Integer, nullable=False),  # index on the main path reached or passed (-1: none)
    Column("sql_closed", Integer, nullable=False),  # SQL passed and won or lost
    Column("lost", Integer, nullable=False),
    Column("disqualified", Integer, nullable=False),
    Column("recycled", Integer, nullable=False),
    Column("requalified", Integer, nullable=False),  # back to MQL after its first recycling
    Column("reached_mql", Integer, nullable=False),
    Column("first_mql_at", UtcDateTime()),  # event time of its first MQL: the last campaign is up to it
    _us_column("opp_us"),  # opportunity (SQL or won), epoch microseconds
    _us_column("opp_after_us"),  # from creation
    Column("opp_after_h", Integer),  # the same, floored to the hour
    _us_column("won_after_us"),  # from the opportunity
    Column("won_after_h", Integer),
    Column("won", Integer, nullable=False),  # an opportunity that was won
    Column("closed", Integer, nullable=False),  # an opportunity won or lost
    # Covering the report's GROUP BYs (SQLite reads these instead of the wide table). Not
    # led by `channel`: SQLite would then scan the opportunities' GROUP BY along it, and
    # look every row up in the table.
    Index("ix_report_lead_stages", "furthest", "channel", "sql_closed", "lost", "disqualified", "recycled",
          "requalified"),
    Index("ix_report_lead_opp", "opp_after_h", "channel", "campaign", "reached_mql", "last_campaign", "cohort_month",
          "cohort_week"),
    Index("ix_report_lead_won", "won_after_h", "channel", "campaign", "reached_mql", "last_campaign", "cohort_month",
          "cohort_week"),
)

REPORT_VISIT = Table(
    "report_visit", metadata,
    Column("lead_id", String, primary_key=True),
    Column("n", Integer, primary_key=True),
    Column("channel", String, nullable=False),
    _us_column("created_us", nullable=False),
    Column("stage", String, nullable=False),
    Column("cause", String),  # RECYCLED: the trigger that put it there ("unknown": none)
    _us_column("entered_us", nullable=False),
    Column("entered_h", BigInteger, nullable=False),  # floored to the hour (since 1970)
    _us_column("duration_us"),  # NULL: still in the stage
    Column("duration_h", Integer),  # floored to the hour
    # The report's GROUP BYs read these instead of sorting the table (SQLite).
    Index("ix_report_visit_finished", "channel", "stage", "duration_h", "duration_us"),
    Index("ix_report_visit_open", "duration_h", "channel", "stage", "entered_h"),
)

REPORT_HANDOVER = Table(
    "report_handover", metadata,
    Column("lead_id", String, primary_key=True),
    Column("n", Integer, primary_key=True),
    Column("channel", String, nullable=False),
    _us_column("created_us", nullable=False),
    Column("owner", String, nullable=False),
    Column("outcome", String, nullable=False),
    Column("reason", String),
    Index("ix_report_handover_outcome", "channel", "owner", "outcome", "reason"),
)

REPORT_SLA = Table(
    "report_sla", metadata,
    Column("lead_id", String, primary_key=True),
    Column("n", Integer, primary_key=True),
    _us_column("created_us", nullable=False),
    Column("name", String, nullable=False),
    Column("owner", String, nullable=False),
    Column("outcome", String, nullable=False),
    Column("took_min", Integer),  # met: from set to met, floored to the minute
    Column("open_breach", Integer, nullable=False),
    Index("ix_report_sla_took", "name", "owner", "took_min"),
    Index("ix_report_sla_outcome", "name", "owner", "outcome", "open_breach"),
)

REPORT_CONTACT = Table(
    "report_contact", metadata,
    Column("lead_id", String, primary_key=True),
    Column("n", Integer, primary_key=True),
    _us_column("created_us", nullable=False),
    Column("owner", String, nullable=False),
    Column("after_min", Integer, nullable=False),  # from the handover, floored to the minute
    Index("ix_report_contact_after", "owner", "after_min"),
)

REPORT_STATE = Table(  # "filled": the tables hold every lead of the audit (back-filled once)
    "report_state", metadata,
    Column("name", String, primary_key=True),
)

_PER_LEAD = (REPORT_LEAD, REPORT_VISIT, REPORT_HANDOVER, REPORT_SLA, REPORT_CONTACT)
_CHUNK = 500  # leads per IN list


def create_tables(engine) -> None:
    metadata.create_all(engine)


def _us(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


def _span_us(a: datetime, b: datetime) -> int:
    return (b - a) // timedelta(microseconds=1)


# --------------------------------------------------------------------------- reading entries

def read_entries(conn, stmt, params: dict[str, Any] | None = None) -> list[ReportEntry]:
    """Report entries from a select of REPORT_COLUMNS, as plain rows (not validated again:
    each was when written)."""
    kind_of, role_of, stage_of, trigger_of = (_BY_VALUE[AuditKind], _BY_VALUE[Role], _BY_VALUE[Stage],
                                              _BY_VALUE[Trigger])
    return [ReportEntry(lead_id, seq, at, kind_of[kind], actor, role_of[role], channel, stage_of.get(from_stage),
                        stage_of.get(to_stage), trigger_of.get(trigger), reason, occurred_at, rule, owner)
            for (lead_id, seq, at, kind, actor, role, channel, from_stage, to_stage, trigger, reason, occurred_at,
                 rule, owner) in conn.execute(stmt, params)]


def _audit():
    from activities.store import _AUDIT

    return _AUDIT


def entries_select(audit, kinds: Iterable[AuditKind] = REPORT_KINDS):
    return (select(*(audit.c[name] for name in REPORT_COLUMNS))
            .where(audit.c.kind.in_([kind.value for kind in kinds])))


# --------------------------------------------------------------------------- one lead's rows

def lead_rows(lead_id: str, entries: Sequence[ReportEntry]) -> dict[Table, list[dict[str, Any]]]:
    """What the report derives from one lead's entries (in seq order), as rows of the
    summary tables; its channel and campaigns are its own until `resolve_touches`."""
    own = _first_touch(entries, None)
    facts = kpis.lead_facts(lead_id, entries, own, None)
    created_us = _us(facts.created_at)
    visits = _visits(entries)
    stages_seen = [stage for stage, _, _ in visits]
    furthest = _furthest(stages_seen)
    first_mql = [e.happened_at for e in entries if e.kind == AuditKind.STAGE_CHANGED and e.to_stage == Stage.MQL]
    requalified = False
    if Stage.RECYCLED in stages_seen:
        requalified = Stage.MQL in stages_seen[stages_seen.index(Stage.RECYCLED) + 1:]
    opp, won = facts.opportunity_at, facts.won_at
    opp_after = _span_us(facts.created_at, opp) if opp is not None else None
    won_after = _span_us(opp, won) if opp is not None and won is not None else None
    lead = {
        "lead_id": lead_id, "own_channel": own, "channel": own, "campaign": None, "last_campaign": None,
        "created_us": created_us, "cohort_month": cohort_of(facts.created_at, "month")[0],
        "cohort_week": cohort_of(facts.created_at, "week")[0], "furthest": furthest,
        "sql_closed": int(furthest >= MAIN_PATH.index(Stage.SQL)
                          and (furthest == MAIN_PATH.index(Stage.WON) or Stage.LOST in stages_seen)),
        "lost": int(Stage.LOST in stages_seen), "disqualified": int(Stage.DISQUALIFIED in stages_seen),
        "recycled": int(Stage.RECYCLED in stages_seen), "requalified": int(requalified),
        "reached_mql": int(facts.reached_mql), "first_mql_at": min(first_mql) if first_mql else None,
        "opp_us": _us(opp) if opp is not None else None, "opp_after_us": opp_after,
        "opp_after_h": opp_after // HOUR if opp_after is not None else None,
        "won_after_us": won_after, "won_after_h": won_after // HOUR if won_after is not None else None,
        "won": int(opp is not None and won is not None),
        "closed": int(opp is not None and facts.closed_at is not None),
    }
    base = {"lead_id": lead_id, "created_us": created_us}
    visit_rows = []
    for n, (stage, at, cause) in enumerate(visits):
        duration = _span_us(at, visits[n + 1][1]) if n + 1 < len(visits) else None
        visit_rows.append({**base, "n": n, "channel": own, "stage": stage.value,
                           "cause": (cause or "unknown") if stage == Stage.RECYCLED else None,
                           "entered_us": _us(at), "entered_h": _us(at) // HOUR, "duration_us": duration,
                           "duration_h": duration // HOUR if duration is not None else None})
    handover_rows = [{**base, "n": n, "channel": own, "owner": h.owner, "outcome": h.outcome, "reason": h.reason}
                     for n, h in enumerate(kpis.handovers(entries, own))]
    slas = kpis.lead_slas(entries)
    sla_rows = [{**base, "n": n, "name": r.name, "owner": r.owner, "outcome": r.outcome,
                 "took_min": round(r.took * US) // MINUTE if r.took is not None else None,
                 "open_breach": int(r.open_breach)} for n, r in enumerate(slas.runs)]
    contact_rows = [{**base, "n": n, "owner": owner, "after_min": round(seconds * US) // MINUTE}
                    for n, (owner, seconds) in enumerate(slas.first_contacts)]
    return {REPORT_LEAD: [lead], REPORT_VISIT: visit_rows, REPORT_HANDOVER: handover_rows, REPORT_SLA: sla_rows,
            REPORT_CONTACT: contact_rows}


# --------------------------------------------------------------------------- keeping them

def advisory_key(name: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for `name`."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)


def lock_leads(conn: Connection, lead_ids: Iterable[str]) -> None:
    """PostgreSQL: one transaction-scoped advisory lock per lead, always in the same order,
    so the rows of a lead are derived by one writer at a time, after the previous one's
    entries are committed (SQLite has a single writer anyway)."""
    if conn.dialect.name != "postgresql":
        return
    keys = sorted({advisory_key(lead) for lead in lead_ids})
    for i in range(0, len(keys), 1000):
        conn.execute(text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) "
                          "WITH ORDINALITY AS t(k, i) ORDER BY i"), {"keys": keys[i:i + 1000]})


@functools.cache
def _statements() -> dict[str, Any]:
    """The write path's statements, built once (building them per write cost more than
    running them): each takes the leads as an expanding `leads` parameter."""
    from activities.store import _AUDIT, _EVENTS, _TOUCHES

    leads = bindparam("leads", expanding=True)
    r, t, e = REPORT_LEAD, _TOUCHES, _EVENTS
    touch_channel = select(func.nullif(t.c.channel, "")).where(t.c.lead_id == r.c.lead_id).scalar_subquery()
    last_campaign = (select(e.c.campaign)
                     .where(e.c.lead_id == r.c.lead_id, e.c.campaign.is_not(None), e.c.occurred_at <= r.c.first_mql_at)
                     .order_by(e.c.occurred_at.desc(), e.c.event_id.desc()).limit(1).scalar_subquery())
    resolved = {"channel": func.coalesce(touch_channel, r.c.own_channel),
                "campaign": select(t.c.campaign).where(t.c.lead_id == r.c.lead_id).scalar_subquery(),
                "last_campaign": case((r.c.first_mql_at.is_(None), None), else_=last_campaign)}
    found = {
        "entries": entries_select(_AUDIT).where(_AUDIT.c.lead_id.in_(leads)).order_by(_AUDIT.c.lead_id, _AUDIT.c.seq),
        # Only rows that change: most logged events change nothing, and then nothing more is run.
        "resolve": update(r).where(r.c.lead_id.in_(leads),
                                   or_(*(r.c[name].is_distinct_from(value) for name, value in resolved.items())))
        .values(**resolved),
    }
    for table in _PER_LEAD:
        found[f"delete {table.name}"] = delete(table).where(table.c.lead_id.in_(leads))
    for table in (REPORT_VISIT, REPORT_HANDOVER):
        channel = select(r.c.channel).where(r.c.lead_id == table.c.lead_id).scalar_subquery()
        found[f"channel {table.name}"] = (update(table).where(table.c.lead_id.in_(leads), table.c.channel != channel)
                                          .values(channel=channel))
    return found


def refresh_leads(conn: Connection, lead_ids: Iterable[str]) -> None:
    """Derive the summary rows of these leads again from all their report entries (inside
    the caller's write transaction, which has written its entries already)."""
    lead_ids = sorted(set(lead_ids))
    if not lead_ids:
        return
    lock_leads(conn, lead_ids)
    statements = _statements()
    for i in range(0, len(lead_ids), _CHUNK):
        chunk = lead_ids[i:i + _CHUNK]
        by_lead: dict[str, list[ReportEntry]] = defaultdict(list)
        for entry in read_entries(conn, statements["entries"], {"leads": chunk}):
            by_lead[entry.lead_id].append(entry)
        rows: dict[Table, list[dict[str, Any]]] = defaultdict(list)
        for lead_id, items in by_lead.items():
            for table, found in lead_rows(lead_id, items).items():
                rows[table].extend(found)
        for table in _PER_LEAD:
            conn.execute(statements[f"delete {table.name}"], {"leads": chunk})
            if rows[table]:
                conn.execute(table.insert(), rows[table])
        resolve_touches(conn, chunk, locked=True)


def resolve_touches(conn: Connection, lead_ids: Sequence[str], locked: bool = False) -> None:
    """Set the channel and campaigns of these leads' summary rows from the event log: the
    channel of its first touch (lead_touch) or else its own, the first touch's campaign,
    and the latest campaign up to its first MQL. Called when a lead's rows are derived and
    when events are logged (a late event can be an earlier first touch)."""
    if not lead_ids:
        return
    if not locked:
        lock_leads(conn, lead_ids)
    statements = _statements()
    for i in range(0, len(lead_ids), _CHUNK):
        chunk = {"leads": list(lead_ids[i:i + _CHUNK])}
        if conn.execute(statements["resolve"], chunk).rowcount:
            for table in (REPORT_VISIT, REPORT_HANDOVER):
                conn.execute(statements[f"channel {table.name}"], chunk)


def report_leads(conn: Connection) -> list[str]:
    """Every lead with a report entry (for a back-fill)."""
    audit = _audit()
    stmt = (select(audit.c.lead_id).where(audit.c.kind.in_(sorted(REPORT_KIND_VALUES)))
            .group_by(audit.c.lead_id).order_by(audit.c.lead_id))
    return list(conn.execute(stmt).scalars())


# --------------------------------------------------------------------------- the report

def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _r3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit


def funnel_report_sql(conn: Connection, now: datetime, windows: ReportWindows | None = None,
                      since: datetime | None = None, timings: dict[str, float] | None = None) -> FunnelReport:
    """funnel.report.funnel_report over the summary tables, aggregated in the database.
    `since`: only leads created then or later. `timings` gets the seconds of each part."""
    windows = windows or ReportWindows()
    now_us = _us(now)
    where = _created_since(since)
    timings = {} if timings is None else timings

    def timed(name: str, part, *args):
        started = time.perf_counter()
        result = part(conn, where, *args)
        timings[name] = time.perf_counter() - started
        return result

    channels = sorted(set(conn.execute(where(REPORT_LEAD, select(REPORT_LEAD.c.channel).distinct())).scalars()))
    return FunnelReport(
        generated_at=now,
        **timed("stages", _stages, now_us, channels),
        opportunities=timed("opportunities", _opportunities, now_us, windows),
        presales=timed("presales", _presales),
        slas=timed("slas", _slas),
    )


def _created_since(since: datetime | None):
    """A filter for a report query over one of the tables: leads created at `since` or later."""
    since_us = _us(since) if since is not None else None

    def where(table, stmt):
        return stmt.where(table.c.created_us >= since_us) if since_us is not None else stmt

    return where


def sla_report_sql(conn: Connection, since: datetime | None = None) -> SlaReport:
    """The report's SLA part alone (the SLA board needs no more)."""
    return _slas(conn, _created_since(since))


def open_slas(conn: Connection, limit: int) -> tuple[int, list[tuple[str, str, str, bool, datetime | None]]]:
    """SLAs running now and breaches nobody has acted on: how many, and the first `limit` of
    the oldest leads as (lead, SLA, owner, breached, when it was set)."""
    sla, audit = REPORT_SLA, _audit()
    wanted = or_(sla.c.outcome == "open", sla.c.open_breach == 1)
    total = conn.execute(select(func.count()).select_from(sla).where(wanted)).scalar_one()
    rows = conn.execute(select(sla.c.lead_id, sla.c.name, sla.c.owner, sla.c.open_breach).where(wanted)
                        .order_by(sla.c.created_us, sla.c.lead_id, sla.c.n).limit(limit)).all()
    set_at: dict[tuple[str, str], datetime] = {}
    if rows:
        for lead_id, rule, at, occurred in conn.execute(
                select(audit.c.lead_id, audit.c.rule, audit.c.at, audit.c.occurred_at)
                .where(audit.c.lead_id.in_({r.lead_id for r in rows}), audit.c.kind == AuditKind.SLA_SET.value)
                .order_by(audit.c.lead_id, audit.c.seq)):
            set_at[(lead_id, rule)] = occurred or at  # the latest setting of each SLA
    return total, [(r.lead_id, r.name, r.owner, bool(r.open_breach), set_at.get((r.lead_id, r.name))) for r in rows]


class _StageCounts:
    def __init__(self) -> None:
        self.leads = 0
        self.by_furthest: Counter = Counter()
        self.flags: Counter = Counter()
        self.finished: dict[str, Counter] = defaultdict(Counter)  # stage -> {hours: visits}
        self.finished_us: Counter = Counter()  # stage -> summed duration
        self.open: dict[str, Counter] = defaultdict(Counter)  # stage -> {hours: visits}
        self.causes: dict[str, Counter] = defaultdict(Counter)


def _stages(conn: Connection, where, now_us: int, channels: list[str]) -> dict[str, Any]:
    r, v = REPORT_LEAD, REPORT_VISIT
    groups: dict[str, _StageCounts] = {"all": _StageCounts(), **{ch: _StageCounts() for ch in channels}}
    stmt = where(r, select(r.c.channel, r.c.furthest, func.count(), func.sum(r.c.sql_closed), func.sum(r.c.lost),
                           func.sum(r.c.disqualified), func.sum(r.c.recycled), func.sum(r.c.requalified))
                 .group_by(r.c.channel, r.c.furthest))
    for channel, furthest, n, closed, lost, disq, recycled, requalified in conn.execute(stmt).all():
        for g in (groups["all"], groups[channel]):
            g.leads += n
            g.by_furthest[furthest] += n
            g.flags.update({"closed": closed, Stage.LOST: lost, Stage.DISQUALIFIED: disq, Stage.RECYCLED: recycled,
                            "requalified": requalified})
    # Per (channel, stage) here; "all" sums them below (a row per bin: tens of thousands).
    finished: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    stmt = where(v, select(v.c.channel, v.c.stage, v.c.duration_h, func.count(),
                           func.sum(cast(v.c.duration_us, Float)))
                 .where(v.c.duration_us.is_not(None)).group_by(v.c.channel, v.c.stage, v.c.duration_h))
    for channel, stage, hours, n, total in conn.execute(stmt).all():
        finished[channel, stage][hours] = n
        groups[channel].finished_us[stage] += total
    # An open visit's age in hours: now's hour less the hour it was entered (at least 0).
    opened: dict[tuple[str, str], Counter] = defaultdict(Counter)
    now_h = now_us // HOUR
    stmt = where(v, select(v.c.channel, v.c.stage, v.c.entered_h, func.count())
                 .where(v.c.duration_h.is_(None)).group_by(v.c.channel, v.c.stage, v.c.entered_h))
    for channel, stage, entered_h, n in conn.execute(stmt).all():
        opened[channel, stage][max(now_h - entered_h, 0)] += n
    for (channel, stage), counts in finished.items():
        groups[channel].finished[stage] = Counter(counts)
        groups["all"].finished[stage].update(counts)
        groups["all"].finished_us[stage] += groups[channel].finished_us[stage]
    for (channel, stage), counts in opened.items():
        groups[channel].open[stage] = counts
        groups["all"].open[stage].update(counts)
    stmt = where(v, select(v.c.channel, v.c.cause, func.count()).where(v.c.stage == Stage.RECYCLED.value)
                 .group_by(v.c.channel, v.c.cause))
    for channel, cause, n in conn.execute(stmt).all():
        for g in (groups["all"], groups[channel]):
            g.causes[Stage.RECYCLED.value][cause] += n
    reports = {name: _channel_report(name, g) for name, g in groups.items()}
    return {"overall": reports["all"], "by_channel": [reports[ch] for ch in channels]}


def _channel_report(name: str, g: _StageCounts) -> ChannelReport:
    stats = []
    for stage in ALL_STAGES:
        on_path = stage in MAIN_PATH[:-1]
        recycled = stage == Stage.RECYCLED
        if stage in MAIN_PATH:
            i = MAIN_PATH.index(stage)
            reached = sum(n for f, n in g.by_furthest.items() if f >= i)
            converted = sum(n for f, n in g.by_furthest.items() if f > i)
        else:
            reached, converted = g.flags[stage], 0
        closed = g.flags["closed"]
        base = closed if stage == Stage.SQL else reached
        finished, open_ = g.finished[stage.value], g.open[stage.value]
        count = sum(finished.values())
        median_h, p75_h = km_quantiles(finished, open_)
        stats.append(StageStats(
            stage=stage, reached=reached, converted=converted if on_path else None,
            closed=closed if stage == Stage.SQL else None,
            causes=dict(sorted(g.causes[stage.value].items())) if recycled else None,
            requalified=g.flags["requalified"] if recycled else None,
            requalification_rate=_rate(g.flags["requalified"], reached) if recycled else None,
            conversion_rate=_rate(converted, base) if on_path else None,
            median_days=_r3(_scaled(median_h, 24)), p75_days=_r3(_scaled(p75_h, 24)),
            open_median_age_days=_r3(_scaled(median_counted(open_), 24)),
            avg_days_in_stage=round(g.finished_us[stage.value] / count / DAY, 3) if count else None,
            median_days_in_stage=_r3(_scaled(median_counted(finished), 24)),
            in_stage_now=sum(open_.values()),
        ))
    return ChannelReport(channel=name, leads=g.leads, stages=stats)


_OPP_FIGURES = ("leads", "opportunities", "matured_leads", "opportunities_within", "won", "closed",
                "matured_opportunities", "won_within")


def _opportunities(conn: Connection, where, now_us: int, windows: ReportWindows) -> OpportunityReport:
    """Counts grouped by (channel, first campaign, last campaign, cohort) in one query (a
    few thousand groups at most), the day histograms likewise; summed per grouping here."""
    r = REPORT_LEAD
    to_opp, to_won = windows.lead_to_opportunity_days * DAY, windows.opportunity_to_won_days * DAY
    matured = r.c.created_us <= literal(now_us - to_opp, BigInteger)
    matured_opp = r.c.opp_us <= literal(now_us - to_won, BigInteger)

    def flag(condition):
        return func.sum(case((condition, 1), else_=0))

    cohort = r.c.cohort_week if windows.cohort == "week" else r.c.cohort_month
    keys = (r.c.channel, r.c.campaign, r.c.reached_mql, r.c.last_campaign, cohort)

    def names_of(row) -> tuple[tuple[str, str | None], ...]:
        channel, campaign, reached_mql, last_campaign, label = row[:5]
        return (("all", "all"), ("channel", channel), ("campaign", campaign or "none"),
                ("last_campaign", (last_campaign or "none") if reached_mql else None), ("cohort", label))

    stmt = where(r, select(*keys, func.count(), func.count(r.c.opp_us), flag(matured),
                           flag(and_(matured, r.c.opp_after_us <= literal(to_opp, BigInteger))),
                           func.sum(r.c.won), func.sum(r.c.closed), flag(matured_opp),
                           flag(and_(matured_opp, r.c.won_after_us <= literal(to_won, BigInteger))),
                           func.min(r.c.created_us)).group_by(*keys))
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    first_created: dict[str, int] = {}
    for row in conn.execute(stmt).all():
        figures = dict(zip(_OPP_FIGURES, row[5:13]))
        for key in names_of(row):
            if key[1] is not None:
                counts[key].update(figures)
        first_created[row[4]] = min(first_created.get(row[4], row[13]), row[13])
    days: dict[str, dict[tuple[str, str], Counter]] = {}
    for measure, column in (("opp", r.c.opp_after_h), ("won", r.c.won_after_h)):
        days[measure] = defaultdict(Counter)
        stmt = where(r, select(*keys, column, func.count()).where(column.is_not(None)).group_by(*keys, column))
        for row in conn.execute(stmt).all():
            for key in names_of(row):
                if key[1] is not None:
                    days[measure][key][row[5]] += row[6]

    def stats(grouping: str, name: str, maturity_days: float | None = None) -> OpportunityStats:
        c = counts[grouping, name]
        return OpportunityStats(
            group=name, leads=c["leads"], opportunities=c["opportunities"],
            opportunity_rate=_rate(c["opportunities"], c["leads"]), matured_leads=c["matured_leads"],
            opportunities_within=c["opportunities_within"],
            opportunity_rate_within=_rate(c["opportunities_within"], c["matured_leads"]),
            median_days_to_opportunity=_r3(_scaled(median_counted(days["opp"][grouping, name]), 24)),
            won=c["won"], closed=c["closed"], win_rate=_rate(c["won"], c["closed"]),
            matured_opportunities=c["matured_opportunities"], won_within=c["won_within"],
            won_rate_within=_rate(c["won_within"], c["matured_opportunities"]),
            median_days_to_won=_r3(_scaled(median_counted(days["won"][grouping, name]), 24)),
            maturity_days=maturity_days,
        )

    def names(grouping: str) -> list[str]:
        return sorted(name for g, name in counts if g == grouping)

    now = EPOCH + timedelta(microseconds=now_us)
    cohorts = []
    for label in names("cohort"):
        end = cohort_of(EPOCH + timedelta(microseconds=first_created[label]), windows.cohort)[2]
        cohorts.append(stats("cohort", label, maturity_days=round(max((now - end) / timedelta(days=1), 0.0), 1)))
    return OpportunityReport(
        windows=windows, overall=stats("all", "all"),
        by_channel=[stats("channel", n) for n in names("channel")],
        by_campaign_first_touch=[stats("campaign", n) for n in names("campaign")],
        by_campaign_last_touch=[stats("last_campaign", n) for n in names("last_campaign")],
        by_cohort=cohorts,
    )


def _decision_stats(group: str, outcomes: Counter, reasons: Counter) -> DecisionStats:
    rejected = outcomes["disqualified"] + outcomes["recycled"]
    decided = outcomes["accepted"] + rejected
    return DecisionStats(
        group=group, handed_over=sum(outcomes.values()), accepted=outcomes["accepted"], rejected=rejected,
        disqualified=outcomes["disqualified"], recycled=outcomes["recycled"], expired=outcomes["expired"],
        pending=outcomes["pending"], acceptance_rate=_rate(outcomes["accepted"], decided),
        rejection_rate=_rate(rejected, decided), reasons=dict(sorted(reasons.items())),
    )


def _presales(conn: Connection, where) -> DecisionReport:
    h = REPORT_HANDOVER
    outcomes: dict[tuple[str, str], Counter] = defaultdict(Counter)
    reasons: dict[tuple[str, str], Counter] = defaultdict(Counter)
    stmt = where(h, select(h.c.channel, h.c.owner, h.c.outcome, h.c.reason, func.count())
                 .group_by(h.c.channel, h.c.owner, h.c.outcome, h.c.reason))
    for channel, owner, outcome, reason, n in conn.execute(stmt).all():
        for key in (("all", "all"), ("channel", channel), ("owner", owner)):
            outcomes[key][outcome] += n
            if reason:
                reasons[key][reason] += n

    def grouped(by: str) -> list[DecisionStats]:
        return [_decision_stats(name, outcomes[by, name], reasons[by, name])
                for name in sorted(name for g, name in outcomes if g == by)]

    return DecisionReport(overall=_decision_stats("all", outcomes["all", "all"], reasons["all", "all"]),
                          by_channel=grouped("channel"), by_owner=grouped("owner"))


def _slas(conn: Connection, where) -> SlaReport:
    s, c = REPORT_SLA, REPORT_CONTACT
    outcomes: dict[tuple[str, str], Counter] = defaultdict(Counter)
    took: dict[tuple[str, str], Counter] = defaultdict(Counter)
    contacts: dict[str, Counter] = defaultdict(Counter)
    stmt = where(s, select(s.c.name, s.c.owner, s.c.outcome, func.count(), func.sum(s.c.open_breach))
                 .group_by(s.c.name, s.c.owner, s.c.outcome))
    for name, owner, outcome, n, open_breaches in conn.execute(stmt).all():
        for key in (("all", "all"), ("sla", name), ("owner", owner)):
            outcomes[key].update({outcome: n, "open_breaches": open_breaches})
    stmt = where(s, select(s.c.name, s.c.owner, s.c.took_min, func.count()).where(s.c.took_min.is_not(None))
                 .group_by(s.c.name, s.c.owner, s.c.took_min))
    by_pair: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    for name, owner, minutes, n in conn.execute(stmt).all():
        by_pair[name, owner][minutes] = n
    for (name, owner), counts in by_pair.items():
        for key in (("all", "all"), ("sla", name), ("owner", owner)):
            took[key].update(counts)
    stmt = where(c, select(c.c.owner, c.c.after_min, func.count()).group_by(c.c.owner, c.c.after_min))
    for owner, minutes, n in conn.execute(stmt).all():
        contacts[owner][minutes] = n
    contacts["all"] = sum(contacts.values(), Counter())

    def stats(by: str, name: str, first_contacts: Counter | None) -> SlaStats:
        o = outcomes[by, name]
        runs = sum(n for k, n in o.items() if k != "open_breaches")
        return SlaStats(
            group=name, set=runs - o["late_data"], met=o["met"], breached=o["breached"], cancelled=o["cancelled"],
            late_data=o["late_data"], open=o["open"], open_breaches=o["open_breaches"],
            met_in_time_rate=_rate(o["met"], o["met"] + o["breached"]),
            median_hours_to_met=_r3(_scaled(median_counted(took[by, name]), 60)),
            median_hours_to_first_contact=(_r3(_scaled(median_counted(first_contacts), 60))
                                           if first_contacts is not None else None),
        )

    owners = sorted({name for g, name in outcomes if g == "owner"} | (set(contacts) - {"all"}))
    return SlaReport(
        overall=stats("all", "all", contacts["all"]),
        by_sla=[stats("sla", name, None) for name in sorted(name for g, name in outcomes if g == "sla")],
        by_owner=[stats("owner", owner, contacts[owner]) for owner in owners],
    )

