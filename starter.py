"""The Leadflow command line, for people and scripts (installed as `leadflow`).

    leadflow event L-1 webinar_attended --channel webinar
    leadflow profile L-1 target_account=true company_size=250
    leadflow accept L-1 --by anna
    leadflow qualify L-1 --by anna --budget --authority --need
    leadflow contact L-1 --by ben --channel meeting
    leadflow close L-1 won --by ben
    leadflow show L-1 [--json]
    leadflow history L-1 [--json]
    leadflow list --stage mql
    leadflow report
    leadflow import events.jsonl
    leadflow export-person L-1                  (GDPR Art. 15: everything kept about the person)
    leadflow erase L-1 --by mona                (GDPR Art. 17: erase the person's data)
    leadflow keys new k2 | leadflow keys rewrap (payload keys, see README "Personal data")

Everything typed is validated before anything is sent. Exit codes: 0 ok,
1 cannot reach Temporal (or another system error), 2 invalid input,
3 no such lead, 4 the lead refused the command, 5 the lead is closed (won).
Settings (TEMPORAL_ADDRESS, LEADFLOW_DATABASE_URL, LEADFLOW_MODEL, ...) come
from the environment, see config.py.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import errno
import functools
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
import uuid
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

import client as api
from config import Settings, connect
from funnel.lead import FUTURE_TOLERANCE, LeadView
from funnel.models import (
    Accept,
    ActivityEvent,
    Actor,
    Bant,
    Close,
    Command,
    LogContact,
    Meddic,
    ProfileUpdate,
    Qualify,
    Reject,
    Reopen,
    Role,
    Stage,
    check_lead_id,
)
from funnel.report import CSV_TABLES
from funnel.scoring_model import ModelError, ScoringModel, load_model, parse_model
from payload_codec import KeyConfigError

PROG = "leadflow"
IMPORT_CONCURRENCY = 16  # leads sent at the same time by `import`
# Commands and `show` need the lead's worker to answer; without one Temporal waits forever.
ANSWER_TIMEOUT = 60.0
HUMAN_ROLES = [Role.PRESALES.value, Role.SALES.value, Role.MANAGER.value, Role.MARKETING.value]
# The role a command is given when --role is not: who normally does it.
DEFAULT_ROLES = {
    "accept": Role.PRESALES,
    "reject": Role.PRESALES,
    "qualify": Role.PRESALES,
    "contact": Role.SALES,
    "close": Role.SALES,
    "reopen": Role.MANAGER,
}
BANT_FLAGS = ["budget", "authority", "need", "timing"]
MEDDIC_FLAGS = ["metrics", "economic_buyer", "decision_criteria", "decision_process", "identify_pain", "champion"]
CSV_COLUMNS = ["event_id", "lead_id", "type", "occurred_at", "channel"]
_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


# --------------------------------------------------------------------------- errors


class CliError(Exception):
    """An expected failure: one line on stderr and an exit code, never a traceback."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class BadInput(CliError):
    def __init__(self, message: str):
        super().__init__(message, 2)


class Unreachable(CliError):
    def __init__(self, address: str):
        super().__init__(f"cannot reach Temporal at {address}: is `scripts/run` running?", 1)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`leadflow: error: ...`) and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- parsing values


def lead_id_arg(value: str) -> str:
    try:
        return check_lead_id(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_timestamp(value: str) -> datetime:
    """ISO 8601 with a timezone, as UTC; naive timestamps are refused (which zone was meant?)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadInput(f"invalid timestamp {value!r}: use ISO 8601, e.g. 2026-11-22T10:00:00Z") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise BadInput(f"timestamp {value!r} has no timezone: add one, e.g. {value}Z or {value}+01:00")
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        raise BadInput(f"timestamp {value!r} is out of range once in UTC") from None


def check_not_future(at: datetime, now: datetime, what: str = "timestamp") -> None:
    if at > now + FUTURE_TOLERANCE:
        raise BadInput(
            f"{what} {at.isoformat()} is more than {int(FUTURE_TOLERANCE.total_seconds() // 60)} minutes "
            f"in the future (now {now.replace(microsecond=0).isoformat()})"
        )


def parse_value(text: str) -> bool | int | float | str:
    """true/false -> bool, integers, decimals, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.match(text.strip()):
        return int(text)
    if _FLOAT.match(text.strip()):
        number = float(text)
        if math.isfinite(number):
            return number
    return text


def parse_assignments(items: list[str], what: str) -> dict[str, bool | int | float | str]:
    """['k=v', ...] -> {k: parsed v}; refuses items without '=', empty keys, empty values, repeats."""
    facts: dict[str, bool | int | float | str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise BadInput(f"{what} {item!r}: expected NAME=VALUE, e.g. company_size=250")
        if not key:
            raise BadInput(f"{what} {item!r}: the name before '=' is empty")
        if not re.match(r"^[a-z][a-z0-9_]{0,63}$", key):
            raise BadInput(f"{what} {item!r}: name {key!r} must be lower_snake_case (a-z, 0-9, _)")
        if raw.strip() == "":
            raise BadInput(f"{what} {item!r}: the value after '=' is empty")
        if key in facts:
            raise BadInput(f"{what} {key!r} is given twice")
        facts[key] = parse_value(raw.strip())
    return facts


def describe_validation(err: ValidationError) -> str:
    """Pydantic errors as `field: message; field: message` (lead ids get our own wording)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["loc"] and e["loc"][-1] == "lead_id" and e["type"] == "string_pattern_mismatch":
            try:
                check_lead_id(str(e.get("input")))
            except ValueError as bad:
                msg = str(bad)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _validated(factory: Callable[..., Any], **values: Any) -> Any:
    try:
        return factory(**values)
    except ValidationError as err:
        raise BadInput(describe_validation(err)) from None


def _active_model(settings: Settings) -> ScoringModel | None:
    """The store's active version (what leads use, and what a lead this command creates
    starts on); None without a store or when it cannot be read."""
    try:
        store = _store(settings)
    except CliError:
        return None
    try:
        active = store.active_model()
    except Exception:  # noqa: BLE001 - an unreachable store: the caller does without
        return None
    finally:
        store.dispose()
    return parse_model(active.text, active.ref) if active is not None else None


def _load_model(settings: Settings, active: ScoringModel | None) -> ScoringModel:
    """The model inputs are checked against: `active`, the store's active version (from
    _active_model), or the model file when there is none."""
    return active if active is not None else _model_file(settings.model_path)


def check_event_type(event_type: str, model: ScoringModel) -> None:
    if event_type not in model.events:
        raise BadInput(
            f"unknown event type {event_type!r} in scoring model {model.ref}; known types: "
            + ", ".join(sorted(model.events))
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4()}"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- Temporal


def temporal_address(settings: Settings) -> str:
    if settings.temporal_address:
        return settings.temporal_address
    try:
        from temporalio.envconfig import ClientConfig

        return str(ClientConfig.load_client_connect_config().get("target_host") or "localhost:7233")
    except Exception:
        return "localhost:7233"


async def _connect(settings: Settings):
    try:
        return await connect(settings)
    except RuntimeError as err:
        if "connect" in str(err).lower():
            raise Unreachable(temporal_address(settings)) from None
        raise


async def _answer(call, lead_id: str, what: str):
    """Await a call the lead's workflow must answer, but not forever (no worker, a stuck lead)."""
    try:
        return await asyncio.wait_for(call, ANSWER_TIMEOUT)
    except asyncio.TimeoutError:
        raise CliError(
            f"lead {lead_id} did not answer the {what} within {ANSWER_TIMEOUT:.0f} s: is the worker running "
            f"(`scripts/run`)?" + (f" The {what} may still be applied: check `{PROG} show {lead_id}`."
                                   if what != "query" else ""),
            1,
        ) from None


def _store(settings: Settings):
    """The audit store; a SQLite file that does not exist is an error, not a new empty store."""
    from sqlalchemy.engine import make_url

    from activities.store import AuditStore

    url = make_url(settings.database_url)
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:"):
        if not Path(database).expanduser().exists():
            raise CliError(
                f"no audit store at {database} (LEADFLOW_DATABASE_URL={settings.database_url}): "
                "run from the project directory or set LEADFLOW_DATABASE_URL",
                1,
            )
    return AuditStore(settings.database_url)


# --------------------------------------------------------------------------- output


def _console(stderr: bool = False):
    return _console_class()(stderr=stderr, highlight=False, soft_wrap=False)


