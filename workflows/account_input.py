"""The account workflow's input (apart from workflows/account.py, as lead_input.py is: the
sandbox passes it through instead of rebuilding the pydantic models for every run)."""

from __future__ import annotations

from pydantic import BaseModel

from funnel.accounts import ACCOUNT_KEY_PREFIX, AccountState, ContactSnapshot
from funnel.models import Outbound


def account_workflow_id(account_id: str) -> str:
    return ACCOUNT_KEY_PREFIX + account_id


class AccountInput(BaseModel):
    account_id: str
    state: AccountState | None = None  # None: a new account
    pending: list[ContactSnapshot] = []  # snapshots taken but not applied yet (continue-as-new)
    undelivered: list[Outbound] = []  # handovers still on their way
    max_history_events: int = 2000
