"""What one vendor event becomes before a lead is looked up for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from funnel.models import EVENT_ID_PATTERN

import re

_ID_OK = re.compile(EVENT_ID_PATTERN)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:/-]")


@dataclass
class VendorItem:
    """One vendor event: an activity event (`event_type`), profile facts (`facts`), ignored
    (`ignored` says why) or unusable (`problem` says why). `vendor_id` is stable across the
    vendor's redeliveries, so it is the Leadflow event/update id."""

    vendor_type: str
    vendor_id: str | None = None
    contact_id: str | None = None
    occurred_at: datetime | None = None
    event_type: str | None = None
    channel: str | None = None
    campaign: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    ignored: str | None = None
    problem: str | None = None

    def require(self, no_contact: str, no_ids: str, no_time: str) -> None:
        """An item to be applied needs a contact, its ids and a time: say which is missing."""
        if self.ignored is not None:
            return
        if self.contact_id is None:
            self.problem = no_contact
        elif self.vendor_id is None:
            self.problem = no_ids
        elif self.occurred_at is None:
            self.problem = no_time


def stable_id(vendor: str, *parts: Any) -> str | None:
    """A Leadflow id made of the vendor's own ids (None if a part is missing)."""
    if any(p is None or p == "" for p in parts):
        return None
    text = _UNSAFE.sub("_", ":".join([vendor, *(str(p) for p in parts)]))[:200]
    return text if _ID_OK.match(text) else None


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time with an offset, in UTC; None if absent, naive or not a time."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:
        return None


def from_epoch_ms(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return datetime.fromtimestamp(value / 1000, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def compact(t: datetime) -> str:
    return t.strftime("%Y%m%dT%H%M%SZ")
