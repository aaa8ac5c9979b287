"""The activity that feeds an account workflow from its leads (workflows/account_feed.py)."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.client import Client

from activities.store import AuditStore

from config import Settings
from funnel.accounts import ContactSnapshot
from workflows.account_input import ACCOUNT_VERSION, AccountInput, account_workflow_id


NOTED_MAX = 100_000  # memberships a process remembers having written (then it forgets them all)


class AccountActivities:
    def __init__(self, client: Client, settings: Settings, store: AuditStore):
        self.client = client
        self.settings = settings
        self.store = store
        self._noted: dict[tuple[str, str], str | None] = {}  # (account, lead) -> role written

    @activity.defn(name="feed_account")
    async def feed_account(self, snapshot: ContactSnapshot) -> None:
        """Note the membership (the report counts accounts from it) when it is new or its
        role changed, or drop it when the lead left, then signal-with-start: the account
        exists from its first lead on."""
        member = (snapshot.account_id, snapshot.lead_id)
        if snapshot.left:
            await asyncio.to_thread(self.store.forget_account_member, snapshot.account_id, snapshot.lead_id)
            self._noted.pop(member, None)
        elif member not in self._noted or self._noted[member] != snapshot.role:
            await asyncio.to_thread(self.store.note_account_member, snapshot.account_id, snapshot.lead_id,
                                    snapshot.role, snapshot.at)
            if len(self._noted) >= NOTED_MAX:
                self._noted.clear()
            self._noted[member] = snapshot.role
        await self.client.start_workflow(
            "AccountWorkflow", AccountInput(account_id=snapshot.account_id, version=ACCOUNT_VERSION,
                                            max_history_events=self.settings.max_history_events),
            id=account_workflow_id(snapshot.account_id), task_queue=self.settings.task_queue,
            start_signal="contact_changed", start_signal_args=[snapshot])

    def all(self) -> list:
        return [self.feed_account]
