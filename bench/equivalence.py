"""Equivalence check for speed work on the core: everything the core puts out on a fixed
workload, digested here and at another git revision, compared item by item.

The workload: a demo population played through the core (funnel/demo.py), written to a
SQLite store and replayed by the backtest under two models (every effect after every input,
the final state and view, the backtest's replays and report), and seeded random scenarios
that reach what the demo does not: late, out-of-order, duplicate, future, unknown and
beyond-horizon events, profile and consent facts, commands (refused ones too), timers,
model switches, personal data erasure and continue-as-new (the state through JSON into a
new Lead). Every output is compared in full: pydantic models by field (types, values, the
fields set), audit text, outbound payloads, dict order. Effects are digested when taken
and again at the end of their scenario, so later mutation of shared objects shows.

Nothing here is a stored digest: `--against REV` unpacks REV (git archive) into a temporary
folder, runs this same file (from here) there, and compares.

    .venv/bin/python bench/equivalence.py --against main [--leads 300] [--random 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path

from pydantic import BaseModel

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
TYPES = ["website_visit", "pricing_page_visit", "newsletter_signup", "email_open", "email_click", "content_download",
         "webinar_registration", "webinar_attended", "demo_request", "unsubscribe", "email_bounced", "spam_complaint",
         "resubscribe", "video_view", "live_chat", "no_such_type"]


def canon(x) -> object:
    """A value as nested tuples that keep types, field order, the fields set and dict order."""
    if isinstance(x, BaseModel):
        return (type(x).__name__, tuple(sorted(x.model_fields_set)),
                tuple((k, canon(v)) for k, v in x.__dict__.items()))
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, tuple((f.name, canon(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, dict):
        return ("dict", tuple((canon(k), canon(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(canon(v) for v in x))
    if isinstance(x, (set, frozenset)):
        return (type(x).__name__, tuple(sorted(repr(canon(v)) for v in x)))
    if isinstance(x, Enum):
        return (type(x).__name__, x.value)
    return (type(x).__name__, repr(x))


class Digest:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, *values) -> None:
        for value in values:
            self.h.update(repr(canon(value)).encode())
            self.h.update(b"\x00")

    def hex(self) -> str:
        return self.h.hexdigest()[:16]


def _models():
    from config import DEFAULT_MODEL
    from funnel.scoring_model import parse_model

    text = DEFAULT_MODEL.read_text()
    current = parse_model(text, "current")
    candidate = parse_model(text.replace('version = "1"', 'version = "2"').replace("mql = 100 ", "mql = 70 "), "c")
    small = parse_model(text.replace('version = "1"', 'version = "small"').replace("max_events = 500", "max_events = 10")
                        .replace('horizon = "365d"', 'horizon = "20d"').replace('percent = 25', 'points = 7')
                        .replace('after = "30d"\nevery = "30d"', 'after = "3d"\nevery = "2d"')
                        .replace("auto_accept = false", "auto_accept = true")
                        .replace("qualify_from_mql = false", "qualify_from_mql = true")
                        .replace("reset_engagement_on_recycle = true", "reset_engagement_on_recycle = false")
                        .replace("[events.live_chat]\npoints = 15\n", ""), "small")  # live_chat: unknown here
    return {"current": current, "candidate": candidate, "small": small}


# --------------------------------------------------------------------------- lead by lead, with every effect


def _step(lead, digest: Digest, taken: list, call, *args) -> None:
    from funnel.models import Refused

    outcome = "ok"
    try:
        call(*args)
    except Refused as refused:
        outcome = f"refused: {refused}"
    digest.add(outcome)
    effects = lead.take_effects()
    taken.append(effects)
    digest.add(effects, lead.next_wakeup(), lead.state)
    twin = getattr(lead, "twin", None)
    if twin is not None:  # the same call on a lead that records no effects: the same state, always
        twin_outcome = "ok"
        try:
            getattr(twin, call.__name__)(*args)
        except Refused as refused:
            twin_outcome = f"refused: {refused}"
        if (twin_outcome != outcome or canon(twin.state) != canon(lead.state)
                or twin.next_wakeup() != lead.next_wakeup()):
            raise AssertionError(f"a lead without effects differs after {call.__name__} of {lead.state.lead_id}")
        assert not twin.take_effects().audit


def _with_twin(lead, make):
    """`lead` with a twin that records no effects, where the core can do that (not before)."""
    try:
        lead.twin = make(record_effects=False)
    except TypeError:
        pass
    return lead


def _finish(lead, digest: Digest, taken: list) -> None:
    digest.add(lead.state, lead.view(), lead.consent(), lead.next_wakeup(), taken)


def replay_captured(log, model, until, delay) -> str:
    """backtest.replay's loop with every effect, wake-up and state on the way."""
    from funnel.lead import Lead

    digest, taken = Digest(), []
    lead = Lead.create(log.lead_id, model, log.created_at, channel=log.channel, decision_delay=delay)
    taken.append(lead.take_effects())
    digest.add(taken[-1], lead.state)
    for item in sorted(log.inputs, key=lambda i: (i.at, i.order)):
        if item.at > until:
            break
        if item.event is not None:
            _step(lead, digest, taken, lead.ingest, item.event, item.at)
        elif item.update is not None:
            _step(lead, digest, taken, lead.update_profile, item.update, item.at)
        elif item.owner is not None:
            _step(lead, digest, taken, lead.tick, item.at)
            _step(lead, digest, taken, lead.assign_owner, item.owner, item.at)
        elif item.command is not None:
            _step(lead, digest, taken, lead.check, item.command)
            _step(lead, digest, taken, lead.execute, item.command, item.at)
    _step(lead, digest, taken, lead.tick, until)
    _finish(lead, digest, taken)
    return digest.hex()