@functools.cache
def _console_class():
    from rich.console import Console

    class LeadflowConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich's own handling points stdout at /dev/null and raises SystemExit(1)
            # itself; re-raise the BrokenPipeError instead, so `main` ends a closed pipe
            # the same way for tables and for print().
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return LeadflowConsole


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _points(value: float) -> str:
    return f"{value:+g}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def print_view(view: LeadView, as_json: bool = False) -> None:
    if as_json:
        _print_json(view.model_dump(mode="json"))
        return
    from rich.table import Table

    score = view.score
    grid = Table(title=f"lead {view.lead_id}", show_header=False, title_justify="left", box=None, padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("stage", view.stage.value)
    grid.add_row("since", _when(view.stage_since))
    grid.add_row("owner", view.owner or "-")
    grid.add_row("channel", view.channel or "-")
    consent = view.consent or {}
    if consent:
        grid.add_row("email", ("may be mailed" if consent.get("email") else "NOT to be mailed")
                     + f" since {_when(consent.get('since'))} ({consent.get('source')})")
    grid.add_row("score", f"{score.get('total', 0):g} (fit {score.get('fit', 0):g}, engagement {score.get('engagement', 0):g})")
    if view.qualified_by:
        grid.add_row("qualified", view.qualified_by)
    if view.profile:
        grid.add_row("profile", ", ".join(f"{k}={v}" for k, v in sorted(view.profile.items())))
    if view.deadlines:
        grid.add_row(
            "deadlines", "\n".join(f"{d.name} due {_when(d.due_at)} ({d.cause})" for d in view.deadlines)
        )
    else:
        grid.add_row("deadlines", "-")
    nurture = view.next_nurture_step
    grid.add_row(
        "next nurture", f"{nurture.get('track')} step {nurture.get('step')} at {_when(nurture.get('at'))}" if nurture else "-"
    )
    grid.add_row("next decay", _when(view.next_decay_at))
    if view.decision_due_at:
        grid.add_row("decides", f"at {_when(view.decision_due_at)} (input that arrives until then is decided with it)")
    if view.cool_off_until:
        grid.add_row("cool-off until", _when(view.cool_off_until))
    grid.add_row("model", view.model_ref)
    grid.add_row("events", f"{view.events_applied} applied, {view.duplicates_ignored} duplicates ignored")
    console = _console()
    console.print(grid)
    breakdown = score.get("breakdown") or {}
    if isinstance(breakdown, dict) and breakdown:
        table = Table(title="score breakdown", title_justify="left")
        table.add_column("rule")
        table.add_column("points", justify="right")
        for rule, points in breakdown.items():
            table.add_row(rule, _points(points))
        console.print(table)


def print_history(entries, total: int, offset: int, as_json: bool) -> None:
    if as_json:
        _print_json([entry.model_dump(mode="json") for entry in entries])
        return
    from rich.table import Table

    table = Table(title_justify="left")
    for name, justify in (("seq", "right"), ("recorded", "left"), ("happened", "left"), ("kind", "left"),
                          ("actor/role", "left"), ("detail", "left"), ("score", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for e in entries:
        table.add_row(
            str(e.seq), _when(e.at), "" if e.occurred_at is None else _when(e.occurred_at), e.kind.value,
            f"{e.actor}/{e.role.value}", e.detail, "-" if e.score_total is None else f"{e.score_total:g}",
        )
    console = _console()
    console.print(table)
    if entries:
        console.print(f"entries {offset + 1}-{offset + len(entries)} of {total}")
    else:
        console.print(f"no entries from offset {offset} ({total} in all)")


# --------------------------------------------------------------------------- commands


async def cmd_event(args, settings: Settings) -> int:
    active = _active_model(settings)  # checked against, and what a new lead starts on
    model = _load_model(settings, active)
    check_event_type(args.type, model)
    now = utcnow()
    at = parse_timestamp(args.at) if args.at is not None else now
    check_not_future(at, now, "--at")
    attributes = parse_assignments(args.attr or [], "--attr")
    event = _validated(
        ActivityEvent,
        event_id=args.id or new_id("ev"),
        lead_id=args.lead,
        type=args.type,
        occurred_at=at,
        channel=args.channel,
        attributes=attributes,
        source="cli",
    )
    log = _event_log(settings)
    fresh, known = api.sort_out([event], log.logged(event) if log else {})
    if known:
        outcome, why = known[0]
        if outcome == "conflict":
            raise BadInput(why)
        print(f"event {event.event_id}: {why} (nothing sent)")
        return 0
    tc = await _connect(settings)
    await api.send_events(tc, settings, [event], active)
    if log:
        log.taken([event])
    print(f"event {event.event_id} ({event.type} at {event.occurred_at.isoformat()}) sent to lead {event.lead_id}")
    return 0


class _EventLog:
    """The store's event log as the CLI uses it: an event id is taken once, for ever; and
    the profile updates sent, for replay."""

    def __init__(self, store):
        self.store = store

    def logged(self, *events: ActivityEvent) -> dict[tuple[str, str], str]:
        return self.store.logged_digests(list(events))

    def taken(self, events: list[ActivityEvent]) -> None:
        self.store.log_events(events, utcnow())

    def facts_taken(self, updates: list[ProfileUpdate]) -> None:
        self.store.log_facts(updates, utcnow())


def _event_log(settings: Settings) -> _EventLog | None:
    """The event log, when the store is here (best effort: without it the lead still applies
    each id once, and redeliveries are answered by it rather than here)."""
    try:
        return _EventLog(_store(settings))
    except CliError:
        return None


async def cmd_profile(args, settings: Settings) -> int:
    facts = parse_assignments(args.facts, "profile fact")
    values: dict[str, Any] = dict(update_id=args.id or new_id("pu"), lead_id=args.lead, facts=facts)
    if args.by is not None:
        try:
            values["actor"] = _validated(Actor, name=args.by, role=args.role)
        except BadInput as err:
            raise BadInput(f"--by {args.by!r}: {err}") from None
    update = _validated(ProfileUpdate, **values)
    tc = await _connect(settings)
    await api.send_profile(tc, settings, update, _active_model(settings))
    if log := _event_log(settings):
        log.facts_taken([update])
    shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in facts.items())
    print(f"profile update {update.update_id} ({shown}) sent to lead {update.lead_id}")
    return 0


def build_command(args) -> Command:
    """The command object for accept/reject/qualify/contact/close/reopen, validated."""
    role = args.role or DEFAULT_ROLES[args.command].value
    try:
        by = _validated(Actor, name=args.by, role=role)
    except BadInput as err:
        raise BadInput(f"--by {args.by!r}: {err}") from None
    kind = args.command
    if kind == "accept":
        return _validated(Accept, by=by, note=args.note)
    if kind == "reject":
        return _validated(Reject, by=by, reason=args.reason, recycle=args.recycle, note=args.note)
    if kind == "qualify":
        bant_given = [f for f in BANT_FLAGS if getattr(args, f)]
        meddic_given = [f for f in MEDDIC_FLAGS if getattr(args, f)]
        if args.meddic:
            if bant_given:
                raise BadInput(f"--{bant_given[0]} is a BANT criterion; it cannot be combined with --meddic")
            criteria = {f: getattr(args, f) for f in MEDDIC_FLAGS}
            return _validated(Qualify, by=by, framework="meddic", meddic=Meddic(**criteria), note=args.note)
        if meddic_given:
            flag = meddic_given[0].replace("_", "-")
            raise BadInput(f"--{flag} is a MEDDIC criterion: add --meddic")
        criteria = {f: getattr(args, f) for f in BANT_FLAGS}
        return _validated(Qualify, by=by, framework="bant", bant=Bant(**criteria), note=args.note)
    if kind == "contact":
        return _validated(LogContact, by=by, channel=args.channel, note=args.note)
    if kind == "close":
        return _validated(Close, by=by, outcome=args.outcome, reason=args.reason, note=args.note)
    if kind == "reopen":
        return _validated(Reopen, by=by, reason=args.reason, note=args.note)
    raise BadInput(f"unknown command {kind!r}")  # pragma: no cover - argparse knows the commands


async def cmd_lead_command(args, settings: Settings) -> int:
    command = build_command(args)
    key = args.key or new_id("cmd")
    tc = await _connect(settings)
    try:
        view = await _answer(api.run_command(tc, args.lead, command, key=key), args.lead, f"{args.command} command")
    except (CliError, api.CommandTimedOut) as err:
        if isinstance(err, CliError) and "did not answer" not in str(err):
            raise
        raise CliError(f"lead {args.lead} did not answer the {args.command} command in time; it may still be "
                       f"applied: run it again with --key {key} to get its outcome (it is applied at most once)",
                       1) from None
    print_view(view, as_json=args.json)
    return 0


async def cmd_show(args, settings: Settings) -> int:
    tc = await _connect(settings)
    view = await _answer(api.get_view(tc, args.lead), args.lead, "query")
    print_view(view, as_json=args.json)
    return 0


async def cmd_account(args, settings: Settings) -> int:
    """An account (a company's buying team): its score, roles, contacts, MQA."""
    tc = await _connect(settings)
    view = await _answer(api.get_account(tc, args.account), args.account, "query")
    if args.json:
        _print_json(view.model_dump(mode="json"))
        return 0
    print(f"account {view.account_id}: {view.stage.value} since {_when(view.stage_since)}"
          + (f", owner {view.owner}" if view.owner else ""))
    print(f"score {view.score:g} (fit {view.fit:g} + engagement {view.engagement:g}) of {view.threshold:g}; "
          f"roles {', '.join(view.roles) or 'none'} ({len(view.roles)} of {view.roles_needed})")
    for c in view.contacts:
        print(f"  {c.lead_id}  {c.stage}  engagement {c.engagement:g}  {c.role or '-'}")
    return 0


async def cmd_accounts(args, settings: Settings) -> int:
    """Accounts of this deployment, newest first (as GET /accounts), up to --limit."""
    if args.limit < 1:
        raise BadInput(f"--limit {args.limit}: show at least 1 account")
    tc = await _connect(settings)
    views, cursor = [], None
    while len(views) < args.limit:
        page, cursor = await api.account_page(tc, settings.task_queue, cursor, min(100, args.limit - len(views)))
        views += page
        if cursor is None:
            break
    total, mqa = await api.account_counts(tc, settings.task_queue)
    if args.json:
        _print_json({"total": total, "mqa": mqa, "accounts": [v.model_dump(mode="json", exclude={"history"})
                                                                for v in views]})
        return 0
    from rich.table import Table

    table = Table(title_justify="left")
    for name in ("account", "stage", "score", "roles", "contacts", "owner"):
        table.add_column(name, justify="right" if name in ("score", "contacts") else "left")
    for v in views:
        table.add_row(v.account_id, v.stage.value, f"{v.score:g}", ", ".join(v.roles) or "-", str(len(v.contacts)),
                      v.owner or "-")
    console = _console()
    console.print(table)
    console.print(f"{total} account(s), {mqa} marketing-qualified" + (
        f"; {len(views)} shown (--limit)" if len(views) < total else ""))
    return 0


async def cmd_history(args, settings: Settings) -> int:
    store = _store(settings)
    try:
        try:
            tc = await _connect(settings)
            total, entries = await _answer(
                api.read_history(tc, store, args.lead, offset=args.offset, limit=args.limit), args.lead, "query"
            )
        except (CliError, api.TailUnknown) as err:  # Temporal unreachable, or no worker to answer the query
            # The store alone still answers: managers can audit while Temporal is down.
            lag = settings.audit_max_lag_seconds
            print(f"{PROG}: {err}; showing the audit store only (score changes of the last "
                  + (f"{lag:g} s" if lag is not None else "writes") + " may be missing)", file=sys.stderr)
            total = store.count_history(args.lead)
            entries = store.history(args.lead, offset=args.offset, limit=args.limit)
        if total == 0:
            raise api.LeadNotFound(f"no lead {args.lead} (no history yet)")
    finally:
        store.dispose()
    print_history(entries, total, args.offset, args.json)
    return 0


async def cmd_list(args, settings: Settings) -> int:
    tc = await _connect(settings)
    try:
        leads = await api.list_leads(tc, stage=args.stage, owner=args.owner)
    except ValueError as err:
        raise BadInput(str(err)) from None
    if args.json:
        _print_json([{**vars(lead), "created_at": lead.created_at and lead.created_at.isoformat()} for lead in leads])
        return 0
    from rich.table import Table

    table = Table(title_justify="left")
    for name in ("lead", "stage", "score", "owner", "channel"):
        table.add_column(name, justify="right" if name == "score" else "left")
    for lead in leads:
        table.add_row(
            lead.lead_id, lead.stage or "-", "-" if lead.score is None else f"{lead.score:g}",
            lead.owner or "-", lead.channel or "-",
        )
    console = _console()
    console.print(table)
    console.print(f"{len(leads)} running lead(s)")
    return 0


def _window_days(text: str) -> int:
    """A report window in days: a whole number from 1 to 3650."""
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= days <= 3650:
        raise argparse.ArgumentTypeError(f"{days} days: a window is 1 to 3650 days")
    return days


async def cmd_report(args, settings: Settings) -> int:
    from funnel.report import ReportWindows, report_csv

    windows = ReportWindows(lead_to_opportunity_days=args.opportunity_days, opportunity_to_won_days=args.won_days,
                            cohort=args.cohort)
    store = _store(settings)
    try:
        report = store.funnel_report(utcnow(), windows)
        accounts = store.account_summary()
    finally:
        store.dispose()
    if args.json:
        _print_json(report.model_dump(mode="json") | {"accounts": accounts.model_dump(mode="json")})
        return 0
    if args.csv:
        sys.stdout.write(report_csv(report, args.csv))
        return 0
    from rich.table import Table

    console = _console()

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title, title_justify="left")
        for i, name in enumerate(columns):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)

    for channel in [report.overall, *report.by_channel]:
        title = "all channels" if channel is report.overall else f"channel {channel.channel}"
        print_table(f"{title}: {channel.leads} lead(s)",
                    ["stage", "reached", "converted", "conversion", "median days", "p75 days", "in stage now"],
                    [[s.stage.value, str(s.reached), "-" if s.converted is None else str(s.converted),
                      pct(s.conversion_rate), num(s.median_days), num(s.p75_days), str(s.in_stage_now)]
                     for s in channel.stages])
    if not report.by_channel:
        console.print("no leads in the audit store yet")
        return 0
    o = report.opportunities
    d_opp, d_won = o.windows.lead_to_opportunity_days, o.windows.opportunity_to_won_days
    print_table(f"lead -> opportunity (SQL) within {d_opp} d, opportunity -> won within {d_won} d "
                f"(sources: 13% in 84 d, 6% in 18 d)",
                ["group", "leads", "opportunities", "rate", f"within {d_opp} d", "median days", "won", "win rate",
                 f"won within {d_won} d"],
                [[f"{by} {g.group}".strip(), str(g.leads), str(g.opportunities), pct(g.opportunity_rate),
                  pct(g.opportunity_rate_within), num(g.median_days_to_opportunity), str(g.won), pct(g.win_rate),
                  pct(g.won_rate_within)]
                 for by, groups in (("", [o.overall]), ("channel", o.by_channel),
                                    ("campaign", o.by_campaign_first_touch), ("cohort", o.by_cohort))
                 for g in groups])
    print_table("presales decisions on MQLs (sources: up to 90% of unfiltered leads rejected)",
                ["group", "handed over", "accepted", "rejected", "rejection", "expired", "pending", "reasons"],
                [[f"{by} {g.group}".strip(), str(g.handed_over), str(g.accepted), str(g.rejected),
                  pct(g.rejection_rate), str(g.expired), str(g.pending),
                  ", ".join(f"{k} {n}" for k, n in g.reasons.items()) or "-"]
                 for by, groups in (("", [report.presales.overall]), ("channel", report.presales.by_channel),
                                    ("owner", report.presales.by_owner)) for g in groups])
    if accounts.accounts:
        print_table("accounts (buying teams)", ["accounts", "with 2+ contacts", "contacts", "MQA", "MQA rate"],
                    [[str(accounts.accounts), str(accounts.multi_contact_accounts), str(accounts.contacts),
                      str(accounts.mqa), pct(accounts.mqa_rate)]])
    print_table("SLA compliance",
                ["group", "set", "met", "breached", "met in time", "open", "open breaches", "median h to met",
                 "median h to contact"],
                [[f"{by} {g.group}".strip(), str(g.set), str(g.met), str(g.breached), pct(g.met_in_time_rate),
                  str(g.open), str(g.open_breaches), num(g.median_hours_to_met),
                  num(g.median_hours_to_first_contact)]
                 for by, groups in (("", [report.slas.overall]), ("sla", report.slas.by_sla),
                                    ("owner", report.slas.by_owner)) for g in groups])
    return 0


