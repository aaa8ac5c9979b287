"""The Temporal activities a lead workflow calls: everything with I/O.

They are synchronous (`def`) because sqlmodel and httpx's sync client block;
the worker runs them in a thread pool (`activity_executor=`). Each is safe to
retry: the store makes writes idempotent and a webhook POST is made at most
once per message after it succeeded (and carries an `Idempotency-Key` so the
receiver can drop the duplicate of a POST whose answer was lost). With a webhook secret
every POST is signed per the Standard Webhooks convention.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import httpx
from standardwebhooks import Webhook
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.store import AuditStore, ModelConflict
from config import Settings
from funnel.models import Assigned, AuditBatch, AuditEntry, AuditKind, Outbound
from funnel.scoring_model import ModelError, ScoringModel, load_model, parse_model

WEBHOOK_TIMEOUT_SECONDS = 10.0
ACTIVE_MODEL_TTL_SECONDS = 2.0  # new leads read the active model at most this stale


class LeadActivities:
    """Activities bound to one configuration and store (shared by all leads of a worker)."""

    def __init__(self, settings: Settings, store: AuditStore | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else AuditStore(settings.database_url)
        # One client for all threads: keeps connections to the webhook alive.
        self._http = httpx.Client(timeout=WEBHOOK_TIMEOUT_SECONDS)
        # Standard Webhooks' own signer (standardwebhooks): the reference receivers verify with.
        self._signer = Webhook(settings.webhook_secret) if settings.webhook_secret else None
        self._models: dict[str, ScoringModel] = {}  # by ref: a version's text never changes
        self._active: tuple[float, str] | None = None  # (read at, ref)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ the scoring model

    def sync_model_file(self) -> ScoringModel:
        """At worker start: the model file (LEADFLOW_MODEL) becomes the active model when the
        store has none, or when the file is a version the store has never seen. A version the
        store knows with other content is refused (ModelConflict): give it a new version.
        Otherwise the store's active model stays (`leadflow model apply` changes it)."""
        model = load_model(self.settings.model_path)
        text = self.settings.model_path.read_text(encoding="utf-8")
        active = self.store.active_model()
        known = self.store.model_version(model.ref)
        if active is None or known is None:
            self.store.record_model(model.ref, text, applied_by=f"leadflow-worker ({self.settings.model_path.name})")
        elif known.text != text:
            raise ModelConflict(
                f"{self.settings.model_path}: scoring model {model.ref} is already recorded with other content: "
                "give the changed model a new version"
            )
        return self.model(None)

    def model(self, ref: str | None) -> ScoringModel:
        """Version `ref`, or the active one (read from the store at most every couple of seconds)."""
        if ref is None:
            now = time.monotonic()
            cached = self._active
            if cached is None or now - cached[0] > ACTIVE_MODEL_TTL_SECONDS:
                active = self.store.active_model()
                if active is None:  # a store that never recorded one: the model file, parsed once a while
                    from_file = load_model(self.settings.model_path)
                    with self._lock:
                        self._models[from_file.ref] = from_file
                    cached = self._active = (now, from_file.ref)
                else:
                    self._remember(active.ref, active.text)
                    cached = self._active = (now, active.ref)
            ref = cached[1]
        if ref not in self._models:
            version = self.store.model_version(ref)
            if version is None:
                raise ModelError(f"no scoring model {ref} in the store")
            self._remember(ref, version.text)
        return self._models[ref]

    def _remember(self, ref: str, text: str) -> None:
        with self._lock:
            if ref not in self._models:
                self._models[ref] = parse_model(text, ref)

    @activity.defn(name="load_scoring_model")
    def load_scoring_model(self, ref: str | None = None) -> ScoringModel:
        """The active scoring model (or version `ref`), validated; a broken one is not worth retrying."""
        try:
            return self.model(ref)
        except ModelError as err:
            raise ApplicationError(str(err), type="ModelError", non_retryable=True) from err

    # ------------------------------------------------------------------ the audit

    @activity.defn(name="record_audit")
    def record_audit(self, batch: list[AuditEntry] | AuditBatch) -> int:
        """Write audit entries, and (version 8 runs) log the input the lead took; returns
        how many entries were new (0 on a retry of a written batch)."""
        if isinstance(batch, AuditBatch):
            return self.store.write_audit(batch.entries, batch.taken)
        return self.store.write_audit(batch)

    @activity.defn(name="record_audit_and_assign")
    def record_audit_and_assign(self, batch: AuditBatch) -> Assigned:
        """Version 10: write the batch, then give each handover it announces its owner and
        its outbox row. One activity where v3-v9 leads use two (`record_audit`, then
        `assign_owner`), and the owner comes back with the write. History first, as before:
        the entries are stored before the outbox row names the owner. A retry writes nothing
        twice and gets the same owners. A message whose team has no members gets none: the
        lead hands it over by `assign_owner`, which fails saying why."""
        written = self.store.write_audit(batch.entries, batch.taken)
        owners = {}
        for message in batch.assign:
            try:
                owners[message.message_id] = self._hand_to_owner(message)
            except ApplicationError as err:
                if err.type != "NoTeam":
                    raise
        return Assigned(written=written, owners=owners, post=bool(self.settings.webhook_url))

    @activity.defn(name="applied_event_ids")
    def applied_event_ids(self, lead_id: str, event_ids: list[str]) -> list[str]:
        """The ids among `event_ids` the lead has applied (each has its score entry in the store)."""
        found = self.store.applied_ids(AuditKind.SCORE_CHANGED, {lead_id: event_ids})
        return sorted(event_id for _, event_id in found)

    # ------------------------------------------------------------------ owners and deliveries

    def _owner_for(self, assignment_id: str, team: str) -> str:
        members = self.settings.presales_team if team == "presales" else self.settings.sales_team
        try:
            return self.store.assign_owner(assignment_id, members, team_name=team)
        except ValueError as err:  # an empty team: retrying cannot help until configuration changes
            raise ApplicationError(str(err), type="NoTeam", non_retryable=True) from err

    @activity.defn(name="assign_owner")
    def assign_owner(self, message: Outbound) -> dict:
        """The next member of the message's team in turn (a retry gets the same owner), and
        the message, naming them, in the outbox. Returns {"owner", "post"}: `post` says a
        webhook is configured, which the lead then delivers to beside its loop."""
        return {"owner": self._hand_to_owner(message), "post": bool(self.settings.webhook_url)}

    def _hand_to_owner(self, message: Outbound) -> str:
        """The next member of the message's team in turn (a retry gets the same owner), with
        the message, naming them, in the outbox."""
        owner = self._owner_for(message.message_id, message.assign_to or "presales")
        self.store.add_outbox(message.with_owner(owner))
        return owner

    @activity.defn(name="hand_over")
    def hand_over(self, message: Outbound) -> str:
        """Assign the presales owner and deliver the handover in one (runs started by older code)."""
        owner = self._owner_for(message.message_id, "presales")
        self.deliver(message.with_owner(owner))
        return owner

    @activity.defn(name="deliver")
    def deliver(self, message: Outbound) -> None:
        """Put the message in the outbox and, if a webhook is configured, POST it once.

        A failed POST (network error, non-2xx answer) raises so Temporal retries;
        the outbox row is written first, so pollers see the message either way.
        """
        self.store.add_outbox(message)
        url = self.settings.webhook_url
        if not url or self.store.is_delivered(message.message_id):
            return
        body = json.dumps(message.model_dump(mode="json"), separators=(",", ":"))
        headers = {"Idempotency-Key": message.message_id, "Content-Type": "application/json"}
        if self._signer is not None:  # signed as sent, at each attempt (the receiver checks the time)
            seconds = int(time.time())  # whole seconds: what the header carries is what is signed
            headers |= {"webhook-id": message.message_id, "webhook-timestamp": str(seconds),
                        "webhook-signature": self._signer.sign(message.message_id,
                                                               datetime.fromtimestamp(seconds, timezone.utc), body)}
        try:
            response = self._http.post(url, content=body.encode("utf-8"), headers=headers)
        except httpx.HTTPError as err:
            raise ApplicationError(
                f"webhook {url} unreachable for {message.message_id}: {err!r}", type="WebhookFailed"
            ) from err
        if not response.is_success:
            raise ApplicationError(
                f"webhook {url} answered {response.status_code} for {message.message_id}: {response.text[:200]}",
                type="WebhookFailed",
            )
        self.store.mark_delivered(message.message_id)


def all_activities(acts: LeadActivities) -> list:
    """The bound activity methods, for `Worker(activities=...)`."""
    return [acts.load_scoring_model, acts.record_audit, acts.record_audit_and_assign, acts.applied_event_ids,
            acts.assign_owner, acts.hand_over, acts.deliver]
