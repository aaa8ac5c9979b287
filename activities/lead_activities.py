"""The Temporal activities a lead workflow calls: everything with I/O.

They are synchronous (`def`) because sqlmodel and httpx's sync client block;
the worker runs them in a thread pool (`activity_executor=`). Each is safe to
retry: the store makes writes idempotent and a webhook POST is made at most
once per message after it succeeded (and carries an `Idempotency-Key` so the
receiver can drop the duplicate of a POST whose answer was lost).
"""

from __future__ import annotations

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.store import AuditStore
from config import Settings
from funnel.models import AuditEntry, Outbound
from funnel.scoring_model import ModelError, ScoringModel, load_model

WEBHOOK_TIMEOUT_SECONDS = 10.0


class LeadActivities:
    """Activities bound to one configuration and store (shared by all leads of a worker)."""

    def __init__(self, settings: Settings, store: AuditStore | None = None) -> None:
        self.settings = settings
        self.store = store if store is not None else AuditStore(settings.database_url)
        # One client for all threads: keeps connections to the webhook alive.
        self._http = httpx.Client(timeout=WEBHOOK_TIMEOUT_SECONDS)

    def close(self) -> None:
        self._http.close()

    @activity.defn(name="load_scoring_model")
    def load_scoring_model(self) -> ScoringModel:
        """The scoring model file, validated; a broken file is not worth retrying."""
        try:
            return load_model(self.settings.model_path)
        except ModelError as err:
            raise ApplicationError(str(err), type="ModelError", non_retryable=True) from err

    @activity.defn(name="record_audit")
    def record_audit(self, entries: list[AuditEntry]) -> int:
        """Write audit entries; returns how many were new (0 on a retry of a written batch)."""
        return self.store.write_audit(entries)

    @activity.defn(name="hand_over")
    def hand_over(self, message: Outbound) -> str:
        """Give the lead to the next presales owner in turn and tell the world; returns the owner.

        The assignment is keyed by the message id, so a retry gets the same owner.
        """
        try:
            owner = self.store.assign_owner(message.message_id, self.settings.presales_team, team_name="presales")
        except ValueError as err:  # an empty team: retrying cannot help until configuration changes
            raise ApplicationError(str(err), type="NoPresalesTeam", non_retryable=True) from err
        self.deliver(message.model_copy(update={"payload": {**message.payload, "owner": owner}}))
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
        try:
            response = self._http.post(
                url,
                json=message.model_dump(mode="json"),
                headers={"Idempotency-Key": message.message_id},
            )
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
    return [acts.load_scoring_model, acts.record_audit, acts.hand_over, acts.deliver]