# --------------------------------------------------------------------------- import


def read_import_file(path: Path, model: ScoringModel,
                     now: datetime) -> tuple[list[ActivityEvent], list[ProfileUpdate], list[str]]:
    """Every event and profile update of the file, or the problems: one `line N: field:
    message` per bad line. A JSON line with `facts` is a profile update (as `leadflow events
    export` writes them); `received_at` of an exported line is informational (importing is a
    new receipt)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise BadInput(f"{path}: unknown file type {suffix or '(none)'!r}: use .jsonl, .ndjson or .csv")
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror}") from None
    events: list[ActivityEvent] = []
    updates: list[ProfileUpdate] = []
    problems: list[str] = []

    def check(number: int, data: Any) -> None:
        if isinstance(data, dict) and suffix != ".csv":
            data = {k: v for k, v in data.items() if k != "received_at"}
            if "facts" in data:
                try:
                    updates.append(ProfileUpdate.model_validate(data))
                except ValidationError as err:
                    problems.append(f"line {number}: {describe_validation(err)}")
                return
        try:
            event = ActivityEvent.model_validate(data)
            if event.source is None:  # what the file says sent it, or this import
                event = event.model_copy(update={"source": f"import {path.name}"})
        except ValidationError as err:
            problems.append(f"line {number}: {describe_validation(err)}")
            return
        if event.type not in model.events:
            problems.append(f"line {number}: type: unknown event type {event.type!r} in scoring model {model.ref}")
        elif event.occurred_at > now + FUTURE_TOLERANCE:
            problems.append(f"line {number}: occurred_at: {event.occurred_at.isoformat()} is in the future")
        else:
            events.append(event)

    with handle:
        try:
            if suffix == ".csv":
                reader = csv.DictReader(handle)
                header = reader.fieldnames or []
                missing = [c for c in CSV_COLUMNS if c not in header and c != "channel"]
                unknown = [c for c in header if c not in CSV_COLUMNS]
                if missing or unknown:
                    raise BadInput(
                        f"{path}: line 1: header must be {','.join(CSV_COLUMNS)}"
                        + (f" (missing: {', '.join(missing)})" if missing else "")
                        + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                    )
                for row in reader:
                    if None in row:
                        problems.append(f"line {reader.line_num}: more fields than the header has")
                        continue
                    data = dict(row)
                    if not data.get("channel"):
                        data.pop("channel", None)  # an empty channel column means: none
                    check(reader.line_num, data)
            else:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        data = json.loads(line)
                    except json.JSONDecodeError as err:
                        problems.append(f"line {number}: not valid JSON: {err.msg} (column {err.colno})")
                        continue
                    check(number, data)
        except UnicodeDecodeError:
            raise BadInput(f"{path}: not UTF-8 text") from None
    return events, updates, problems


async def cmd_import(args, settings: Settings) -> int:
    path = Path(args.file)
    active = _active_model(settings)  # checked against, and what new leads start on
    model = _load_model(settings, active)
    events, updates, problems = read_import_file(path, model, utcnow())
    if problems:
        for problem in problems:
            print(f"{PROG}: {path}: {problem}", file=sys.stderr)
        print(f"{PROG}: {len(problems)} invalid line(s) in {path}: nothing sent", file=sys.stderr)
        return 2
    if not events and not updates:
        print(f"no events in {path}: nothing sent")
        return 0
    log = _event_log(settings)
    events, known = api.sort_out(events, log.logged(*events) if log else {})
    conflicts = [why for outcome, why in known.values() if outcome == "conflict"]
    if conflicts:
        for why in conflicts:
            print(f"{PROG}: {path}: {why}", file=sys.stderr)
        print(f"{PROG}: {len(conflicts)} event id(s) in {path} were taken with other content: nothing sent",
              file=sys.stderr)
        return 2
    if known:
        print(f"{len(known)} event(s) already taken: not sent again")
    by_lead: dict[str, list[ActivityEvent]] = defaultdict(list)
    for event in events:
        by_lead[event.lead_id].append(event)
    for lead_events in by_lead.values():
        lead_events.sort(key=lambda e: e.occurred_at)
    facts_of: dict[str, list[ProfileUpdate]] = defaultdict(list)
    for update in updates:
        facts_of[update.lead_id].append(update)
        by_lead.setdefault(update.lead_id, [])

    tc = await _connect(settings)
    started = time.monotonic()
    closed: list[str] = []
    failed: list[str] = []
    sent = 0
    gate = asyncio.Semaphore(IMPORT_CONCURRENCY)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TextColumn("events"), TimeElapsedColumn(),
        console=_console(stderr=True), disable=not sys.stderr.isatty(), transient=False,
    )

    async def send(lead_id: str, lead_events: list[ActivityEvent], task) -> None:
        nonlocal sent
        async with gate:
            try:
                for update in facts_of.get(lead_id, []):  # facts replace by observed_at: any order
                    await api.send_profile(tc, settings, update, active)
                if log and facts_of.get(lead_id):
                    await asyncio.to_thread(log.facts_taken, facts_of[lead_id])
                if lead_events:
                    await api.send_events(tc, settings, lead_events, active)
                sent += len(lead_events)
                if log:
                    await asyncio.to_thread(log.taken, lead_events)
            except api.LeadClosed:
                closed.append(lead_id)
            except Exception as err:  # reported per lead below; the other leads go on
                failed.append(f"lead {lead_id}: {type(err).__name__}: {err}")
            progress.advance(task, len(lead_events))

    with progress:
        task = progress.add_task("import", total=len(events))
        await asyncio.gather(*(send(lead, items, task) for lead, items in by_lead.items()))
    seconds = time.monotonic() - started
    print(f"sent {sent} event(s)" + (f" and {len(updates)} profile update(s)" if updates else "")
          + f" for {len(by_lead) - len(closed) - len(failed)} lead(s) in {seconds:.1f} s")
    for problem in failed:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if closed:
        print(f"{PROG}: {len(closed)} lead(s) closed (won), their events not applied: {', '.join(sorted(closed))}",
              file=sys.stderr)
    if failed:
        return 1
    return 5 if closed else 0


# --------------------------------------------------------------------------- event log export


def exported_line(row) -> dict[str, Any]:
    """One logged event or profile update (a row of `AuditStore.replay_log`) as a line
    `leadflow import` takes back."""
    if "event_id" in row._fields:
        line = {"event_id": row.event_id, "lead_id": row.lead_id, "type": row.type,
                "occurred_at": row.occurred_at.isoformat(), "channel": row.channel, "campaign": row.campaign,
                "attributes": row.attributes or None, "source": row.source}
    else:  # a profile update: its observed time is what the lead went by (its receipt if none was given)
        line = {"update_id": row.update_id, "lead_id": row.lead_id, "facts": row.facts,
                "actor": {"name": row.actor, "role": row.role},
                "observed_at": (row.observed_at or row.received_at).isoformat()}
    return {**{k: v for k, v in line.items() if v is not None}, "received_at": row.received_at.isoformat()}


async def cmd_events_export(args, settings: Settings) -> int:
    since = parse_timestamp(args.since) if args.since else None
    until = parse_timestamp(args.until) if args.until else None
    store = _store(settings)
    try:
        out = open(args.out, "w", encoding="utf-8") if args.out not in (None, "-") else sys.stdout
    except OSError as err:
        store.dispose()
        raise BadInput(f"cannot write {args.out}: {err.strerror}") from None
    lines = 0
    try:
        for row in store.replay_log(args.lead, since, until):
            out.write(json.dumps(exported_line(row), ensure_ascii=False, separators=(",", ":")) + "\n")
            lines += 1
    finally:
        store.dispose()
        if out is not sys.stdout:
            out.close()
    print(f"{lines} line(s) exported" + (f" to {args.out}" if out is not sys.stdout else ""), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- demo data and backtest


async def cmd_demo_data(args, settings: Settings) -> int:
    """A generated population straight into the audit store (funnel/demo.py): audit, event
    log and profile updates as the service would have recorded them. An empty store only."""
    from activities.store import AuditStore
    from funnel import demo

    model = _load_model(settings, _active_model(settings))
    store = AuditStore(settings.database_url)
    try:
        if store.has_history():
            raise BadInput(f"the audit store at {settings.database_url} already holds leads: demo data goes into "
                           "an empty one (set LEADFLOW_DATABASE_URL=sqlite:///demo.db)")
        started = time.monotonic()
        made = events = mqls = won = 0
        leads = demo.generate_each(args.leads, model, utcnow(), seed=args.seed, days=args.days,
                                   decision_delay=timedelta(seconds=settings.decision_delay_seconds))
        while part := list(itertools.islice(leads, DEMO_CHUNK)):  # written as made: memory stays flat
            write_population(store, part)
            for lead in part:
                stages = [e.to_stage for e in lead.entries if e.to_stage is not None]
                made, events = made + 1, events + len(lead.events)
                mqls, won = mqls + (Stage.MQL in stages), won + (stages[-1] == Stage.WON)
    finally:
        store.dispose()
    print(f"{made} demo leads ({events} events) scored by {model.ref} into {settings.database_url} in "
          f"{time.monotonic() - started:.1f} s: {mqls} became MQL, {won} won")
    print("next: leadflow report; leadflow backtest --model candidate.toml; the dashboard's funnel at /ui")
    return 0


DEMO_CHUNK = 2000  # demo leads generated, then written, at a time


def lead_logs_of(store):
    """Every logged lead as the backtest replays it: activities/backtest_source.py reads them
    (imported when used, not at every CLI start; bench/equivalence.py imports this name
    from here, in older trees too)."""
    from activities import backtest_source

    return backtest_source.lead_logs_of(store)


def write_population(store, leads) -> None:
    """Generated leads (funnel/demo.py) into the store as the service records them: their
    audit, the event log and the profile updates, each with the time it was taken."""
    for i in range(0, len(leads), 2000):
        part = leads[i:i + 2000]
        store.write_audit([e for lead in part for e in lead.entries])
        events = [pair for lead in part for pair in lead.events]
        store.log_events([e for e, _ in events], [at for _, at in events])
        updates = [pair for lead in part for pair in lead.updates]
        store.log_facts([u for u, _ in updates], [at for _, at in updates])


def _model_file(path: str | Path) -> ScoringModel:
    """A model file, its problems as a one-line input error."""
    try:
        return load_model(Path(path))
    except ModelError as err:
        raise BadInput(str(err).replace("\n", " ")) from None


async def cmd_backtest(args, settings: Settings) -> int:
    from funnel import backtest

    candidate = _model_file(args.model)
    current = (_load_model(settings, _active_model(settings)) if args.against == "current"
               else _model_file(args.against))
    since = parse_timestamp(args.since) if args.since else None
    until = parse_timestamp(args.until) if args.until else utcnow()
    from activities.backtest_source import replay_store

    store = _store(settings)
    started = time.monotonic()
    workers = args.workers or os.cpu_count() or 1
    try:  # each worker process reads its own shard of the leads (activities/backtest_source.py)
        runs = replay_store(store, {"current": current, "candidate": candidate}, until, since,
                            timedelta(seconds=settings.decision_delay_seconds), workers)
    finally:
        store.dispose()
    report = backtest.compare(runs["current"], runs["candidate"], current.ref, candidate.ref,
                              candidate.thresholds.mql)
    took = time.monotonic() - started
    if args.chart:
        _backtest_chart(report, Path(args.chart))
    if args.json:
        _print_json(report.model_dump(mode="json"))
        return 0
    from rich.table import Table

    console = _console()
    table = Table(title=f"backtest of {report.leads} leads ({report.won} won) up to {until:%Y-%m-%d}: "
                        f"{current.ref} (current) vs {candidate.ref} (candidate)", title_justify="left")
    for name in ("", "current", "candidate"):
        table.add_column(name, justify="left" if not name else "right")

    def row(label: str, value) -> None:
        table.add_row(label, *(value(f) for f in (report.current, report.candidate)))

    row("MQLs (presales load)", lambda f: str(f.mqls))
    row("MQLs per week, busiest", lambda f: str(max(f.mqls_per_week.values(), default=0)))
    row("median days first touch -> MQL", lambda f: "-" if f.median_days_first_touch_to_mql is None
        else f"{f.median_days_first_touch_to_mql:.1f}")
    row("won leads made MQL", lambda f: f"{f.won_caught} of {report.won}")
    row("MQLs later disqualified or lost", lambda f: str(f.mqls_later_lost))
    row("precision (won / decided MQLs)", lambda f: "-" if f.precision is None else f"{f.precision:.0%}")
    for channel in sorted(set(report.current.precision_by_channel) | set(report.candidate.precision_by_channel)):
        row(f"  precision, {channel}", lambda f: "-" if f.precision_by_channel.get(channel) is None
            else f"{f.precision_by_channel[channel]:.0%}")
    row("recorded decisions that no longer apply", lambda f: str(f.decisions_refused))
    console.print(table)
    if report.won_earlier_days_median is not None:
        console.print(f"won leads both make MQL: {report.won_earlier} earlier, {report.won_later} later under the "
                      f"candidate (median {report.won_earlier_days_median:+.1f} days earlier)")
    sweep = Table(title="candidate threshold sweep (MQL: fast-tracked, or the score ever reached it)",
                  title_justify="left")
    for name in ("threshold", "MQLs", "won leads caught"):
        sweep.add_column(name, justify="right")
    for point in report.sweep:
        sweep.add_row(f"{point.threshold:g}", str(point.mqls),
                      "-" if point.won_caught_share is None else f"{point.won_caught_share:.0%}")
    console.print(sweep)
    volume = Table(title="of the leads presales and sales decided on: won among each model's best N",
                   title_justify="left")
    for name in ("N leads", "current", "candidate"):
        volume.add_column(name, justify="right")
    for point in report.same_volume:
        volume.add_row(str(point.volume), str(point.current_won), str(point.candidate_won))
    console.print(volume)
    console.print(f"{len(report.changed)} lead(s) end in another stage or MQL status under the candidate"
                  + (": " + ", ".join(f"{c.lead_id} {c.current.value}->{c.candidate.value}" for c in report.changed[:10])
                     + (" ..." if len(report.changed) > 10 else "") if report.changed else "")
                  + f" (read and replayed in {took:.1f} s by {workers} process(es); --json lists every one)")
    return 0


async def cmd_suggest(args, settings: Settings) -> int:
    """Learn a candidate model from closed outcomes (funnel/suggest.py) and write it."""
    try:
        from funnel import suggest
    except ImportError:
        raise BadInput("suggest needs scikit-learn: pip install 'leadflow[learn]'") from None
    store = _store(settings)
    try:
        active = store.active_model()
        logs = lead_logs_of(store)
    finally:
        store.dispose()
    text = active.text if active is not None else settings.model_path.read_text(encoding="utf-8")
    model = parse_model(text, active.ref if active else str(settings.model_path))
    matured = utcnow() - timedelta(days=args.matured_days)
    logs = [log for log in logs if log.created_at <= matured]
    closed = [log for log in logs if log.outcome is not None]
    won = sum(log.outcome == Stage.WON for log in closed)
    if not closed or not won:
        raise BadInput(f"nothing to learn from: {len(closed)} closed lead(s), {won} won")
    try:
        found = suggest.suggest(logs, model, text, won / len(closed), version=f"{model.version}-suggested",
                                seed=args.seed)
    except ImportError:
        raise BadInput("suggest needs scikit-learn: pip install 'leadflow[learn]'") from None
    except suggest.TooFewOutcomes as err:
        raise BadInput(str(err)) from None
    try:
        Path(args.out).write_text(found.model_text, encoding="utf-8")
    except OSError as err:
        raise BadInput(f"cannot write {args.out}: {err.strerror}") from None
    if args.json:
        _print_json(found.model_dump(mode="json", exclude={"model_text"}))
        return 0
    from rich.table import Table

    console = _console()
    table = Table(title=f"learned from {found.closed} closed leads ({found.won} won): what raises the odds of winning",
                  title_justify="left")
    for name in ("rule", "closed leads", "won", "odds x", "points now", "suggested"):
        table.add_column(name, justify="left" if name == "rule" else "right")
    for w in found.weights:
        table.add_row(w.rule, str(w.leads), f"{w.won_share:.0%}", f"{w.odds_ratio:.2f}", f"{w.current_points:g}",
                      f"{w.points:g}")
    console.print(table)
    console.print(f"holdout ({found.holdout} leads): AUC {found.auc_holdout:.2f}, Brier {found.brier_holdout:.3f}; "
                  "calibration (predicted -> observed): "
                  + ", ".join(f"{c.predicted:.0%} -> {c.observed:.0%}" for c in found.calibration))
    console.print(f"threshold kept at {found.threshold:g}: a lead as likely to win as today's MQLs "
                  f"({found.mql_win_rate:.0%}) reaches it. Written to {args.out}; "
                  f"next: leadflow backtest --model {args.out}")
    return 0


def _backtest_chart(report, path: Path) -> None:
    """The weekly MQL load of both models and the candidate's threshold sweep, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--chart needs matplotlib: pip install 'leadflow[charts]'") from None
    figure, (load, sweep) = plt.subplots(1, 2, figsize=(12, 4.5))
    weeks = sorted(set(report.current.mqls_per_week) | set(report.candidate.mqls_per_week))
    for figures, style in ((report.current, "-"), (report.candidate, "--")):
        load.plot(range(len(weeks)), [figures.mqls_per_week.get(w, 0) for w in weeks], style, label=figures.model)
    load.set_xticks(range(0, len(weeks), max(1, len(weeks) // 8)), weeks[::max(1, len(weeks) // 8)], rotation=45)
    load.set(title="MQLs per week (presales load)", ylabel="MQLs")
    load.legend()
    sweep.plot([p.mqls for p in report.sweep], [100 * (p.won_caught_share or 0) for p in report.sweep], "o-")
    for p in report.sweep:
        sweep.annotate(f"{p.threshold:g}", (p.mqls, 100 * (p.won_caught_share or 0)), fontsize=8)
    sweep.set(title=f"{report.candidate.model}: threshold sweep", xlabel="MQLs", ylabel="won leads caught (%)",
              ylim=(0, 105))
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as err:
        raise BadInput(f"cannot write {path}: {err.strerror}") from None
    finally:
        plt.close(figure)
    print(f"chart written to {path}", file=sys.stderr)


# --------------------------------------------------------------------------- status


async def cmd_status(args, settings: Settings) -> int:
    """Is Leadflow up, and how far behind are its workers? Exit 0 when workers poll and
    the oldest waiting task is within LEADFLOW_MAX_BACKLOG, else 1."""
    tc = await _connect(settings)
    health = await api.queue_health(tc, settings)
    behind = health.oldest_seconds > settings.max_backlog_seconds
    if args.json:
        _print_json({**health.model_dump(), "behind": behind, "max_backlog_seconds": settings.max_backlog_seconds})
    else:
        print(f"task queue {health.task_queue}: {health.workers} worker(s) polling")
        print(f"lead tasks waiting: {health.backlog}, the oldest for {health.oldest_seconds:g} s"
              + (f" -- BEHIND (limit {settings.max_backlog_seconds:g} s): the API refuses input until it catches up"
                 if behind else ""))
        print(f"activity tasks waiting: {health.activity_backlog}, the oldest for {health.activity_oldest_seconds:g} s")
        if not health.workers:
            print("no worker is running: start one (`scripts/run`, or `leadflow-worker`)")
    return 0 if health.workers and not behind else 1


# --------------------------------------------------------------------------- personal data


async def cmd_export_person(args, settings: Settings) -> int:
    """Everything kept about the person (GDPR Art. 15) as JSON: facts, events with attributes,
    the audit history, outbound messages, erasures. Without Temporal, the store's part."""
    store = _store(settings)
    try:
        try:
            tc = await _connect(settings)
        except CliError as err:
            print(f"{PROG}: {err}; exporting the audit store's part only", file=sys.stderr)
            tc = None
        export = await api.export_person(tc, store, args.lead)
    finally:
        store.dispose()
    for note in export.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    _print_json(export.model_dump(mode="json"))
    return 0


async def cmd_erase(args, settings: Settings) -> int:
    """Erase the person's data (GDPR Art. 17); --by is recorded as the manager who did it."""
    by = _validated(Actor, name=args.by, role=Role.MANAGER.value)
    tc = await _connect(settings)
    store = _store(settings)
    try:
        report = await _answer(api.erase_person(tc, store, args.lead, by), args.lead, "erasure")
    finally:
        store.dispose()
    if args.json:
        _print_json(report.model_dump(mode="json"))
        return 0
    print(f"personal data of lead {report.lead_id} erased by {report.erased_by} at {_when(report.erased_at)}: "
          f"{report.profile_facts} profile fact value(s), attributes of {report.events} event(s), "
          f"{report.audit_entries} history entr(ies) and {report.outbox_messages} outbox message(s) scrubbed")
    print(f"Temporal history: {report.history}")
    return 0


async def cmd_keys_new(args, settings: Settings) -> int:
    """A fresh payload key as LEADFLOW_PAYLOAD_KEYS takes it: put it first, keep the old ones."""
    from payload_codec import KEY_ID_PATTERN, key_spec, new_key

    if not KEY_ID_PATTERN.match(args.id):
        raise BadInput(f"key id {args.id!r}: use 1-64 of A-Z a-z 0-9 _ . - (no ':')")
    print(key_spec(args.id, new_key()))
    return 0


async def cmd_keys_rewrap(args, settings: Settings) -> int:
    """Wrap every lead's data key with the current payload key, so an old payload key can
    retire as far as lead keys go (payloads encrypted with it directly still need it)."""
    from config import data_converter

    store = _store(settings)
    try:
        codec = data_converter(settings, key_store=store).payload_codec
        count = await asyncio.to_thread(codec.lead_keys.rewrap_sync)
    finally:
        store.dispose()
    print(f"{count} lead key(s) re-wrapped with payload key {codec.keyring.current!r}")
    return 0


# --------------------------------------------------------------------------- webhook subscriptions


async def cmd_subscriptions(args, settings: Settings) -> int:
    """Managers' webhook subscriptions, straight in the audit store (as the API keeps them)."""
    from activities import webhook_store
    from activities.webhook_store import DeliveryStatus, SubscriptionKind

    store = _store(settings)
    try:
        action = args.subscriptions_command
        if action == "add":
            if not re.match(r"^https?://[^\s/]+", args.url):
                raise BadInput(f"{args.url!r} is not an http(s) URL")
            try:
                kinds = [SubscriptionKind(k.strip()) for k in args.kinds.split(",") if k.strip()]
            except ValueError as err:
                raise BadInput(f"{err}; kinds: {', '.join(k.value for k in SubscriptionKind)}") from None
            if not kinds:
                raise BadInput("--kinds names at least one kind")
            row = await asyncio.to_thread(webhook_store.add_subscription, store, args.url, kinds, args.by,
                                          None, args.description)
            print(f"{row.subscription_id}: {row.url} gets {', '.join(row.kinds)}")
            print(f"secret (shown once; the receiver verifies webhook-signature with it): {row.secret}")
        elif action == "list":
            rows = await asyncio.to_thread(webhook_store.subscriptions, store, args.all)
            for row in rows:
                state = "" if row.active else " (removed)"
                print(f"{row.subscription_id}  {row.url}  {','.join(row.kinds)}  by {row.created_by}{state}")
            if not rows:
                print("no subscriptions")
        elif action == "remove":
            if not await asyncio.to_thread(webhook_store.remove_subscription, store, args.id):
                raise BadInput(f"no subscription {args.id}")
            print(f"{args.id} removed: nothing more is posted to it")
        elif action == "deliveries":
            status = DeliveryStatus(args.status) if args.status else None
            rows = await asyncio.to_thread(webhook_store.deliveries, store, args.id, status, args.limit)
            for d in rows:
                error = f"  {d.last_error}" if d.last_error and d.status != "delivered" else ""
                print(f"{d.delivery_id}  {d.kind}  {d.status}  attempts {d.attempts}{error}")
            if not rows:
                print("no deliveries")
        else:  # replay
            done = await asyncio.to_thread(webhook_store.replay, store, args.id, args.delivery or None)
            print(f"{done} dead letter(s) of {args.id} go out again")
    finally:
        store.dispose()
    return 0


# --------------------------------------------------------------------------- scoring model versions


async def cmd_model_apply(args, settings: Settings) -> int:
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror}") from None
    try:
        model = parse_model(text, str(path))
    except ModelError as err:
        raise BadInput(str(err)) from None
    by = _validated(Actor, name=args.by, role=Role.MANAGER.value)
    tc = await _connect(settings)
    store = _store(settings)
    try:
        if args.dry_run:
            preview = await api.preview_model(tc, store, settings, model)
            if args.json:
                _print_json(preview.model_dump(mode="json"))
                return 0
            print(f"{model.ref} would change the score of {preview.score_changes} and the stage of "
                  f"{preview.stage_changes} of {preview.leads} running lead(s)"
                  + (f" ({preview.unreadable} did not answer)" if preview.unreadable else ""))
            for example in preview.examples:
                a, b = example["score"]
                stage = " -> ".join(dict.fromkeys(example["stage"]))
                print(f"  {example['lead_id']}: {a:g} -> {b:g}, {stage}")
            return 0
        from activities.store import ModelConflict

        try:
            version, _ = await api.apply_model(tc, settings, store, text, str(path), by=by, rate_per_second=args.rate)
        except ModelConflict as err:
            raise BadInput(str(err)) from None
    finally:
        store.dispose()
    print(f"{version.ref} recorded (sha256 {version.sha256[:12]}, by {version.applied_by}): new leads use it now")
    if args.no_wait:
        print(f"rolling out to running leads in the background: `{PROG} model status {version.ref}`")
        return 0
    return await _follow_rollout(tc, settings, version.ref)


async def _follow_rollout(tc, settings: Settings, ref: str) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from activities.rollout_activities import behind_query

    total = (await tc.count_workflows(behind_query(ref, settings.task_queue))).count
    progress = Progress(TextColumn(f"rolling out {ref}"), BarColumn(), MofNCompleteColumn(), TextColumn("leads"),
                        TimeElapsedColumn(), console=_console(stderr=True), disable=not sys.stderr.isatty())
    with progress:
        task = progress.add_task("rollout", total=max(total, 1))
        while True:
            state = await api.rollout_progress(tc, settings, ref)
            if state is not None:
                progress.update(task, completed=min(state.signalled, max(total, 1)))
                if state.done:
                    break
            await asyncio.sleep(0.5)
    print(f"{ref} rolled out: {state.signalled} lead(s) and account(s) told"
          + (f"; {state.behind} still behind (apply again to go on)" if state.behind else ""))
    return 0


async def cmd_model_status(args, settings: Settings) -> int:
    store = _store(settings)
    try:
        versions = store.model_versions()
    finally:
        store.dispose()
    ref = args.ref or next((v.ref for v in versions if v.active), None)
    rollout = None
    if ref is not None:
        try:
            tc = await _connect(settings)
            rollout = await api.rollout_progress(tc, settings, ref)
        except CliError:
            pass
    if args.json:
        _print_json({"versions": [v.model_dump(mode="json", exclude={"text"}) for v in versions],
                     "rollout": rollout.model_dump(mode="json") if rollout else None})
        return 0
    from rich.table import Table

    table = Table(title="scoring model versions", title_justify="left")
    for name in ("version", "active", "applied by", "applied at", "sha256"):
        table.add_column(name)
    for v in versions:
        table.add_row(v.ref, "yes" if v.active else "", v.applied_by, _when(v.applied_at), v.sha256[:12])
    console = _console()
    console.print(table)
    if rollout is not None:
        console.print(f"rollout of {rollout.ref}: {rollout.signalled} lead(s) told, "
                      + ("done" if rollout.done else "under way")
                      + (f", {rollout.behind} behind at the last look" if rollout.behind is not None else ""))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Leadflow: each sales lead a durable Temporal workflow.",
                     epilog="exit codes: 0 ok, 1 cannot reach Temporal, 2 invalid input, 3 no such lead, "
                            "4 command refused, 5 lead closed")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def lead_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("lead", type=lead_id_arg, metavar="LEAD", help="lead id (an opaque key, never an e-mail)")
        return p

    p = lead_parser("event", "record an activity of a lead (creates the lead if new)")
    p.add_argument("type", metavar="TYPE", help="event type from the scoring model, e.g. webinar_attended")
    p.add_argument("--id", help="event id (default: a fresh one); the same id is applied once")
    p.add_argument("--at", metavar="ISO8601", help="when it happened, with timezone (default: now)")
    p.add_argument("--channel", help="channel, e.g. webinar, organic, paid_search")
    p.add_argument("--attr", action="append", metavar="K=V", help="an attribute of the event (repeatable)")
    p.set_defaults(handler=cmd_event)

    p = lead_parser("profile", "set profile (fit) facts of a lead: true/false, numbers, else text")
    p.add_argument("facts", nargs="+", metavar="FIELD=VALUE")
    p.add_argument("--id", help="update id (default: a fresh one); the same id is applied once")
    p.add_argument("--by", help="who supplies the facts (default: leadflow/system)")
    p.add_argument("--role", choices=HUMAN_ROLES, default=Role.MARKETING.value, help="role of --by (default marketing)")
    p.set_defaults(handler=cmd_profile)

    def command_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = lead_parser(name, help)
        p.add_argument("--by", required=True, metavar="NAME", help="who does it")
        p.add_argument("--role", choices=HUMAN_ROLES, default=None,
                       help=f"role of --by (default {DEFAULT_ROLES[name].value})")
        p.add_argument("--note", help="free-text note for the history")
        p.add_argument("--json", action="store_true", help="print the lead's new state as JSON")
        p.add_argument("--key", type=_command_key, metavar="KEY",
                       help="idempotency key: the same command with the same key is applied at most once")
        p.set_defaults(handler=cmd_lead_command)
        return p

    command_parser("accept", "presales accepts an MQL (-> sal)")

    p = command_parser("reject", "reject a lead: disqualify, or --recycle to nurture it again")
    p.add_argument("--reason", required=True, metavar="CODE", help="reason code, e.g. no_budget")
    p.add_argument("--recycle", action="store_true", help="not now: back to nurturing instead of disqualified")

    p = command_parser("qualify", "qualify a lead (-> sql) with BANT (default) or --meddic criteria")
    for flag in BANT_FLAGS:
        p.add_argument(f"--{flag}", action="store_true", help=f"BANT: {flag} confirmed")
    p.add_argument("--meddic", action="store_true", help="use MEDDIC instead of BANT")
    for flag in MEDDIC_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action="store_true", help=f"MEDDIC: {flag} confirmed")

    p = command_parser("contact", "log a contact with the lead")
    p.add_argument("--channel", choices=["phone", "email", "meeting", "chat", "other"], default="phone")

    p = command_parser("close", "close the deal as won or lost")
    p.add_argument("outcome", choices=["won", "lost"], metavar="{won,lost}")
    p.add_argument("--reason", metavar="CODE", help="reason code (required for lost)")

    p = command_parser("reopen", "a manager reopens a lost or disqualified lead (-> recycled)")
    p.add_argument("--reason", required=True, metavar="CODE")

    p = lead_parser("show", "show a lead's current state")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_show)

    p = lead_parser("history", "a lead's audit history (also of closed leads)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=_non_negative, default=100)
    p.add_argument("--offset", type=_non_negative, default=0)
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser("list", help="running leads", description="running leads, by stage and owner")
    p.add_argument("--stage", choices=[s.value for s in Stage])
    p.add_argument("--owner")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("report", help="funnel report per channel from the audit store")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true")
    shape.add_argument("--csv", nargs="?", const="stages", choices=CSV_TABLES, metavar="TABLE",
                       help=f"one table as CSV: {', '.join(CSV_TABLES)} (default stages: a row per channel and stage)")
    p.add_argument("--opportunity-days", type=_window_days, default=84, metavar="N",
                   help="the lead -> opportunity window of the 'within' figures (default 84, the sources')")
    p.add_argument("--won-days", type=_window_days, default=18, metavar="N",
                   help="the opportunity -> won window (default 18, the sources')")
    p.add_argument("--cohort", choices=["month", "week"], default="month", help="cohorts by creation month or week")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("import", help="send events (and profile updates) from a .jsonl/.ndjson or .csv file")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("events", help="the event log: every event and profile update taken, for replay")
    events_sub = p.add_subparsers(dest="events_command", required=True, metavar="{export}")
    e = events_sub.add_parser("export", help="as JSON lines that `leadflow import` takes back",
                              description="every logged event and profile update, per lead in the order they "
                                          "happened, as JSON lines (the import format, plus received_at)")
    e.add_argument("--out", metavar="FILE", help="write here (default: standard output)")
    e.add_argument("--lead", metavar="ID", help="this lead's only")
    e.add_argument("--since", metavar="TIME", help="what happened at or after (ISO 8601 with a timezone)")
    e.add_argument("--until", metavar="TIME", help="what happened before (ISO 8601 with a timezone)")
    e.set_defaults(handler=cmd_events_export)

    p = sub.add_parser("demo-data", help="a generated population into an empty audit store, to try things on",
                       description="leads with channels, campaigns, sessions, decisions and outcomes of a known "
                                   "hidden propensity, played through the core into the audit store")
    p.add_argument("--leads", type=_positive_count, default=2000, metavar="N")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=_window_days, default=365, metavar="N", help="created over the last N days")
    p.set_defaults(handler=cmd_demo_data)

    p = sub.add_parser("backtest", help="replay logged leads under a candidate model and the current one",
                       description="every logged lead's events, profile updates and recorded decisions, "
                                   "replayed through the core under both models, compared")
    p.add_argument("--model", required=True, metavar="FILE", help="the candidate model (TOML)")
    p.add_argument("--against", default="current", metavar="FILE|current",
                   help="compare with this model file (default: the active version)")
    p.add_argument("--from", dest="since", metavar="TIME", help="leads created at or after (ISO 8601 with a timezone)")
    p.add_argument("--to", dest="until", metavar="TIME",
                   help="leads created before, and replayed up to (default: now)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--chart", metavar="FILE.png", help="weekly MQL load and the threshold sweep as a PNG (matplotlib)")
    p.add_argument("--workers", type=_positive_count, default=None, metavar="N",
                   help="processes (default: one per core)")
    p.set_defaults(handler=cmd_backtest)

    p = sub.add_parser("suggest", help="learn a candidate model from closed outcomes (scikit-learn)",
                       description="per event type and fit rule, how much it raises the odds of winning "
                                   "(logistic regression, checked on a holdout), as a candidate model file")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the candidate model (TOML)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=7, help="of the holdout split")
    p.add_argument("--matured-days", type=_window_days, default=120, metavar="N",
                   help="learn from leads created at least N days ago (default 120): younger ones have closed "
                        "their quick rejections but not yet their slow wins")
    p.set_defaults(handler=cmd_suggest)

    p = lead_parser("export-person", "everything kept about the person, as JSON (GDPR Art. 15)")
    p.set_defaults(handler=cmd_export_person)

    p = lead_parser("erase", "erase the person's data, keep the funnel's numbers (GDPR Art. 17; managers)")
    p.add_argument("--by", required=True, metavar="NAME", help="the manager who erases it (recorded)")
    p.add_argument("--json", action="store_true", help="print the erasure report as JSON")
    p.set_defaults(handler=cmd_erase)

    p = sub.add_parser("keys", help="payload keys: make a new one, re-wrap lead keys after a rotation",
                       description="payload keys (LEADFLOW_PAYLOAD_KEYS): make a new one, re-wrap lead keys")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION", parser_class=_Parser)
    k = keys_sub.add_parser("new", help="print a fresh key as id:base64 (put it first in LEADFLOW_PAYLOAD_KEYS)")
    k.add_argument("id", metavar="ID", help="the new key's id, e.g. k2")
    k.set_defaults(handler=cmd_keys_new)
    k = keys_sub.add_parser("rewrap", help="wrap every lead key with the current payload key")
    k.set_defaults(handler=cmd_keys_rewrap)

    p = sub.add_parser("account", help="an account (a company's buying team): score, roles, contacts",
                       description="an account: leads of one company (account_id fact or e-mail domain), its "
                                   "score, buying-team roles and whether it is an MQA")
    p.add_argument("account", metavar="ACCOUNT_ID", help="e.g. acme-gmbh.de")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_account)

    p = sub.add_parser("accounts", help="the accounts (buying teams), newest first: stage, score, roles",
                       description="the accounts of this deployment, newest first, with how many are MQAs")
    p.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_accounts)

    p = sub.add_parser("subscriptions", help="webhook subscriptions: add, list, remove, deliveries, replay",
                       description="webhook subscriptions (managers): who gets which messages, signed per "
                                   "Standard Webhooks; the delivery log and the dead letter")
    subs = p.add_subparsers(dest="subscriptions_command", required=True, metavar="ACTION", parser_class=_Parser)
    s = subs.add_parser("add", help="subscribe a URL to kinds of message")
    s.add_argument("url", metavar="URL")
    s.add_argument("--kinds", required=True, help="comma-separated: handover, stage_change, sla_breach, "
                                                  "nurture_step, opportunity, escalation, review, model_change")
    s.add_argument("--by", required=True, metavar="NAME", help="the manager (recorded)")
    s.add_argument("--description")
    s = subs.add_parser("list", help="the subscriptions")
    s.add_argument("--all", action="store_true", help="removed ones too")
    s = subs.add_parser("remove", help="post nothing more to a subscription")
    s.add_argument("id", metavar="ID")
    s = subs.add_parser("deliveries", help="a subscription's delivery log, oldest first")
    s.add_argument("id", metavar="ID")
    s.add_argument("--status", choices=["pending", "delivered", "dead"], help="dead: the dead letter")
    s.add_argument("--limit", type=_positive_count, default=100)
    s = subs.add_parser("replay", help="send a subscription's dead letters again")
    s.add_argument("id", metavar="ID")
    s.add_argument("--delivery", action="append", metavar="DELIVERY_ID", help="only these (repeatable)")
    p.set_defaults(handler=cmd_subscriptions)

    p = sub.add_parser("status", help="workers polling and how far behind they are",
                       description="workers polling the lead task queue and how far behind they are (from Temporal)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("model", help="scoring model versions: apply one to every lead, see them",
                       description="scoring model versions: apply one to every lead, see them")
    model_sub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION", parser_class=_Parser)
    m = model_sub.add_parser("apply", help="validate, record and roll out a model file (managers)",
                             description="validate a model file, record it as the active version and roll it out "
                                         "to every running lead (new leads use it at once)")
    m.add_argument("file", metavar="FILE")
    m.add_argument("--by", required=True, metavar="NAME", help="the manager applying it (recorded)")
    m.add_argument("--dry-run", action="store_true", help="only say how many leads would change score and stage")
    m.add_argument("--rate", type=_positive_rate, default=20.0, help="leads told per second (default 20)")
    m.add_argument("--no-wait", action="store_true", help="do not follow the rollout")
    m.add_argument("--json", action="store_true", help="with --dry-run: the preview as JSON")
    m.set_defaults(handler=cmd_model_apply)
    m = model_sub.add_parser("status", help="the recorded versions and a rollout's progress")
    m.add_argument("ref", nargs="?", metavar="NAME@VERSION", help="default: the active version")
    m.add_argument("--json", action="store_true")
    m.set_defaults(handler=cmd_model_status)
    return parser


