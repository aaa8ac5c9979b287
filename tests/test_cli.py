"""The command line without a server: parsing, validation, exit codes, output shapes.

Temporal is never reached here: `starter.connect` and the `client` functions the
CLI calls are replaced by recorders, so a test can also assert that nothing was
sent when the input is bad.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from freezegun import freeze_time

import client
import starter
from funnel.lead import Deadline, LeadView
from funnel.models import (
    Accept,
    AuditEntry,
    AuditKind,
    Close,
    LogContact,
    Qualify,
    Reject,
    Reopen,
    Role,
    Stage,
    StageVisit,
    Trigger,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)


class Recorder:
    """Stands in for the client module's functions; remembers every call."""

    def __init__(self, view: LeadView):
        self.view = view
        self.sent_events: list[list] = []
        self.profiles: list = []
        self.commands: list[tuple[str, object]] = []
        self.viewed: list[str] = []
        self.models: list = []  # what each send passed for a new lead to start on

    async def send_events(self, _client, _settings, events, model=None):
        self.sent_events.append(list(events))
        self.models.append(model)

    async def send_profile(self, _client, _settings, update, model=None):
        self.profiles.append(update)
        self.models.append(model)

    async def run_command(self, _client, lead_id, command, key=None):
        self.keys = getattr(self, "keys", []) + [key]
        self.commands.append((lead_id, command))
        return self.view

    async def get_view(self, _client, lead_id):
        self.viewed.append(lead_id)
        return self.view


def make_view(lead_id: str = "L-1") -> LeadView:
    return LeadView(
        lead_id=lead_id,
        stage=Stage.MQL,
        stage_since=NOW,
        owner="presales-1",
        channel="webinar",
        score={
            "total": 171.0,
            "fit": 20.0,
            "engagement": 151.0,
            "breakdown": {"fit:target_account": 20.0, "webinar_attended": 50.0, "demo_request": 100.0,
                          "website_visit": 1.0},
        },
        profile={"target_account": True, "company_size": 250},
        deadlines=[Deadline(name="presales_decision", due_at=NOW + timedelta(days=2), cause="stage mql")],
        next_nurture_step=None,
        next_decay_at=NOW + timedelta(days=30),
        cool_off_until=None,
        qualified_by=None,
        model_ref="default@1",
        events_applied=3,
        duplicates_ignored=0,
        history=[StageVisit(stage=Stage.IQL, entered_at=NOW - timedelta(hours=1)),
                 StageVisit(stage=Stage.MQL, entered_at=NOW, trigger=Trigger.FAST_TRACK)],
    )


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "LEADFLOW_MODEL", "LEADFLOW_DATABASE_URL",
                "LEADFLOW_TASK_QUEUE", "LEADFLOW_MAX_HISTORY_EVENTS", "LEADFLOW_PRESALES_TEAM"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake(monkeypatch) -> Recorder:
    recorder = Recorder(make_view())
    for name in ("send_events", "send_profile", "run_command", "get_view"):
        monkeypatch.setattr(client, name, getattr(recorder, name))

    async def connect(_settings=None):
        return object()

    monkeypatch.setattr(starter, "connect", connect)
    return recorder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = starter.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- event


def test_event_unknown_type_lists_known_types(capsys, fake):
    code, _, err = run(capsys, "event", "L-1", "webinar_attendee")
    assert code == 2
    assert "unknown event type 'webinar_attendee'" in err
    assert "webinar_attended" in err and "demo_request" in err
    assert len(err.strip().splitlines()) == 1
    assert fake.sent_events == []


def test_event_naive_timestamp_refused(capsys, fake):
    code, _, err = run(capsys, "event", "L-1", "website_visit", "--at", "2026-11-22T09:00:00")
    assert code == 2
    assert "no timezone" in err
    assert fake.sent_events == []


def test_event_garbage_timestamp_refused(capsys, fake):
    code, _, err = run(capsys, "event", "L-1", "website_visit", "--at", "yesterday")
    assert code == 2
    assert "ISO 8601" in err
    assert fake.sent_events == []


