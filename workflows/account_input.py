"""The account workflow's input (apart from workflows/account.py, as lead_input.py is: the
sandbox passes it through instead of rebuilding the pydantic models for every run)."""

from __future__ import annotations

from pydantic import BaseModel

from funnel.accounts import ACCOUNT_KEY_PREFIX, AccountState, ContactSnapshot
from funnel.models import Outbound


# 2: the account shows its model version in visibility (LeadModel) and switches to the one
# a rollout tells it (workflows/account.py). Version 1 runs (no version given) upsert no
# model version (a changed upsert would not replay); they switch too, and go on as 2.
ACCOUNT_VERSION = 2


def account_workflow_id(account_id: str) -> str:
    return ACCOUNT_KEY_PREFIX + account_id


class AccountInput(BaseModel):
    account_id: str
    state: AccountState | None = None  # None: a new account
    pending: list[ContactSnapshot] = []  # snapshots taken but not applied yet (continue-as-new)
    undelivered: list[Outbound] = []  # handovers still on their way
    max_history_events: int = 2000
    model_ref: str | None = None  # the model version to run on (None: the active one)
    version: int = 1  # the feed and continue-as-new set ACCOUNT_VERSION