def _positive_rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < rate <= 1000:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1000")
    return rate


def _command_key(value: str) -> str:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$", value):
        raise argparse.ArgumentTypeError(f"{value!r}: use 1-200 of A-Z a-z 0-9 _ . : -")
    return value


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return number


def _positive_count(value: str) -> int:
    number = _non_negative(value)
    if not 1 <= number <= 10_000_000:
        raise argparse.ArgumentTypeError(f"{value}: give 1 to 10,000,000")
    return number


# --------------------------------------------------------------------------- main


# Exit status when whoever reads our output has gone (`leadflow show L-1 --json | head -c1`):
# 141 = 128 + SIGPIPE, what a shell reports for a tool killed by SIGPIPE (cat, grep, ...).
# Not 0: not all of the output was delivered, and a `set -o pipefail` script should see
# that as it does for any other tool; not 1, which here means "cannot reach Temporal".
OUTPUT_CLOSED = 141


def main(argv: list[str] | None = None) -> int:
    """Run one command; `argv=None` means: this process is the command (console script, __main__)."""
    try:
        code = _run(argv)
    except BrokenPipeError:  # stdout (or stderr) is a pipe whose reader has gone: say nothing more
        code = OUTPUT_CLOSED
    except Exception:
        if argv is not None:
            raise
        _print_traceback()  # a bug: shown as Python shows it, but the process still ends below
        code = 1
    if not _flush_output():
        code = OUTPUT_CLOSED
    if argv is None:
        # Leave without interpreter teardown, whatever the command did. Once temporalio's
        # runtime exists -- made by any connect, also one that failed -- its Rust threads
        # can outlive Python, and teardown then aborts now and then with "Fatal Python
        # error: PyGILState_Release ..." (exit -6) instead of our exit code
        # (temporalio/sdk-python#300). The output is flushed, every store is disposed by
        # the command itself, and nothing else needs cleaning up.
        os._exit(code)
    return code


