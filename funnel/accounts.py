"""Buying teams: accounts (companies) scored from their contacts.

B2B buying is done by several people of one company (the sources: decision maker, champion,
users, purchasing decide together), so a company can be ready before any one contact is. A
lead belongs to an account by its `account_id` fact, or else by the domain of its `email`
fact (public mail domains excluded: gmail.com says nothing about a company). Each lead tells
its account a `ContactSnapshot` when what the account reads of it changes; the account's
score is its fit (the model's fit rules on the account's facts: target account, size,
industry ...) plus the engagement of its best k contacts, its buying-team coverage is the
set of roles (`role` fact) among its engaged contacts, and it becomes marketing-qualified
(MQA) when both pass the model's `[account]` thresholds. It is then handed over as a whole,
with its contacts, once.

Pure: no Temporal, no I/O, no clock (`now` is an argument). A snapshot carries no personal
data: ids, numbers, stage, role and the account-level facts only.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from funnel.models import FactValue, Outbound, OutboundKind
from funnel.scoring_model import ScoringModel

ACCOUNT_FACT = "account_id"
EMAIL_FACT = "email"
ROLE_FACT = "role"
ACCOUNT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"
_ACCOUNT_ID = re.compile(ACCOUNT_ID_PATTERN)
HISTORY_MAX = 200  # an account keeps its latest entries; the count of earlier ones stays
# What an account's id is prefixed with where leads' ids go: its workflow id, its outbox rows.
ACCOUNT_KEY_PREFIX = "account-"

# Mail providers anyone can use: their domain names no company.
PUBLIC_MAIL_DOMAINS = frozenset({
    "gmail.com", "googlemail.com", "yahoo.com", "yahoo.de", "ymail.com", "outlook.com", "outlook.de", "hotmail.com",
    "hotmail.de", "live.com", "live.de", "msn.com", "icloud.com", "me.com", "mac.com", "aol.com", "aol.de",
    "gmx.de", "gmx.net", "gmx.at", "gmx.ch", "gmx.com", "web.de", "t-online.de", "freenet.de", "posteo.de",
    "mailbox.org", "proton.me", "protonmail.com", "yandex.com", "mail.ru", "arcor.de", "1und1.de", "online.de",
    "bluewin.ch", "aon.at", "chello.at",
})


def account_of(profile: dict[str, FactValue]) -> str | None:
    """The account a lead's facts put it in: `account_id`, else its e-mail's company domain."""
    given = profile.get(ACCOUNT_FACT)
    if isinstance(given, str) and _ACCOUNT_ID.match(given.strip()):
        return given.strip()
    email = profile.get(EMAIL_FACT)
    if isinstance(email, str) and email.count("@") == 1:
        domain = email.rsplit("@", 1)[1].strip().lower().rstrip(".")
        if "." in domain and domain not in PUBLIC_MAIL_DOMAINS and _ACCOUNT_ID.match(domain):
            return domain
    return None


class ContactSnapshot(BaseModel):
    """What an account reads of one of its leads; `seq` orders a lead's snapshots (the lead's
    audit sequence when it was taken), so the newest wins whatever order they arrive in. A
    snapshot with `left` says the lead is no longer the account's contact (its facts now name
    another account or none): at the same seq it is newer than a membership."""

    lead_id: str
    account_id: str = Field(pattern=ACCOUNT_ID_PATTERN)
    seq: int = Field(ge=0)
    at: datetime
    stage: str
    score: float
    engagement: float
    role: str | None = None
    facts: dict[str, FactValue] = Field(default_factory=dict)  # the account-level facts the lead knows
    facts_at: datetime | None = None  # when those were observed (the newest of them)
    left: bool = False  # the lead has left this account (lead version 9+)


def contact_snapshot(lead_id: str, profile: dict[str, FactValue], profile_seen: dict[str, tuple[datetime, str]],
                     stage: str, score: float, engagement: float, seq: int, model: ScoringModel, now: datetime
                     ) -> ContactSnapshot | None:
    """The snapshot a lead sends its account, or None if it has no account."""
    account = account_of(profile)
    if account is None:
        return None
    fields = set(model.account.fit_fields)
    facts = {name: value for name, value in profile.items() if name in fields}
    seen = [profile_seen[name][0] for name in facts if name in profile_seen]
    role = profile.get(ROLE_FACT)
    return ContactSnapshot(lead_id=lead_id, account_id=account, seq=seq, at=now, stage=stage, score=round(score, 2),
                           engagement=round(engagement, 2), role=str(role).lower() if role is not None else None,
                           facts=dict(sorted(facts.items())), facts_at=max(seen) if seen else None)


def contact_snapshots(lead_id: str, profile: dict[str, FactValue], profile_seen: dict[str, tuple[datetime, str]],
                      stage: str, score: float, engagement: float, seq: int, model: ScoringModel, now: datetime,
                      fed_account: str | None) -> list[ContactSnapshot]:
    """What a lead tells accounts now, given the account it last fed: its departure from that
    account if its facts no longer put it there, then its snapshot for the account they name."""
    current = contact_snapshot(lead_id, profile, profile_seen, stage, score, engagement, seq, model, now)
    told = []
    if fed_account is not None and (current is None or current.account_id != fed_account):
        told.append(ContactSnapshot(lead_id=lead_id, account_id=fed_account, seq=seq, at=now, stage=stage,
                                    score=round(score, 2), engagement=round(engagement, 2), left=True))
    if current is not None:
        told.append(current)
    return told


def same_for_account(a: ContactSnapshot | None, b: ContactSnapshot | None) -> bool:
    """Whether the account would learn nothing new (ignoring seq and time)."""
    if a is None or b is None:
        return a is b
    keep = {"lead_id", "account_id", "stage", "score", "engagement", "role", "facts", "left"}
    return a.model_dump(include=keep) == b.model_dump(include=keep)


class AccountSummary(BaseModel):
    """What the funnel report counts of accounts (from the store: who fed which account, and
    the account handovers)."""

    accounts: int = 0  # accounts with at least one lead
    contacts: int = 0  # leads in an account
    mqa: int = 0  # accounts marketing-qualified (handed over)
    mqa_rate: float | None = None  # of the accounts
    multi_contact_accounts: int = 0  # with two contacts or more: buying teams


class AccountStage(StrEnum):
    ENGAGED = "engaged"  # it has contacts, not (yet) enough of them
    MQA = "mqa"  # marketing-qualified: handed over as a whole


class AccountEntry(BaseModel):
    """One line of the account's history: a contact's change that moved its score, or its MQA."""

    n: int
    at: datetime
    kind: str  # "contact" | "mqa" | "model"
    lead_id: str | None = None
    detail: str
    score: float
    roles: list[str]


class AccountState(BaseModel):
    account_id: str
    created_at: datetime
    stage: AccountStage = AccountStage.ENGAGED
    stage_since: datetime
    model_ref: str | None = None  # the scoring model version its rules come from
    contacts: dict[str, ContactSnapshot] = Field(default_factory=dict)
    departed: dict[str, int] = Field(default_factory=dict)  # lead -> seq of its departure (older news is stale)
    score: float = 0.0
    fit: float = 0.0
    engagement: float = 0.0
    roles: list[str] = Field(default_factory=list)  # buying-team roles among its engaged contacts
    owner: str | None = None
    handed_over_at: datetime | None = None
    history: list[AccountEntry] = Field(default_factory=list)
    entries: int = 0  # every entry ever (the history keeps the latest HISTORY_MAX)
    handovers: int = 0


class AccountView(BaseModel):
    account_id: str
    stage: AccountStage
    stage_since: datetime
    score: float
    fit: float
    engagement: float
    roles: list[str]
    roles_needed: int
    threshold: float
    owner: str | None
    contacts: list[ContactSnapshot]
    history: list[AccountEntry]


class Account:
    """An account's rules applied to what its contacts report."""

    def __init__(self, state: AccountState):
        self.state = state
        self._outbound: list[Outbound] = []

    @classmethod
    def create(cls, account_id: str, now: datetime) -> "Account":
        return cls(AccountState(account_id=account_id, created_at=now, stage_since=now))

    def take_outbound(self) -> list[Outbound]:
        out, self._outbound = self._outbound, []
        return out

    def apply(self, snapshot: ContactSnapshot, model: ScoringModel, now: datetime) -> bool:
        """Take a contact's snapshot (an older one than known for that lead changes nothing);
        True if the account changed. A departure removes the contact: its engagement and role
        no longer count, and a handover already made stays made."""
        s = self.state
        lead = snapshot.lead_id
        known = s.contacts.get(lead)
        newest = known.seq if known is not None else s.departed.get(lead)
        if newest is not None and (newest > snapshot.seq or (newest == snapshot.seq and not snapshot.left)):
            return False
        if snapshot.left:
            s.departed[lead] = snapshot.seq
            if known is None:
                return False
            del s.contacts[lead]
        else:
            s.departed.pop(lead, None)
            s.contacts[lead] = snapshot
        before = (s.score, tuple(s.roles))
        self._rescore(model)
        if snapshot.left:
            self._note(now, "contact", f"{lead} left the account", lead)
        elif (s.score, tuple(s.roles)) != before:
            self._note(now, "contact", f"{lead}: {snapshot.stage}, engagement {snapshot.engagement:g}"
                                       + (f", {snapshot.role}" if snapshot.role else ""), lead)
        self._consider(model, now)
        return True

    def use_model(self, model: ScoringModel, now: datetime) -> None:
        """Apply the rules of this model version (the one the account runs on); a switch of
        version says so in the history, as a lead's does."""
        s = self.state
        old_ref, old_score = s.model_ref, s.score
        self._rescore(model)
        s.model_ref = model.ref
        if old_ref is not None and old_ref != model.ref:
            self._note(now, "model", f"scoring model {old_ref} \u2192 {model.ref}: {old_score:g} \u2192 {s.score:g}")
        self._consider(model, now)

    def assign_owner(self, owner: str) -> None:
        self.state.owner = owner

    def view(self, model: ScoringModel) -> AccountView:
        s = self.state
        return AccountView(account_id=s.account_id, stage=s.stage, stage_since=s.stage_since, score=s.score, fit=s.fit,
                           engagement=s.engagement, roles=s.roles, roles_needed=model.account.min_roles,
                           threshold=model.account.threshold, owner=s.owner, contacts=_ranked(s), history=s.history)

    # ------------------------------------------------------------------ rules

    def _rescore(self, model: ScoringModel) -> None:
        s, rules = self.state, model.account
        facts: dict[str, FactValue] = {}
        # The account's facts: the newest observation of each field among its contacts.
        for contact in sorted(s.contacts.values(), key=lambda c: (c.facts_at or c.at, c.lead_id)):
            facts.update(contact.facts)
        s.fit = round(sum(rule.points for rule in model.fit if rule.field in rules.fit_fields and rule.matches(facts)), 2)
        best = sorted((max(c.engagement, 0.0) for c in s.contacts.values()), reverse=True)[: rules.best_k]
        s.engagement = round(sum(best), 2)
        s.score = round(s.fit + s.engagement, 2)
        s.roles = sorted({c.role for c in s.contacts.values()
                          if c.role in rules.roles and c.engagement > 0 and c.stage not in rules.inactive_stages})

    def _consider(self, model: ScoringModel, now: datetime) -> None:
        s, rules = self.state, model.account
        if s.stage is AccountStage.MQA or s.score < rules.threshold or len(s.roles) < rules.min_roles:
            return
        s.stage, s.stage_since, s.handed_over_at = AccountStage.MQA, now, now
        s.handovers += 1
        self._note(now, "mqa", f"marketing-qualified account: score {s.score:g} >= {rules.threshold:g}, "
                               f"roles {', '.join(s.roles)} ({len(s.roles)} >= {rules.min_roles})")
        key = ACCOUNT_KEY_PREFIX + s.account_id
        self._outbound.append(Outbound(
            message_id=f"{key}/account_handover/{s.handovers}", lead_id=key,
            kind=OutboundKind.ACCOUNT_HANDOVER, at=now, assign_to=rules.assign_to,
            payload=_handover(s)))

    def _note(self, now: datetime, kind: str, detail: str, lead_id: str | None = None) -> None:
        s = self.state
        s.entries += 1
        s.history.append(AccountEntry(n=s.entries, at=now, kind=kind, lead_id=lead_id, detail=detail, score=s.score,
                                      roles=list(s.roles)))
        del s.history[:-HISTORY_MAX]


def _ranked(s: AccountState) -> list[ContactSnapshot]:
    """The account's contacts, most engaged first (the view and the handover list them so)."""
    return sorted(s.contacts.values(), key=lambda c: (-c.engagement, c.lead_id))


def _handover(s: AccountState) -> dict[str, Any]:
    return {"account_id": s.account_id, "score": s.score, "fit": s.fit, "engagement": s.engagement,
            "roles": s.roles, "contacts": [{"lead_id": c.lead_id, "stage": c.stage, "score": c.score,
                                            "engagement": c.engagement, "role": c.role} for c in _ranked(s)]}
