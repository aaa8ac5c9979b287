"""The lead activities, run in Temporal's ActivityEnvironment against a SQLite
store and a real HTTP webhook on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook as StandardWebhook
from standardwebhooks.webhooks import WebhookVerificationError
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.lead_activities import LeadActivities, all_activities
from activities.store import AuditStore
from config import DEFAULT_MODEL, Settings
from funnel.models import Assigned, AuditBatch, AuditEntry, AuditKind, Outbound, OutboundKind, Role
from funnel.scoring_model import ScoringModel, load_model

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
TEAM = ["ana", "ben", "cy"]


class Webhook(ThreadingHTTPServer):
    """Records every POST; answers with `status` (change it to simulate an outage)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.status = 200
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hooks/leadflow"


class _Handler(BaseHTTPRequestHandler):
    server: Webhook

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.requests.append(
                {"path": self.path, "headers": dict(self.headers), "body": json.loads(body), "raw": body}
            )
            status = self.server.status
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def webhook():
    server = Webhook()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def store(tmp_path):
    audit_store = AuditStore(f"sqlite:///{tmp_path}/leadflow.db")
    yield audit_store
    audit_store.dispose()


def make_activities(store: AuditStore, **settings) -> LeadActivities:
    settings.setdefault("presales_team", TEAM)
    return LeadActivities(Settings(database_url=store.url, **settings), store=store)


@pytest.fixture
def acts(store):
    lead_activities = make_activities(store)
    yield lead_activities
    lead_activities.close()


@pytest.fixture
def hooked(store, webhook):
    lead_activities = make_activities(store, webhook_url=webhook.url)
    yield lead_activities
    lead_activities.close()


@pytest.fixture
def env():
    return ActivityEnvironment()


def message(lead_id: str = "lead-1", kind: OutboundKind = OutboundKind.HANDOVER, seq: int = 4, **payload) -> Outbound:
    return Outbound(message_id=f"{lead_id}/{kind.value}/{seq}", lead_id=lead_id, kind=kind, at=T0, payload=payload)


def audit(lead_id: str, seq: int) -> AuditEntry:
    return AuditEntry(
        lead_id=lead_id, seq=seq, at=T0, kind=AuditKind.SCORE_CHANGED, actor="leadflow", role=Role.SYSTEM, detail="+10"
    )


# --------------------------------------------------------------------------- registration


def test_all_activities_have_the_agreed_names_and_are_synchronous(acts):
    fns = all_activities(acts)
    names = [activity._Definition.must_from_callable(fn).name for fn in fns]
    assert names == ["load_scoring_model", "record_audit", "record_audit_and_assign", "applied_event_ids",
                     "assign_owner", "hand_over", "deliver"]
    assert not any(inspect.iscoroutinefunction(fn) for fn in fns)
    assert all(getattr(fn, "__self__", None) is acts for fn in fns)  # bound to this configuration


def test_store_is_created_from_settings_when_not_given(tmp_path, env):
    path = tmp_path / "data" / "leadflow.db"
    lead_activities = LeadActivities(Settings(database_url=f"sqlite:///{path}"))
    try:
        assert path.exists()
        assert env.run(lead_activities.record_audit, [audit("lead-1", 1)]) == 1
        assert lead_activities.store.count_history("lead-1") == 1
    finally:
        lead_activities.close()
        lead_activities.store.dispose()


# --------------------------------------------------------------------------- scoring model


def test_load_scoring_model(acts, env):
    model = env.run(acts.load_scoring_model)
    assert isinstance(model, ScoringModel)
    assert model == load_model(DEFAULT_MODEL)


