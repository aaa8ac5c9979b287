"""The event log made for replay (issue: try a scoring model before it goes live): every
event and profile update taken is kept once, per lead in the order it happened, survives
erasure without the person's values, and leaves as JSON lines that `leadflow import`
takes back unchanged."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

import client
import starter
from activities.store import AuditStore
from funnel.models import ActivityEvent, Actor, ProfileUpdate, Role
from funnel.personal_data import ERASED, ErasureReport
from tests.test_cli import Recorder, make_view, run
from tests.test_store import postgres_server, store as log_store  # noqa: F401 - SQLite and PostgreSQL stores

T0 = datetime(2026, 10, 1, 9, 0, tzinfo=timezone.utc)
ANNA = Actor(name="anna", role=Role.PRESALES)


def event(lead: str, n: int, kind: str, minutes: float, **extra) -> ActivityEvent:
    return ActivityEvent(event_id=f"{lead}-e{n}", lead_id=lead, type=kind, occurred_at=T0 + timedelta(minutes=minutes),
                         **extra)


def facts(lead: str, n: int, minutes: float | None, **values) -> ProfileUpdate:
    return ProfileUpdate(update_id=f"{lead}-p{n}", lead_id=lead, facts=values, actor=ANNA,
                         observed_at=None if minutes is None else T0 + timedelta(minutes=minutes))


def logged(store: AuditStore) -> list[tuple]:
    return [(r.lead_id, r.event_id, r.type) if "event_id" in r._fields else (r.lead_id, r.update_id, r.facts)
            for r in store.replay_log()]


def test_replay_log_is_per_lead_in_the_order_things_happened(log_store):
    log_store.log_events([event("L-2", 1, "email_open", 5), event("L-1", 2, "demo_request", 30, channel="webinar"),
                          event("L-1", 1, "website_visit", 10, campaign="spring")], T0 + timedelta(hours=1))
    log_store.log_facts([facts("L-1", 1, 20, title="CEO"), facts("L-1", 2, None, company_size=250)],
                        received_at=T0 + timedelta(minutes=40))
    assert logged(log_store) == [
        ("L-1", "L-1-e1", "website_visit"), ("L-1", "L-1-p1", {"title": "CEO"}), ("L-1", "L-1-e2", "demo_request"),
        ("L-1", "L-1-p2", {"company_size": 250}),  # no observed time: its receipt (40 min) stands in
        ("L-2", "L-2-e1", "email_open"),
    ]
    assert [r.update_id if "update_id" in r._fields else r.event_id
            for r in log_store.replay_log(lead_id="L-1", since=T0 + timedelta(minutes=15),
                                          until=T0 + timedelta(minutes=35))] == ["L-1-p1", "L-1-e2"]


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deliveries=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2)), min_size=1, max_size=25))
def test_every_update_is_logged_exactly_once_whatever_is_redelivered(tmp_path_factory, deliveries):
    """Redeliveries (the same id, any number of times, in any batches) log each update once,
    with the first version taken."""
    store = AuditStore(f"sqlite:///{tmp_path_factory.mktemp('once') / 'log.db'}")
    try:
        first: dict[str, dict] = {}
        for i, (n, batch_copies) in enumerate(deliveries):
            update = facts("L-1", n, n, score_hint=i)
            first.setdefault(update.update_id, dict(update.facts))
            new = store.log_facts([update] * (batch_copies + 1), T0 + timedelta(seconds=i))
            assert new == (1 if i == _first_index(deliveries, n) else 0)
        rows = [r for r in store.replay_log() if "update_id" in r._fields]
        assert sorted(r.update_id for r in rows) == sorted(first)
        assert {r.update_id: r.facts for r in rows} == first
    finally:
        store.dispose()


def _first_index(deliveries, n: int) -> int:
    return next(i for i, (m, _) in enumerate(deliveries) if m == n)


def test_erasure_keeps_the_facts_names_not_the_persons_values(log_store):
    log_store.log_facts([facts("L-1", 1, 0, email="ceo@example.com", company_size=250)], T0)
    log_store.log_events([event("L-1", 1, "website_visit", 1, attributes={"url": "https://x.example/ceo"})], T0)
    log_store.erase_personal_data(ErasureReport(erasure_id="er-1", lead_id="L-1", erased_by="mia", erased_at=T0))
    (fact_row,) = [r for r in log_store.replay_log() if "update_id" in r._fields]
    (event_row,) = [r for r in log_store.replay_log() if "event_id" in r._fields]
    assert fact_row.facts == {"email": ERASED, "company_size": ERASED}
    assert (event_row.type, event_row.attributes) == ("website_visit", {})


@pytest.fixture
def fake(monkeypatch) -> Recorder:
    recorder = Recorder(make_view())
    for name in ("send_events", "send_profile"):
        monkeypatch.setattr(client, name, getattr(recorder, name))

    async def connect(_settings=None):
        return object()

    monkeypatch.setattr(starter, "connect", connect)
    return recorder


def test_export_then_import_gives_the_same_log(capsys, fake, tmp_path, monkeypatch):
    source = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    events = [event("L-1", 1, "website_visit", 0, channel="web", campaign="spring", source="mautic"),
              event("L-1", 2, "webinar_attended", 60, attributes={"webinar_id": "w-7"}, source="mautic"),
              event("L-2", 1, "demo_request", 5, channel="partner", source="cli")]  # the edge names the sender
    updates = [facts("L-1", 1, 30, title="CEO", company_size=250), facts("L-2", 1, None, target_account=True)]
    source.log_events(events, T0 + timedelta(hours=2))
    source.log_facts(updates, T0 + timedelta(hours=3))
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", str(source.engine.url))
    out = tmp_path / "log.jsonl"
    code, _, err = run(capsys, "events", "export", "--out", str(out))
    assert code == 0 and "5 line(s) exported" in err, err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line.get("event_id") or line["update_id"] for line in lines] == [
        "L-1-e1", "L-1-p1", "L-1-e2", "L-2-e1", "L-2-p1"]
    assert lines[4]["observed_at"] == (T0 + timedelta(hours=3)).isoformat()  # its receipt, made explicit

    target = AuditStore(f"sqlite:///{tmp_path / 'b.db'}")
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", str(target.engine.url))
    code, stdout, err = run(capsys, "import", str(out))
    assert code == 0, err
    assert "sent 3 event(s) and 2 profile update(s) for 2 lead(s)" in stdout
    assert sorted((e for batch in fake.sent_events for e in batch), key=lambda e: e.event_id) == sorted(
        events, key=lambda e: e.event_id)
    assert sorted(fake.profiles, key=lambda u: u.update_id) == [
        updates[0], updates[1].model_copy(update={"observed_at": T0 + timedelta(hours=3)})]
    assert logged(target) == logged(source)
    run(capsys, "events", "export", "--out", str(tmp_path / "again.jsonl"))
    strip = lambda text: [{k: v for k, v in json.loads(x).items() if k != "received_at"}  # noqa: E731
                          for x in text.splitlines()]
    assert strip((tmp_path / "again.jsonl").read_text()) == strip(out.read_text())
    source.dispose()
    target.dispose()
