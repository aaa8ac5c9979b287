"""What counts as personal data in Leadflow, and how it is masked and erased.

Personal data (GDPR Art. 4(1)) here is everything a person's own data could be in:

- every **profile fact value** (`ProfileUpdate.facts`, `LeadState.profile`): name, e-mail,
  phone, company, and whatever else marketing automation sends - we cannot tell which
  fact is harmless, so none is treated as such;
- every **event attribute** (`ActivityEvent.attributes`): form fields, page URLs, ...;
- **free text**: notes of commands (accept, reject, qualify, contact, close, reopen) and the
  `email_consent_source` fact, wherever they were copied: audit `detail` of profile updates
  (it lists the values!), of stage changes and contacts (the note), of skipped nurture
  steps (the consent source); outbound messages (handover, opportunity, review carry the
  profile and the activities with their attributes).

Not personal data, and kept by erasure because the funnel reports need them: the lead id
(an opaque key by design, never an e-mail address), stages and their times, scores and
their breakdown by rule name, event types, ids and times, channels, reason codes, owners
(employees), the model version, consent as yes/no with its time, and the names of facts.
After erasure nobody can tie these to a person.

Erasure keeps one thing of the profile: for each fit rule the lead matched, the rule's own
category (the `equals` value, the matching `one_of` option, or the range bound), so its fit
score and fast-track blocks survive a later refit; these are the scoring model's words,
not the person's. Everything else of the profile goes.

Pure functions and models: no I/O, no clock.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from funnel.models import Actor, AuditEntry, AuditKind, ConsentRecord, FactValue, LeadState

MASK = "***"  # what a role that may not read personal data sees instead of a value
ERASED = "[erased]"  # what erasure leaves where a value was

_FACT_NAME = re.compile(r"(?:^profile: |, )([a-z][a-z0-9_]{0,63})=")
_NOTE = "; note: "
_CONSENT_TEXT = re.compile(r"(profile update [A-Za-z0-9][A-Za-z0-9_.:/-]*) \((.*)\)$", re.DOTALL)
_NURTURE_CONSENT = re.compile(r"(\(profile update [A-Za-z0-9][A-Za-z0-9_.:/-]*) \((.*)\)\)$", re.DOTALL)


# --------------------------------------------------------------------------- audit entries


def scrub_entry(entry: AuditEntry, replacement: str = MASK) -> AuditEntry:
    """The entry with every personal value in its `detail` replaced by `replacement`.
    Knows the detail formats of funnel.lead (pinned by tests/test_personal_data.py)."""
    detail = scrub_detail(entry.kind, entry.detail, entry.actor, replacement)
    return entry if detail == entry.detail else entry.model_copy(update={"detail": detail})


def scrub_detail(kind: AuditKind, detail: str, actor: str, replacement: str = MASK) -> str:
    if kind == AuditKind.PROFILE_UPDATED:
        # "profile: email=a@b.c, name=Ann (older than what is known of: name)": values are free text,
        # so keep only the names found at the start of each "name=" (a value that itself holds
        # ", word=" shows that word as a name - never more of the value).
        if replacement == ERASED:
            return "profile: fact values erased"
        names = _FACT_NAME.findall(detail) if detail.startswith("profile: ") else []
        return "profile: " + (", ".join(f"{name}={replacement}" for name in names) or replacement)
    if kind == AuditKind.STAGE_CHANGED and _NOTE in detail:
        return detail[: detail.index(_NOTE) + len(_NOTE)] + replacement
    if kind == AuditKind.CONTACT_LOGGED:
        prefix = f" contact by {actor}: "
        at = detail.find(prefix)
        return detail if at < 0 else detail[: at + len(prefix)] + replacement
    if kind in (AuditKind.NURTURE_STEP_SKIPPED, AuditKind.CONSENT_CHANGED):
        # "... no consent since DAY (profile update p-3 (form-7))": the source fact is free text
        return _NURTURE_CONSENT.sub(lambda m: f"{m.group(1)} ({replacement}))", detail)
    return detail


# --------------------------------------------------------------------------- lead views, outbound messages


def scrub_consent_source(source: str, replacement: str = MASK) -> str:
    """"profile update p-3 (form-7)": the text in brackets is the email_consent_source fact."""
    return _CONSENT_TEXT.sub(lambda m: f"{m.group(1)} ({replacement})", source)


def mask_profile(profile: dict[str, Any], replacement: str = MASK) -> dict[str, str]:
    return {name: replacement for name in profile}


def scrub_payload(payload: dict[str, Any], replacement: str = MASK) -> dict[str, Any]:
    """An outbound message's payload without personal values: the profile's values and the
    activities' attributes are replaced; names, types, times and scores stay."""
    out = dict(payload)
    if isinstance(out.get("profile"), dict):
        out["profile"] = mask_profile(out["profile"], replacement)
    if isinstance(out.get("activities"), list):
        out["activities"] = [
            {**a, "attributes": mask_profile(a["attributes"], replacement)}
            if isinstance(a, dict) and isinstance(a.get("attributes"), dict) else a
            for a in out["activities"]
        ]
    return out