def test_the_model_file_is_read_once_a_while_not_per_lead(store, env, tmp_path, monkeypatch):
    """A store that has no active model yet: every new lead asks for the model file's; it is
    parsed once per ACTIVE_MODEL_TTL_SECONDS (parsing it per lead was 9% of a benchmark's
    CPU), and a changed file is taken after that."""
    import activities.lead_activities as module

    path = tmp_path / "model.toml"
    path.write_text(DEFAULT_MODEL.read_text())
    acts, reads = make_activities(store, model_path=path), []
    real_load = module.load_model
    monkeypatch.setattr(module, "load_model", lambda p: reads.append(p) or real_load(p))
    assert [env.run(acts.load_scoring_model).ref for _ in range(5)] == ["default@1"] * 5
    assert len(reads) == 1
    path.write_text(DEFAULT_MODEL.read_text().replace('version = "1"', 'version = "2"', 1))
    monkeypatch.setattr(module, "ACTIVE_MODEL_TTL_SECONDS", 0.0)
    assert env.run(acts.load_scoring_model).ref == "default@2"


def test_broken_scoring_model_is_not_retried(store, env, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\nversion = "1"\n[events.webinar_attended]\npoints = "lots"\n')
    lead_activities = make_activities(store, model_path=broken)
    with pytest.raises(ApplicationError) as caught:
        env.run(lead_activities.load_scoring_model)
    assert caught.value.non_retryable
    assert caught.value.type == "ModelError"
    assert "broken.toml" in str(caught.value) and "points" in str(caught.value)


def test_missing_scoring_model_is_not_retried(store, env, tmp_path):
    lead_activities = make_activities(store, model_path=tmp_path / "nope.toml")
    with pytest.raises(ApplicationError, match="cannot read scoring model") as caught:
        env.run(lead_activities.load_scoring_model)
    assert caught.value.non_retryable


# --------------------------------------------------------------------------- audit


def test_record_audit_is_idempotent(acts, env, store):
    batch = [audit("lead-1", s) for s in (1, 2, 3)] + [audit("lead-2", 1)]
    assert env.run(acts.record_audit, batch) == 4
    assert env.run(acts.record_audit, batch) == 0  # a retry after a lost response
    assert [e.seq for e in store.history("lead-1")] == [1, 2, 3]
    assert store.count_history("lead-2") == 1


# --------------------------------------------------------------------------- delivery


def test_deliver_without_webhook_only_fills_the_outbox(acts, env, store):
    msg = message(score=120.0)
    assert env.run(acts.deliver, msg) is None
    assert env.run(acts.deliver, msg) is None
    assert store.pending_outbox() == [msg]
    assert store.is_delivered(msg.message_id) is False


def test_deliver_posts_once_with_an_idempotency_key(hooked, env, store, webhook):
    msg = message(kind=OutboundKind.OPPORTUNITY, seq=9, score=150.5, hot=True, owner=None)

    env.run(hooked.deliver, msg)
    env.run(hooked.deliver, msg)  # a retry: already delivered, no second POST

    assert len(webhook.requests) == 1
    (request,) = webhook.requests
    assert request["path"] == "/hooks/leadflow"
    assert request["headers"]["Idempotency-Key"] == "lead-1/opportunity/9"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["body"] == msg.model_dump(mode="json")
    assert Outbound.model_validate(request["body"]) == msg
    assert store.is_delivered(msg.message_id)
    assert store.pending_outbox() == [msg]  # still there for pollers until acknowledged


def test_a_signed_webhook_verifies_with_the_standard_webhooks_reference(store, env, webhook):
    """With a secret, each POST carries webhook-id, -timestamp and -signature; the receiver
    verifies them with the Standard Webhooks library, and by hand (HMAC-SHA256 of
    id.timestamp.body); a body changed on the way fails."""
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    signed = make_activities(store, webhook_url=webhook.url, webhook_secret=secret)
    msg = message(kind=OutboundKind.HANDOVER, seq=3, score=120.0, owner="presales-1")
    try:
        env.run(signed.deliver, msg)
    finally:
        signed.close()
    (request,) = webhook.requests
    headers, raw = request["headers"], request["raw"]
    assert headers["webhook-id"] == msg.message_id
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert StandardWebhook(secret).verify(raw, headers) == msg.model_dump(mode="json")
    mac = hmac.new(b"k" * 32, f"{msg.message_id}.{headers['webhook-timestamp']}.".encode() + raw, hashlib.sha256)
    assert headers["webhook-signature"] == "v1," + base64.b64encode(mac.digest()).decode()
    with pytest.raises(WebhookVerificationError):
        StandardWebhook(secret).verify(raw.replace(b"presales-1", b"presales-2"), headers)
    with pytest.raises(WebhookVerificationError):
        StandardWebhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(raw, headers)


def test_a_webhook_secret_must_be_a_standard_webhooks_secret():
    with pytest.raises(ValidationError, match="webhook_secret"):
        Settings(webhook_secret="hunter2")


def test_deliver_raises_on_a_server_error_and_posts_again_on_retry(hooked, env, store, webhook):
    msg = message(kind=OutboundKind.ESCALATION, seq=5, to="sales-manager")
    webhook.status = 500

    with pytest.raises(ApplicationError, match="answered 500") as caught:
        env.run(hooked.deliver, msg)
    assert not caught.value.non_retryable  # Temporal retries it
    assert store.is_delivered(msg.message_id) is False
    assert store.pending_outbox() == [msg]  # kept in the outbox regardless

    webhook.status = 204
    env.run(hooked.deliver, msg)  # the retry
    env.run(hooked.deliver, msg)
    assert [r["headers"]["Idempotency-Key"] for r in webhook.requests] == [msg.message_id] * 2
    assert store.is_delivered(msg.message_id)


def test_deliver_raises_on_a_client_error(hooked, env, store, webhook):
    webhook.status = 404
    with pytest.raises(ApplicationError, match="answered 404"):
        env.run(hooked.deliver, message())
    assert store.is_delivered(message().message_id) is False


def test_deliver_raises_when_the_webhook_is_unreachable(store, env, webhook):
    url = webhook.url
    webhook.shutdown()
    webhook.server_close()  # nothing listens on that port any more
    lead_activities = make_activities(store, webhook_url=url)
    try:
        with pytest.raises(ApplicationError, match="unreachable"):
            env.run(lead_activities.deliver, message())
        assert store.pending_outbox() == [message()]
        assert store.is_delivered(message().message_id) is False
    finally:
        lead_activities.close()


# --------------------------------------------------------------------------- owners


def test_assign_owner_takes_turns_per_team_and_puts_the_message_in_the_outbox(acts, env, store):
    """Presales for an MQL, an account executive for an SQL, each team in its own turn; the
    message goes to the outbox naming its owner; no webhook configured: nothing to post."""
    mql = [message(f"lead-{n}", score=100.0).model_copy(update={"assign_to": "presales"}) for n in range(3)]
    sql = [message(f"lead-{n}", kind=OutboundKind.OPPORTUNITY).model_copy(update={"assign_to": "sales"})
           for n in range(3)]
    handed = [env.run(acts.assign_owner, m) for m in mql + sql]
    assert [h["owner"] for h in handed] == ["ana", "ben", "cy", "ae-1", "ae-2", "ae-1"]
    assert not any(h["post"] for h in handed)
    assert env.run(acts.assign_owner, mql[0]) == {"owner": "ana", "post": False}  # a retry: same owner, no turn
    assert {m.message_id: m.payload["owner"] for m in store.pending_outbox()} == {
        m.message_id: h["owner"] for m, h in zip(mql + sql, handed)}


def test_assign_owner_says_to_post_when_a_webhook_is_configured_and_posts_nothing_itself(hooked, env, webhook):
    handed = env.run(hooked.assign_owner, message().model_copy(update={"assign_to": "presales"}))
    assert handed == {"owner": "ana", "post": True}
    assert webhook.requests == []


def test_record_audit_and_assign_writes_first_then_owns_and_outboxes_each_handover(acts, env, store):
    """Version 10's write before a handover: the entries, then each message's owner (its
    team's next in turn) and its outbox row naming them; a retry writes nothing twice and
    gets the same owners without taking a turn."""
    mql = message("lead-1", score=100.0).model_copy(update={"assign_to": "presales"})
    sql = message("lead-2", kind=OutboundKind.OPPORTUNITY).model_copy(update={"assign_to": "sales"})
    batch = AuditBatch(entries=[audit("lead-1", 1), audit("lead-2", 1)], assign=[mql, sql])
    assigned = env.run(acts.record_audit_and_assign, batch)
    assert assigned == Assigned(written=2, owners={mql.message_id: "ana", sql.message_id: "ae-1"}, post=False)
    assert env.run(acts.record_audit_and_assign, batch) == assigned.model_copy(update={"written": 0})  # a retry
    assert {m.message_id: m.payload["owner"] for m in store.pending_outbox()} == assigned.owners
    assert store.count_history("lead-1") == store.count_history("lead-2") == 1
    assert env.run(acts.assign_owner, message("lead-3").model_copy(update={"assign_to": "presales"}))["owner"] == "ben"


def test_record_audit_and_assign_says_to_post_and_leaves_a_teamless_handover_to_assign_owner(store, env, webhook):
    """A webhook configured: the lead is told to post (the activity posts nothing itself). A
    team without members: the entries are written, the message gets no owner and no outbox
    row; the lead then hands it over by `assign_owner`, which fails saying why."""
    acts = make_activities(store, presales_team=[], webhook_url=webhook.url)
    try:
        lonely = message("lead-1").model_copy(update={"assign_to": "presales"})
        sql = message("lead-2", kind=OutboundKind.OPPORTUNITY).model_copy(update={"assign_to": "sales"})
        assigned = env.run(acts.record_audit_and_assign, AuditBatch(entries=[audit("lead-1", 1)], assign=[lonely, sql]))
        assert assigned == Assigned(written=1, owners={sql.message_id: "ae-1"}, post=True)
        assert [m.message_id for m in store.pending_outbox()] == [sql.message_id]
        assert webhook.requests == []
        with pytest.raises(ApplicationError, match="no members"):
            env.run(acts.assign_owner, lonely)
    finally:
        acts.close()


# --------------------------------------------------------------------------- hand-over (runs started by older code)


def test_hand_over_assigns_round_robin_and_delivers_the_owner(hooked, env, store, webhook):
    messages = [message(f"lead-{n}", score=100.0 + n) for n in range(4)]
    owners = [env.run(hooked.hand_over, m) for m in messages]
    assert owners == ["ana", "ben", "cy", "ana"]

    assert [r["body"]["payload"]["owner"] for r in webhook.requests] == owners
    assert [r["headers"]["Idempotency-Key"] for r in webhook.requests] == [m.message_id for m in messages]
    assert webhook.requests[1]["body"]["payload"] == {"score": 101.0, "owner": "ben"}
    assert [m.payload["owner"] for m in store.pending_outbox()] == owners
    assert messages[0].payload == {"score": 100.0}  # the caller's message is left alone


def test_hand_over_retry_keeps_the_owner_and_does_not_post_again(hooked, env, webhook):
    first = message("lead-1")
    assert env.run(hooked.hand_over, first) == "ana"
    assert env.run(hooked.hand_over, first) == "ana"
    assert env.run(hooked.hand_over, message("lead-2")) == "ben"  # the retry used no turn
    assert len(webhook.requests) == 2


def test_hand_over_after_a_failed_post_keeps_the_owner(hooked, env, store, webhook):
    msg = message("lead-1")
    webhook.status = 503
    with pytest.raises(ApplicationError):
        env.run(hooked.hand_over, msg)
    assert store.owner_of(msg.message_id) == "ana"

    webhook.status = 200
    assert env.run(hooked.hand_over, msg) == "ana"
    assert [r["body"]["payload"]["owner"] for r in webhook.requests] == ["ana", "ana"]
    assert store.is_delivered(msg.message_id)


def test_hand_over_without_a_team_is_not_retried(store, env):
    lead_activities = make_activities(store, presales_team=[])
    try:
        with pytest.raises(ApplicationError, match="no members") as caught:
            env.run(lead_activities.hand_over, message())
        assert caught.value.non_retryable
        assert store.pending_outbox() == []
    finally:
        lead_activities.close()