def _flush_output() -> bool:
    """Flush stdout and stderr; False if one of them is a pipe whose reader has gone.

    Such a stream is pointed at /dev/null and flushed again, as the Python docs advise
    (https://docs.python.org/3/library/signal.html#note-on-sigpipe): what it still
    buffers is dropped, so no later flush (e.g. at interpreter exit) fails again."""
    delivered = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed (`leadflow ... >&-`): print() drops output
            continue
        try:
            stream.flush()
        except BrokenPipeError:
            delivered = False
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(devnull, stream.fileno())
                finally:
                    os.close(devnull)
                stream.flush()
            except (OSError, ValueError):  # no file descriptor (e.g. replaced by a test): leave it
                pass
        except (OSError, ValueError):  # closed or unusable: nothing more can be written anyway
            pass
    return delivered


def _print_traceback() -> None:
    try:
        traceback.print_exc()
    except (OSError, ValueError):  # stderr is gone too
        pass


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        settings = Settings.from_env()
    except ValidationError as err:
        print(f"{PROG}: invalid settings in the environment: {describe_validation(err)}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(args.handler(args, settings))
    except CliError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return err.code
    except api.LeadNotFound as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 3
    except api.CommandRefused as err:
        print(f"{PROG}: refused: {err}", file=sys.stderr)
        return 4
    except api.LeadClosed as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 5
    except (api.TemporalUnavailable, api.LeadStarting) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    except KeyConfigError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        # Temporal or database trouble we cannot explain better: still one line.
        from temporalio.service import RPCError

        if isinstance(err, RPCError):
            print(f"{PROG}: Temporal error: {err.message}", file=sys.stderr)
            return 1
        try:
            from sqlalchemy.exc import SQLAlchemyError
        except ImportError:  # pragma: no cover
            SQLAlchemyError = ()  # type: ignore[assignment]
        if isinstance(err, SQLAlchemyError):
            print(f"{PROG}: audit store error: {str(err).splitlines()[0]}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