@freeze_time(NOW, real_asyncio=True)
def test_event_future_timestamp_refused_beyond_five_minutes(capsys, fake):
    code, _, err = run(capsys, "event", "L-1", "website_visit", "--at", "2026-11-22T10:05:01Z")
    assert code == 2
    assert "in the future" in err
    assert fake.sent_events == []
    # Within the tolerance (clock skew) is fine, and offsets are converted to UTC.
    code, _, _ = run(capsys, "event", "L-1", "website_visit", "--at", "2026-11-22T11:04:00+01:00")
    assert code == 0
    [[event]] = fake.sent_events
    assert event.occurred_at == datetime(2026, 11, 22, 10, 4, tzinfo=timezone.utc)


@freeze_time(NOW, real_asyncio=True)
def test_event_defaults_now_and_fresh_id(capsys, fake):
    code, out, _ = run(capsys, "event", "L-1", "webinar_attended", "--channel", "webinar",
                       "--attr", "webinar_id=w42", "--attr", "minutes=55")
    assert code == 0
    code, _, _ = run(capsys, "event", "L-1", "webinar_attended")
    assert code == 0
    first, second = fake.sent_events[0][0], fake.sent_events[1][0]
    assert first.occurred_at == NOW
    assert first.lead_id == "L-1" and first.type == "webinar_attended" and first.channel == "webinar"
    assert first.attributes == {"webinar_id": "w42", "minutes": 55}
    assert first.event_id != second.event_id  # a fresh id each time
    assert first.event_id in out


def test_event_explicit_id_is_kept(capsys, fake):
    code, _, _ = run(capsys, "event", "L-1", "demo_request", "--id", "crm-123", "--at", "2026-01-01T00:00:00Z")
    assert code == 0
    assert fake.sent_events[0][0].event_id == "crm-123"


@pytest.mark.parametrize(
    "argv",
    [
        ["event", "jane@example.com", "website_visit"],
        ["profile", "jane@example.com", "target_account=true"],
        ["accept", "jane@example.com", "--by", "anna"],
        ["show", "jane@example.com"],
        ["history", "jane@example.com"],
        ["event", "has space", "website_visit"],
    ],
)
def test_lead_ids_like_email_refused_at_parse_time(capsys, fake, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "invalid lead id" in err and "e-mail" in err
    assert len(err.strip().splitlines()) == 1
    assert fake.sent_events == [] and fake.profiles == [] and fake.commands == [] and fake.viewed == []


def test_bad_channel_is_a_validation_error_naming_the_field(capsys, fake):
    code, _, err = run(capsys, "event", "L-1", "website_visit", "--channel", "Paid Search")
    assert code == 2
    assert "channel" in err
    assert fake.sent_events == []


# --------------------------------------------------------------------------- profile


def test_profile_values_are_parsed(capsys, fake):
    code, _, _ = run(capsys, "profile", "L-1", "target_account=true", "student=FALSE", "company_size=250",
                     "delta=-3", "revenue=2.5", "big=1e3", "industry=software", "country=DE", "code=007x",
                     "--id", "pu-1")
    assert code == 0
    [update] = fake.profiles
    assert update.update_id == "pu-1"
    facts = update.facts
    assert facts["target_account"] is True and facts["student"] is False
    assert facts["company_size"] == 250 and type(facts["company_size"]) is int
    assert facts["delta"] == -3
    assert facts["revenue"] == 2.5 and type(facts["revenue"]) is float
    assert facts["big"] == 1000.0
    assert facts["industry"] == "software" and facts["country"] == "DE" and facts["code"] == "007x"
    assert update.actor.role == Role.SYSTEM  # no --by: the system supplies the facts


def test_profile_default_id_and_actor(capsys, fake):
    code, _, _ = run(capsys, "profile", "L-1", "industry=finance", "--by", "mia")
    assert code == 0
    [update] = fake.profiles
    assert update.update_id  # a fresh id
    assert update.actor.name == "mia" and update.actor.role == Role.MARKETING


@pytest.mark.parametrize(
    "item, words",
    [
        ("target_account", "NAME=VALUE"),
        ("=true", "empty"),
        ("company_size=", "empty"),
        ("CompanySize=5", "lower_snake_case"),
        ("company-size=5", "lower_snake_case"),
    ],
)
def test_profile_bad_forms_refused(capsys, fake, item, words):
    code, _, err = run(capsys, "profile", "L-1", item)
    assert code == 2
    assert words in err
    assert fake.profiles == []


def test_profile_repeated_field_refused(capsys, fake):
    code, _, err = run(capsys, "profile", "L-1", "industry=software", "industry=finance")
    assert code == 2
    assert "twice" in err
    assert fake.profiles == []


def test_profile_needs_a_fact(capsys, fake):
    code, _, _ = run(capsys, "profile", "L-1")
    assert code == 2
    assert fake.profiles == []


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    "argv, kind, role",
    [
        (["accept", "L-1", "--by", "anna"], Accept, Role.PRESALES),
        (["reject", "L-1", "--by", "anna", "--reason", "no_budget"], Reject, Role.PRESALES),
        (["qualify", "L-1", "--by", "anna", "--budget", "--need", "--timing"], Qualify, Role.PRESALES),
        (["contact", "L-1", "--by", "ben"], LogContact, Role.SALES),
        (["close", "L-1", "won", "--by", "ben"], Close, Role.SALES),
        (["reopen", "L-1", "--by", "carla", "--reason", "budget_back"], Reopen, Role.MANAGER),
    ],
)
def test_natural_default_roles(capsys, fake, argv, kind, role):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    [(lead_id, command)] = fake.commands
    assert lead_id == "L-1"
    assert isinstance(command, kind)
    assert command.by.role == role
    assert command.by.name == argv[argv.index("--by") + 1]
    assert "mql" in out and "presales-1" in out  # the new state is shown