def population(leads: int) -> dict[str, list[str]]:
    from activities.store import AuditStore
    from funnel import backtest, demo
    from starter import lead_logs_of, write_population

    models = _models()
    out: dict[str, list[str]] = {}
    for delay in (timedelta(seconds=5), timedelta(0)):
        made = demo.generate(leads, models["current"], NOW, decision_delay=delay, seed=3)
        out[f"demo delay={delay}"] = [_digest_of(d.entries, d.events, d.updates, d.propensity) for d in made]
    made = demo.generate(leads, models["current"], NOW, decision_delay=timedelta(seconds=5))
    with tempfile.TemporaryDirectory() as tmp:
        store = AuditStore(f"sqlite:///{Path(tmp) / 'eq.db'}")
        write_population(store, made)
        logs = lead_logs_of(store)
        store.dispose()
    out["lead logs"] = [_digest_of(log) for log in logs]
    delay = timedelta(seconds=5)
    for name in ("current", "candidate", "small"):
        out[f"replay captured {name}"] = [replay_captured(log, models[name], NOW, delay) for log in logs]
    pair = {"current": models["current"], "candidate": models["candidate"]}
    runs = backtest.replay_all(logs, pair, NOW, delay)
    for name, items in runs.items():
        out[f"backtest {name}"] = [_digest_of(r) for r in items]
    report = backtest.compare(runs["current"], runs["candidate"], "current", "candidate", 70)
    out["backtest report"] = [_digest_of(report), _digest_of(report.model_dump_json())]
    return out


def _digest_of(*values) -> str:
    digest = Digest()
    digest.add(*values)
    return digest.hex()


# --------------------------------------------------------------------------- random scenarios


