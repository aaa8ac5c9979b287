"""An account (company) as a durable workflow: its leads' snapshots in, its score, buying-team
coverage and MQA handover out (the rules are funnel/accounts.py). Leads start it by
signal-with-start (activities/account_activities.py), so it exists once a lead names it.
A model rollout (workflows/rollout.py) tells accounts as it tells leads: the account goes on
as a new run on the version it was told.

Workflow code: only workflow time, activities and signals.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from funnel.accounts import Account, AccountView, ContactSnapshot
    from funnel.models import Outbound
    from funnel.scoring_model import ScoringModel
    from workflows import search_attributes as sa
    from workflows.account_input import ACCOUNT_VERSION, AccountInput
    from workflows.lead_input import ModelChange

MODEL_TIMEOUT = timedelta(seconds=30)
ASSIGN_RETRY = RetryPolicy(maximum_interval=timedelta(seconds=30))
DELIVERY_RETRY = RetryPolicy(maximum_interval=timedelta(minutes=10))


@workflow.defn
class AccountWorkflow:
    @workflow.init
    def __init__(self, inp: AccountInput) -> None:
        self._inbox: list[ContactSnapshot] = list(inp.pending)
        self._account: Account | None = None
        self._model: ScoringModel | None = None
        self._undelivered: dict[str, Outbound] = {m.message_id: m for m in inp.undelivered}
        self._upserted: tuple | None = None
        self._told_model: str | None = None  # a rollout's version, to go on with
        self._version = inp.version

    @workflow.signal(name="contact_changed")
    def contact_changed(self, snapshot: ContactSnapshot) -> None:
        self._inbox.append(snapshot)

    @workflow.signal(name="model_changed")
    def model_changed(self, change: ModelChange) -> None:
        self._told_model = change.ref

    @workflow.query(name="account_view")
    def account_view(self) -> AccountView:
        if self._account is None or self._model is None:
            raise ApplicationError("account is starting", type="AccountStarting")
        return self._account.view(self._model)

    @workflow.run
    async def run(self, inp: AccountInput) -> None:
        self._model = await self._load_model(inp.model_ref)
        now = workflow.now()
        account = self._account = (Account(inp.state) if inp.state is not None
                                   else Account.create(inp.account_id, now))
        account.use_model(self._model, now)
        self._upsert()
        for message in list(self._undelivered.values()):  # carried over: they start again
            self._deliver(message)
        while True:
            await workflow.wait_condition(lambda: bool(self._inbox) or self._long(inp) or self._switch_due())
            if (self._long(inp) or self._switch_due()) and not self._inbox:
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(AccountInput(
                    account_id=inp.account_id, state=account.state, pending=list(self._inbox),
                    undelivered=list(self._undelivered.values()), max_history_events=inp.max_history_events,
                    model_ref=self._told_model if self._switch_due() else self._model.ref, version=ACCOUNT_VERSION))
            batch, self._inbox = self._inbox, []
            now = workflow.now()
            for snapshot in batch:
                account.apply(snapshot, self._model, now)
            for message in account.take_outbound():
                self._deliver(message)
            self._upsert()

    async def _load_model(self, ref: str | None) -> ScoringModel:
        """The version the account was told (a missing or broken one: the active one)."""
        while True:
            try:
                return await workflow.execute_activity(
                    "load_scoring_model", ref, result_type=ScoringModel, start_to_close_timeout=MODEL_TIMEOUT,
                    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=30)))
            except ActivityError as err:
                if ref is None:
                    raise
                workflow.logger.warning("account %s: model %s unusable (%s); using the active one",
                                        workflow.info().workflow_id, ref, err.cause)
                ref = None

    def _upsert(self) -> None:
        """Stage, score, owner and (version 2) model version in visibility (the lead's keys),
        so lists and counts find accounts by them (`WorkflowType = 'AccountWorkflow' AND
        LeadStage = 'mqa'`) and a rollout finds those behind."""
        assert self._account is not None and self._model is not None
        s = self._account.state
        model = self._model.ref if self._version >= 2 else None
        now = (s.stage.value, s.score, s.owner, model)
        if now == self._upserted:
            return
        self._upserted = now
        updates = [sa.LEAD_STAGE.value_set(s.stage.value), sa.LEAD_SCORE.value_set(float(s.score))]
        if s.owner:
            updates.append(sa.LEAD_OWNER.value_set(s.owner))
        if model is not None:
            updates.append(sa.LEAD_MODEL.value_set(model))
        workflow.upsert_search_attributes(updates)

    def _switch_due(self) -> bool:
        """A rollout told it another version than it runs on: it goes on as a run on that one."""
        return self._told_model is not None and self._model is not None and self._told_model != self._model.ref

    def _long(self, inp: AccountInput) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() > inp.max_history_events

    def _deliver(self, message: Outbound) -> None:
        self._undelivered[message.message_id] = message
        asyncio.create_task(self._hand_over(message))

    async def _hand_over(self, message: Outbound) -> None:
        """The account's owner (the next of the team in turn) and the outbox row in one short
        store write, then the webhook, if one is configured: as a lead's handover."""
        handed = await workflow.execute_activity(
            "assign_owner", message, result_type=dict, start_to_close_timeout=timedelta(seconds=30),
            retry_policy=ASSIGN_RETRY)
        assert self._account is not None
        self._account.assign_owner(handed["owner"])
        self._upsert()
        if handed["post"]:
            named = message.with_owner(handed["owner"])
            await workflow.execute_activity("deliver", named, start_to_close_timeout=timedelta(minutes=2),
                                            retry_policy=DELIVERY_RETRY)
        self._undelivered.pop(message.message_id, None)