def test_role_can_be_overridden(capsys, fake):
    code, _, _ = run(capsys, "accept", "L-1", "--by", "max", "--role", "manager")
    assert code == 0
    assert fake.commands[0][1].by.role == Role.MANAGER


def test_role_system_is_not_for_people(capsys, fake):
    code, _, err = run(capsys, "accept", "L-1", "--by", "max", "--role", "system")
    assert code == 2
    assert "--role" in err
    assert fake.commands == []


def test_command_details(capsys, fake):
    assert run(capsys, "reject", "L-1", "--by", "anna", "--reason", "not_now", "--recycle", "--note", "q3")[0] == 0
    assert run(capsys, "qualify", "L-1", "--by", "anna", "--budget", "--authority", "--need")[0] == 0
    assert run(capsys, "qualify", "L-1", "--by", "anna", "--meddic", "--metrics", "--economic-buyer",
               "--decision-criteria", "--decision-process", "--identify-pain")[0] == 0
    assert run(capsys, "contact", "L-1", "--by", "ben", "--channel", "meeting")[0] == 0
    assert run(capsys, "close", "L-1", "lost", "--by", "ben", "--reason", "price")[0] == 0
    reject, bant, meddic, contact, close = (c for _, c in fake.commands)
    assert reject.recycle is True and reject.reason == "not_now" and reject.note == "q3"
    assert bant.framework == "bant" and bant.bant.model_dump() == {
        "budget": True, "authority": True, "need": True, "timing": False}
    assert meddic.framework == "meddic" and meddic.meddic.economic_buyer and not meddic.meddic.champion
    assert meddic.bant is None
    assert contact.channel == "meeting"
    assert close.outcome == "lost" and close.reason == "price"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["accept", "L-1"], "--by"),
        (["accept", "L-1", "--by", "   "], "--by"),
        (["reject", "L-1", "--by", "anna"], "--reason"),
        (["reject", "L-1", "--by", "anna", "--reason", "No Budget"], "reason"),
        (["close", "L-1", "maybe", "--by", "ben"], "won"),
        (["contact", "L-1", "--by", "ben", "--channel", "fax"], "--channel"),
        (["qualify", "L-1", "--by", "anna", "--champion"], "--meddic"),
        (["qualify", "L-1", "--by", "anna", "--meddic", "--budget"], "BANT"),
        (["reopen", "L-1", "--by", "carla"], "--reason"),
    ],
)
def test_command_input_errors(capsys, fake, argv, words):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert words in err
    assert len(err.strip().splitlines()) == 1
    assert fake.commands == []