def scenario(seed: int) -> str:
    from funnel.lead import Lead
    from funnel.models import (
        Accept, ActivityEvent, Actor, Bant, Close, LeadState, LogContact, Meddic, ProfileUpdate, Qualify, Reject,
        Reopen, Role,
    )

    rng = random.Random(seed)
    models = _models()
    names = list(models)
    model = models[rng.choice(names)]
    delay = rng.choice([timedelta(0), timedelta(seconds=5), timedelta(minutes=10)])
    seen_max = rng.choice([2000, 2000, 6])
    lead_id = f"r-{seed}"
    t = NOW - timedelta(days=rng.uniform(100, 400))
    digest, taken = Digest(), []
    channel = rng.choice([None, "web", "email"])
    lead = _with_twin(Lead.create(lead_id, model, t, channel=channel, seen_ids_max=seen_max, decision_delay=delay),
                      lambda **kw: Lead.create(lead_id, model, t, channel=channel, seen_ids_max=seen_max,
                                               decision_delay=delay, **kw))
    taken.append(lead.take_effects())
    digest.add(taken[-1], lead.state)
    ids: list[str] = []
    presales, sales, manager = (Actor(name="p-1", role=Role.PRESALES), Actor(name="s-1", role=Role.SALES),
                                Actor(name="m-1", role=Role.MANAGER))
    for n in range(rng.randint(5, 70)):
        t += timedelta(seconds=rng.choice([0, 1, 30, 600, 3600 * 5, 86400 * 2, 86400 * 20, 86400 * 45]))
        roll = rng.random()
        if roll < 0.5:
            batch = []
            burst = rng.choice(TYPES[:8]) if rng.random() < 0.1 else None  # enough of one type to reach its cap
            for _ in range(rng.choice([1, 1, 1, 2, 4]) if burst is None else 12):
                if ids and rng.random() < 0.08:
                    event_id = rng.choice(ids)  # a duplicate
                else:
                    event_id = f"e{n}-{len(ids)}"
                    ids.append(event_id)
                back = rng.choice([0, 0, 0, 5, 3600, 86400 * 3, 86400 * 30, 86400 * 400, -60, -3600])
                batch.append(ActivityEvent(
                    event_id=event_id, lead_id=lead_id if rng.random() < 0.97 else "someone-else",
                    type=burst or rng.choice(TYPES), occurred_at=t - timedelta(seconds=back),
                    channel=rng.choice([None, "web", "email", "ads"]), source=rng.choice([None, "api"]),
                    attributes={"page": "/pricing"} if rng.random() < 0.2 else {}))
            applied = frozenset(rng.sample(ids, min(len(ids), 2))) if rng.random() < 0.05 else frozenset()
            digest.add(lead.forgets([e.event_id for e in batch]))
            _step(lead, digest, taken, lead.ingest_many, batch, t, applied)
        elif roll < 0.6:
            facts = rng.choice([{"company_size": rng.randint(10, 9000)}, {"industry": rng.choice(["software", "Retail"])},
                                {"seniority": "vp", "country": "DE"}, {"student": rng.random() < 0.5},
                                {"target_account": True}, {"email_consent": rng.random() < 0.5},
                                {"email_consent": True, "email_consent_at": "2026-01-02T03:04:05+01:00",
                                 "email_consent_source": "form-7"}])
            observed = rng.choice([None, t - timedelta(days=rng.uniform(0, 10))])
            update = ProfileUpdate(update_id=f"u{n}" if rng.random() < 0.9 else "u0", lead_id=lead_id, facts=facts,
                                   observed_at=observed)
            _step(lead, digest, taken, lead.update_profile, update, t)
        elif roll < 0.8:
            command = rng.choice([
                Accept(by=presales), Accept(by=presales, note="fine"), Reject(by=presales, reason="no_budget"),
                Reject(by=sales, reason="not_now", recycle=True),
                Qualify(by=presales, bant=Bant(budget=True, need=True, timing=rng.random() < 0.7)),
                Qualify(by=sales, framework="meddic", meddic=Meddic(metrics=True, economic_buyer=True, champion=True,
                                                                     identify_pain=True, decision_process=True)),
                LogContact(by=presales, note="called"), LogContact(by=sales), Close(by=sales, outcome="won"),
                Close(by=sales, outcome="lost"),
                Close(by=sales, outcome="lost", reason="price"), Reopen(by=manager, reason="new_budget"),
                Accept(by=Actor(name="x", role=Role.MARKETING)),
            ])
            _step(lead, digest, taken, lead.check, command)
            _step(lead, digest, taken, lead.execute, command, t, rng.choice([None, f"cmd-{n}", "cmd-0"]))
            digest.add(lead.outcome_of(f"cmd-{n}"))
        elif roll < 0.87:
            _step(lead, digest, taken, lead.tick, t)
        elif roll < 0.9:
            _step(lead, digest, taken, lead.assign_owner, rng.choice(["p-1", "p-2"]), t)
        elif roll < 0.94:
            model = models[rng.choice(names)]
            _step(lead, digest, taken, lead.use_model, model, t)
        elif roll < 0.96:
            _step(lead, digest, taken, lead.erase_personal_data, t, manager)
        else:  # continue-as-new: the state through JSON, into a new Lead
            state = LeadState.model_validate_json(lead.state.model_dump_json())
            lead = _with_twin(Lead(state, model, seen_ids_max=seen_max, decision_delay=delay),
                              lambda **kw: Lead(state.model_copy(deep=True), model, seen_ids_max=seen_max,
                                                decision_delay=delay, **kw))
            _step(lead, digest, taken, lead.use_model, model, t)
    _step(lead, digest, taken, lead.tick, t + timedelta(days=rng.choice([0, 3, 60, 200])))
    _finish(lead, digest, taken)
    return digest.hex()


def digests(leads: int, randoms: int) -> dict[str, list[str]]:
    out = population(leads)
    out["random scenarios"] = [scenario(seed) for seed in range(randoms)]
    return out


def _answer(run: subprocess.Popen) -> dict[str, list[str]]:
    out, err = run.communicate()
    if run.returncode:
        sys.exit(f"failed in {run.args}:\n{err}")
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leads", type=int, default=300)
    parser.add_argument("--random", type=int, default=400)
    parser.add_argument("--against", help="a git revision to compare with")
    parser.add_argument("--emit", action="store_true", help="print the digests as JSON (used by --against)")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    if args.emit:  # in the tree to digest: its packages, not this file's folder (bench/ has a backtest.py)
        here = Path(__file__).resolve().parent
        sys.path[:] = [str(Path.cwd())] + [p for p in sys.path if Path(p or ".").resolve() != here]
        print(json.dumps(digests(args.leads, args.random)))
        return
    sys.path.insert(0, str(root))
    if not args.against:
        for name, items in digests(args.leads, args.random).items():
            print(f"{name:32} {len(items):5} {_digest_of(items)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        other.mkdir()
        archive = subprocess.run(["git", "-C", str(root), "archive", args.against], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive.stdout, check=True)
        # Both at once (a process each), with one hash seed: demo.generate sums over a set.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        command = [sys.executable, str(Path(__file__).resolve()), "--emit", "--leads", str(args.leads),
                   "--random", str(args.random)]
        runs = [subprocess.Popen(command, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for where in (other, root)]
        theirs, ours = [_answer(run) for run in runs]
    bad = 0
    for name in sorted(theirs.keys() | ours.keys()):
        a, b = theirs.get(name, []), ours.get(name, [])
        diff = [i for i in range(max(len(a), len(b))) if a[i:i + 1] != b[i:i + 1]]
        print(f"{name:32} {len(b):5} items: {'same' if not diff else f'{len(diff)} DIFFER, first at {diff[0]}'}")
        bad += bool(diff)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