def mask_view(view):
    """A LeadView for a role that may not read personal data: fact values and the consent's
    free-text source masked."""
    consent = dict(view.consent)
    if isinstance(consent.get("source"), str):
        consent["source"] = scrub_consent_source(consent["source"])
    return view.model_copy(update={"profile": mask_profile(view.profile), "consent": consent})


# --------------------------------------------------------------------------- erasure of a lead's state


class ErasedCounts(BaseModel):
    profile_facts: int = 0  # fact values removed from the lead's state
    kept_categories: list[str] = Field(default_factory=list)  # facts kept as a fit rule's category
    events: int = 0  # events whose attributes were removed

    def describe(self, by: Actor) -> str:
        kept = (f"; kept as fit categories: {', '.join(self.kept_categories)}" if self.kept_categories else "")
        return (f"personal data erased by {by.name} (GDPR Art. 17): {self.profile_facts} profile fact value(s), "
                f"attributes of {self.events} event(s), notes in the history{kept}; the Temporal history so far "
                "is crypto-shredded")


def fit_categories(profile: dict[str, FactValue], fit_rules) -> dict[str, FactValue]:
    """For each fit rule `profile` matches, the rule's own term for the value: what erasure
    keeps so the fit score (and fast-track blocks) survive a refit. A field whose
    category would change what any rule matches is dropped."""
    kept: dict[str, FactValue] = {}
    matched = [rule for rule in fit_rules if rule.matches(profile)]
    for field in dict.fromkeys(rule.field for rule in matched):
        rules = [rule for rule in matched if rule.field == field]
        value: FactValue | None = None
        for rule in rules:
            if rule.equals is not None:
                value = rule.equals
            elif rule.one_of is not None:
                value = next(o for o in rule.one_of if rule.matches({field: o}) and _same_text(o, profile[field]))
        if value is None:  # ranges only: the largest lower bound satisfies every matched range
            lows = [rule.min for rule in rules if rule.min is not None]
            highs = [rule.max for rule in rules if rule.max is not None]
            value = max(lows) if lows else min(highs)
            if isinstance(profile[field], int) and float(value).is_integer():
                value = int(value)
        kept[field] = value
    wanted = {rule.name for rule in matched}
    for field in list(kept):
        for rule in fit_rules:
            if rule.field == field and (rule.name in wanted) != rule.matches(kept):
                kept.pop(field)
                break
    return kept


def _same_text(a: FactValue, b: FactValue) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def erase_from_state(state: LeadState, fit_rules, at: datetime) -> ErasedCounts:
    """Drop the person's data from a lead's state in place: profile values (but the fit
    categories), event attributes, free text in consent sources. Scores, stages, times,
    events (type, id, time, channel) and consent yes/no stay."""
    kept = fit_categories(state.profile, fit_rules)
    counts = ErasedCounts(profile_facts=len(state.profile) - len(kept), kept_categories=sorted(kept))
    state.profile = kept
    state.profile_seen = {name: seen for name, seen in state.profile_seen.items() if name in kept}
    for event in state.engagement.window:
        if event.attributes:
            counts.events += 1
            event.attributes = {}
    for name in ("consent_fact", "event_consent", "consent_noted"):
        record: ConsentRecord | None = getattr(state, name)
        if record is not None:
            setattr(state, name, record.model_copy(update={"source": scrub_consent_source(record.source, ERASED)}))
    state.personal_data_erased_at = at
    return counts


# --------------------------------------------------------------------------- erasure requests and reports


class EraseRequest(BaseModel):
    """Update `erase` of a lead: drop the person's data (GDPR Art. 17)."""

    by: Actor


class ErasureReport(BaseModel):
    """What an erasure did, as `leadflow erase` and DELETE /leads/{id}/personal-data answer."""

    lead_id: str
    erasure_id: str
    erased_by: str
    erased_at: datetime
    profile_facts: int = 0
    events: int = 0
    audit_entries: int = 0  # store entries whose detail was scrubbed
    outbox_messages: int = 0  # outbox payloads scrubbed
    key_generation: int | None = None  # the lead's payloads are encrypted with this generation from now on
    keys_destroyed_at: datetime | None = None  # when the earlier generations were destroyed
    history: str = Field(default="", description="what became of the lead's Temporal history")