# --------------------------------------------------------------------------- errors from the lead


@pytest.mark.parametrize(
    "error, code, text",
    [
        (client.LeadNotFound("no lead L-9"), 3, "no lead L-9"),
        (client.CommandRefused("cannot accept lead L-9: it is iql, not mql"), 4,
         "refused: cannot accept lead L-9: it is iql, not mql"),
        (client.LeadClosed("lead L-9 is closed (won): it takes no more commands"), 5, "closed"),
    ],
)
def test_lead_errors_map_to_exit_codes(capsys, fake, monkeypatch, error, code, text):
    async def failing(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(client, "run_command", failing)
    got, out, err = run(capsys, "accept", "L-9", "--by", "anna")
    assert got == code
    assert text in err
    assert "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1


def test_command_without_answer_times_out(capsys, fake, monkeypatch):
    import asyncio

    async def hangs(*_args, **_kwargs):
        await asyncio.sleep(3600)

    monkeypatch.setattr(client, "run_command", hangs)
    monkeypatch.setattr(starter, "ANSWER_TIMEOUT", 0.05)
    code, _, err = run(capsys, "accept", "L-1", "--by", "anna", "--key", "acc-1")
    assert code == 1
    assert "did not answer" in err and "may still be applied" in err and "--key acc-1" in err


def test_commands_carry_an_idempotency_key(capsys, fake):
    assert run(capsys, "accept", "L-1", "--by", "anna", "--key", "acc-7")[0] == 0
    assert run(capsys, "accept", "L-1", "--by", "anna")[0] == 0
    assert fake.keys[0] == "acc-7" and fake.keys[1].startswith("cmd-")
    assert run(capsys, "accept", "L-1", "--by", "anna", "--key", "no spaces")[0] == 2


def test_show_of_unknown_lead_exits_3(capsys, fake, monkeypatch):
    async def missing(_client, lead_id):
        raise client.LeadNotFound(f"no lead {lead_id}")

    monkeypatch.setattr(client, "get_view", missing)
    code, _, err = run(capsys, "show", "L-9")
    assert code == 3
    assert err.strip() == "leadflow: no lead L-9"


def test_event_for_won_lead_exits_5(capsys, fake, monkeypatch):
    async def closed(*_args):
        raise client.LeadClosed("lead(s) L-1 closed (won): events not applied")

    monkeypatch.setattr(client, "send_events", closed)
    code, _, err = run(capsys, "event", "L-1", "website_visit")
    assert code == 5
    assert "closed" in err


def test_unreachable_temporal_exits_1(capsys, monkeypatch):
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")

    async def refused(_settings=None):
        raise RuntimeError("Failed client connect: Server connection error: connection refused")

    monkeypatch.setattr(starter, "connect", refused)
    code, _, err = run(capsys, "show", "L-1")
    assert code == 1
    assert err.strip() == "leadflow: cannot reach Temporal at 127.0.0.1:1: is `scripts/run` running?"


# --------------------------------------------------------------------------- show


def test_show_json_shape(capsys, fake):
    code, out, _ = run(capsys, "show", "L-1", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["lead_id"] == "L-1"
    assert data["stage"] == "mql"
    assert data["owner"] == "presales-1"
    assert data["score"]["total"] == 171.0
    assert data["score"]["fit"] == 20.0 and data["score"]["engagement"] == 151.0
    assert data["score"]["breakdown"]["demo_request"] == 100.0
    assert data["deadlines"][0]["name"] == "presales_decision"
    assert data == fake.view.model_dump(mode="json")
    assert fake.viewed == ["L-1"]


def test_show_table(capsys, fake):
    code, out, _ = run(capsys, "show", "L-1")
    assert code == 0
    for text in ("lead L-1", "mql", "presales-1", "webinar", "171", "fit 20", "engagement 151",
                 "presales_decision", "default@1", "demo_request", "+100", "fit:target_account"):
        assert text in out, text


# --------------------------------------------------------------------------- import


def write(tmp_path, name: str, lines: list[str]):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jline(**fields) -> str:
    return json.dumps(fields)


@freeze_time(NOW, real_asyncio=True)
def test_import_with_bad_lines_sends_nothing(capsys, fake, tmp_path):
    path = write(tmp_path, "events.jsonl", [
        jline(event_id="e1", lead_id="L-1", type="website_visit", occurred_at="2026-11-20T10:00:00Z"),
        jline(event_id="e2", lead_id="L-1", type="website_visit", occurred_at="2026-11-20T10:00:00"),
        jline(event_id="e3", lead_id="jane@example.com", type="website_visit", occurred_at="2026-11-20T10:00:00Z"),
        jline(event_id="e4", lead_id="L-2", type="teleport", occurred_at="2026-11-20T10:00:00Z"),
        "{not json",
        "",
        jline(event_id="e7", lead_id="L-2", type="website_visit", occurred_at="2026-11-20T10:00:00Z", colour="red"),
        jline(event_id="e8", lead_id="L-2", type="website_visit", occurred_at="2026-11-23T10:00:00Z"),
        jline(event_id="e9", lead_id="L-2", type="website_visit"),
    ])
    code, out, err = run(capsys, "import", str(path))
    assert code == 2
    assert fake.sent_events == []
    assert "line 1:" not in err
    assert "line 2: occurred_at: timestamp must carry a timezone" in err
    assert "line 3: lead_id: invalid lead id 'jane@example.com'" in err
    assert "line 4: type: unknown event type 'teleport'" in err
    assert "line 5: not valid JSON" in err
    assert "line 6" not in err  # blank lines are skipped
    assert "line 7: colour: Extra inputs are not permitted" in err
    assert "line 8: occurred_at:" in err and "future" in err
    assert "line 9: occurred_at: Field required" in err
    assert "7 invalid line(s)" in err and "nothing sent" in err
    assert "Traceback" not in err


def test_import_csv_with_bad_lines_sends_nothing(capsys, fake, tmp_path):
    path = write(tmp_path, "events.csv", [
        "event_id,lead_id,type,occurred_at,channel",
        "e1,L-1,website_visit,2026-11-20T10:00:00Z,organic",
        "e2,L-1,website_visit,2026-11-20T10:00:00Z,",
        "e3,L-1,website_visit,20.11.2026,organic",
        "e4,L 1,website_visit,2026-11-20T10:00:00Z,organic",
        "e5,L-1,website_visit,2026-11-20T10:00:00Z,organic,extra",
    ])
    code, _, err = run(capsys, "import", str(path))
    assert code == 2
    assert fake.sent_events == []
    assert "line 2" not in err and "line 3" not in err
    assert "line 4: occurred_at:" in err
    assert "line 5: lead_id:" in err
    assert "line 6: more fields" in err


def test_import_csv_header_checked(capsys, fake, tmp_path):
    path = write(tmp_path, "events.csv", ["id,lead,type,at", "e1,L-1,website_visit,2026-11-20T10:00:00Z"])
    code, _, err = run(capsys, "import", str(path))
    assert code == 2
    assert "header" in err and "event_id" in err
    assert fake.sent_events == []


def test_import_unknown_file_type(capsys, fake, tmp_path):
    path = write(tmp_path, "events.json", ["[]"])
    code, _, err = run(capsys, "import", str(path))
    assert code == 2
    assert ".jsonl" in err
    code, _, err = run(capsys, "import", str(tmp_path / "missing.csv"))
    assert code == 2
    assert "cannot read" in err


def test_import_sends_per_lead_in_time_order(capsys, fake, tmp_path):
    lines = [
        jline(event_id="b2", lead_id="L-2", type="email_open", occurred_at="2026-11-20T12:00:00Z"),
        jline(event_id="a2", lead_id="L-1", type="webinar_attended", occurred_at="2026-11-20T11:00:00+00:00",
              channel="webinar", attributes={"webinar_id": "w1"}),
        jline(event_id="a1", lead_id="L-1", type="website_visit", occurred_at="2026-11-20T11:00:00+02:00"),
        jline(event_id="b1", lead_id="L-2", type="email_open", occurred_at="2026-11-19T12:00:00Z"),
        jline(event_id="a3", lead_id="L-1", type="demo_request", occurred_at="2026-11-21T09:00:00Z"),
    ]
    path = write(tmp_path, "events.ndjson", lines)
    code, out, err = run(capsys, "import", str(path))
    assert code == 0, err
    assert "sent 5 event(s) for 2 lead(s)" in out
    by_lead = {batch[0].lead_id: [e.event_id for e in batch] for batch in fake.sent_events}
    assert all(len({e.lead_id for e in batch}) == 1 for batch in fake.sent_events)
    assert by_lead == {"L-1": ["a1", "a2", "a3"], "L-2": ["b1", "b2"]}
    # Re-running sends the same ids again: the leads apply each id once.
    assert run(capsys, "import", str(path))[0] == 0
    again = {batch[0].lead_id: [e.event_id for e in batch] for batch in fake.sent_events[2:]}
    assert again == by_lead


def test_new_leads_start_on_the_stores_active_model(capsys, fake, tmp_path, monkeypatch):
    """event, profile and import pass the store's active version for a lead they create to
    start on (it then need not read it); without a store, nothing (the lead reads it)."""
    from activities.store import AuditStore
    from config import DEFAULT_MODEL

    v2 = DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "2"', 1)
    path = write(tmp_path, "events.jsonl", [
        jline(event_id="a1", lead_id="L-1", type="website_visit", occurred_at="2026-11-20T10:00:00Z"),
        jline(event_id="b1", lead_id="L-2", type="website_visit", occurred_at="2026-11-20T10:00:00Z"),
    ])
    assert run(capsys, "import", str(path))[0] == 0
    assert fake.models == [None, None]
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore(url)
    store.record_model("default@2", v2, applied_by="mia")
    store.dispose()
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)
    fake.models.clear()
    assert run(capsys, "import", str(path))[0] == 0
    assert run(capsys, "event", "L-3", "website_visit")[0] == 0
    assert run(capsys, "profile", "L-4", "target_account=true")[0] == 0
    assert [m.ref for m in fake.models] == ["default@2"] * 4


def test_import_csv_sends(capsys, fake, tmp_path):
    path = write(tmp_path, "events.csv", [
        "event_id,lead_id,type,occurred_at,channel",
        "e1,L-1,website_visit,2026-11-20T10:00:00Z,organic",
        "e2,L-1,pricing_page_visit,2026-11-20T10:05:00Z,",
    ])
    code, out, _ = run(capsys, "import", str(path))
    assert code == 0
    [[e1, e2]] = fake.sent_events
    assert e1.channel == "organic" and e2.channel is None
    assert "sent 2 event(s) for 1 lead(s)" in out


def test_import_reports_closed_leads(capsys, fake, monkeypatch, tmp_path):
    async def send(_client, _settings, events, model=None):
        if events[0].lead_id == "L-won":
            raise client.LeadClosed("lead(s) L-won closed (won): events not applied")

    monkeypatch.setattr(client, "send_events", send)
    path = write(tmp_path, "events.jsonl", [
        jline(event_id="x1", lead_id="L-won", type="website_visit", occurred_at="2026-11-20T10:00:00Z"),
        jline(event_id="x2", lead_id="L-open", type="website_visit", occurred_at="2026-11-20T10:00:00Z"),
    ])
    code, out, err = run(capsys, "import", str(path))
    assert code == 5
    assert "sent 1 event(s) for 1 lead(s)" in out
    assert "L-won" in err


# --------------------------------------------------------------------------- history and report


def _entries(lead_id: str) -> list[AuditEntry]:
    base = dict(lead_id=lead_id, role=Role.SYSTEM, actor="leadflow", channel="webinar", model_ref="default@1")
    return [
        AuditEntry(seq=1, at=NOW, kind=AuditKind.LEAD_CREATED, detail="lead created as iql",
                   to_stage=Stage.IQL, score_total=0, **base),
        AuditEntry(seq=2, at=NOW + timedelta(minutes=1), kind=AuditKind.SCORE_CHANGED,
                   detail="+100 demo_request (event e1)", score_total=100, **base),
        AuditEntry(seq=3, at=NOW + timedelta(minutes=1), kind=AuditKind.STAGE_CHANGED,
                   detail="iql -> mql: fast-track activity", from_stage=Stage.IQL, to_stage=Stage.MQL,
                   trigger=Trigger.FAST_TRACK, score_total=100, **base),
        AuditEntry(seq=4, at=NOW + timedelta(days=1), kind=AuditKind.STAGE_CHANGED,
                   detail="mql -> sal: presales accepted", from_stage=Stage.MQL, to_stage=Stage.SAL,
                   trigger=Trigger.ACCEPT, score_total=100,
                   **{**base, "actor": "anna", "role": Role.PRESALES}),
    ]


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    """A store with L-1's history, and (unless a test says otherwise) no Temporal: the
    CLI then shows the store alone, with a warning."""
    from activities.store import AuditStore

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    store = AuditStore(url)
    store.write_audit(_entries("L-1"))
    store.dispose()
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", url)

    async def refused(_settings=None):
        raise RuntimeError("Failed client connect: Server connection error: connection refused")

    monkeypatch.setattr(starter, "connect", refused)
    return url


def test_history_without_temporal_shows_the_store_and_says_so(capsys, store_url):
    code, out, err = run(capsys, "history", "L-1", "--json")
    assert code == 0
    assert [e["seq"] for e in json.loads(out)] == [1, 2, 3, 4]
    assert "showing the audit store only" in err and "30 s" in err


def test_history_adds_what_the_lead_has_not_written_yet(capsys, store_url, monkeypatch):
    later = AuditEntry(seq=5, at=NOW + timedelta(days=1, minutes=5), kind=AuditKind.SCORE_CHANGED,
                       detail="+1 website_visit (event e9)", lead_id="L-1", role=Role.SYSTEM, actor="leadflow")
    asked = []

    async def connect(_settings=None):
        return object()

    async def audit_tail(_client, lead_id):
        asked.append(lead_id)
        return [_entries("L-1")[3], later]  # the tail may overlap the store (a write just landed)

    monkeypatch.setattr(starter, "connect", connect)
    monkeypatch.setattr(client, "audit_tail", audit_tail)
    code, out, err = run(capsys, "history", "L-1", "--json")
    assert code == 0 and not err
    assert asked == ["L-1"]
    assert [e["seq"] for e in json.loads(out)] == [1, 2, 3, 4, 5]
    code, out, _ = run(capsys, "history", "L-1", "--json", "--offset", "3", "--limit", "5")
    assert [e["seq"] for e in json.loads(out)] == [4, 5]


def test_history_json_and_paging(capsys, store_url):
    code, out, _ = run(capsys, "history", "L-1", "--json")
    assert code == 0
    entries = json.loads(out)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert entries[3]["kind"] == "stage_changed" and entries[3]["actor"] == "anna"
    assert entries[3]["role"] == "presales" and entries[3]["to_stage"] == "sal"
    code, out, _ = run(capsys, "history", "L-1", "--json", "--offset", "1", "--limit", "2")
    assert [e["seq"] for e in json.loads(out)] == [2, 3]


def test_history_table(capsys, store_url, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns when not on a terminal
    code, out, _ = run(capsys, "history", "L-1")
    assert code == 0
    for text in ("stage_changed", "anna/presales", "presales accepted", "entries 1-4 of 4"):
        assert text in out, text


def test_history_of_unknown_lead(capsys, store_url):
    code, _, err = run(capsys, "history", "L-9")
    assert code == 3
    assert "no lead L-9" in err


def test_history_bad_paging(capsys, store_url):
    assert run(capsys, "history", "L-1", "--limit", "-1")[0] == 2
    assert run(capsys, "history", "L-1", "--offset", "x")[0] == 2


def test_history_without_store_file(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LEADFLOW_DATABASE_URL", f"sqlite:///{tmp_path / 'nope' / 'audit.db'}")
    code, _, err = run(capsys, "history", "L-1")
    assert code == 1
    assert "no audit store" in err
    assert not (tmp_path / "nope").exists()  # looking does not create an empty store


def test_report_json(capsys, store_url):
    code, out, _ = run(capsys, "report", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["overall"]["leads"] == 1
    [channel] = report["by_channel"]
    assert channel["channel"] == "webinar"
    stages = {s["stage"]: s for s in channel["stages"]}
    assert stages["mql"]["reached"] == 1 and stages["mql"]["converted"] == 1
    code, out, _ = run(capsys, "report")
    assert code == 0
    assert "channel webinar" in out and "mql" in out
    code, out, _ = run(capsys, "report", "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2 * len(channel["stages"])  # all channels, then webinar
    by_key = {(r["channel"], r["stage"]): r for r in rows}
    for stage, figures in stages.items():
        row = by_key[("webinar", stage)]
        assert row["leads"] == "1"
        for name in ("reached", "converted", "conversion_rate", "median_days", "in_stage_now"):
            assert row[name] == ("" if figures[name] is None else str(figures[name])), (stage, name)
    assert report["opportunities"]["windows"]["lead_to_opportunity_days"] == 84
    assert report["presales"]["overall"]["handed_over"] == 1
    assert set(report["benchmarks"]) == {"lead_to_opportunity", "opportunity_to_won", "presales_rejection"}
    code, out, _ = run(capsys, "report", "--json", "--opportunity-days", "30", "--cohort", "week")
    assert json.loads(out)["opportunities"]["windows"] == {"lead_to_opportunity_days": 30,
                                                          "opportunity_to_won_days": 18, "cohort": "week"}
    code, out, _ = run(capsys, "report", "--csv", "presales")
    assert code == 0
    [overall] = [r for r in csv.DictReader(io.StringIO(out)) if r["by"] == "all"]
    assert overall["handed_over"] == "1"
    code, _, err = run(capsys, "report", "--won-days", "0")
    assert code == 2 and "a window is 1 to 3650 days" in err
    code, out, _ = run(capsys, "report")
    assert "presales decisions" in out and "SLA compliance" in out


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "import" in out and "history" in out


def test_no_command_is_an_error(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert "required" in err


def test_an_event_id_the_log_knows_is_not_sent_again(capsys, store_url, fake):
    """The event log answers redeliveries at the edge: same content, nothing sent; other
    content, refused (a new event needs a new id)."""
    at = "2026-11-22T09:00:00Z"
    with freeze_time(NOW):
        assert run(capsys, "event", "L-9", "webinar_attended", "--id", "w-1", "--at", at)[0] == 0
        code, out, _ = run(capsys, "event", "L-9", "webinar_attended", "--id", "w-1", "--at", at)
        assert code == 0 and "already taken: changes nothing (nothing sent)" in out
        code, _, err = run(capsys, "event", "L-9", "demo_request", "--id", "w-1", "--at", at)
        assert code == 2 and "was taken with other content" in err
    assert [e[0].event_id for e in fake.sent_events] == ["w-1"]  # sent once


def test_import_sends_only_what_the_log_does_not_know(capsys, store_url, fake, tmp_path):
    path = tmp_path / "events.jsonl"
    lines = [{"event_id": f"i-{n}", "lead_id": "L-9", "type": "website_visit", "occurred_at": "2026-11-22T09:00:00Z"}
             for n in range(3)]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with freeze_time(NOW):
        assert run(capsys, "import", str(path))[0] == 0
        code, out, _ = run(capsys, "import", str(path))  # re-run: idempotent, nothing sent
        assert code == 0 and "3 event(s) already taken: not sent again" in out
        path.write_text(json.dumps({**lines[0], "type": "email_open"}))
        code, _, err = run(capsys, "import", str(path))
        assert code == 2 and "were taken with other content: nothing sent" in err
    assert sum(len(batch) for batch in fake.sent_events) == 3
