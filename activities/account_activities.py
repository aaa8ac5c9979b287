"""The activity that feeds an account workflow from its leads (workflows/account_feed.py)."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client

from config import Settings
from funnel.accounts import ContactSnapshot
from workflows.account_input import AccountInput, account_workflow_id


class AccountActivities:
    def __init__(self, client: Client, settings: Settings):
        self.client = client
        self.settings = settings

    @activity.defn(name="feed_account")
    async def feed_account(self, snapshot: ContactSnapshot) -> None:
        """Signal-with-start: the account exists from its first lead on."""
        await self.client.start_workflow(
            "AccountWorkflow", AccountInput(account_id=snapshot.account_id,
                                            max_history_events=self.settings.max_history_events),
            id=account_workflow_id(snapshot.account_id), task_queue=self.settings.task_queue,
            start_signal="contact_changed", start_signal_args=[snapshot])

    def all(self) -> list:
        return [self.feed_account]
