"""Mautic webhooks: `{"mautic.<event>": [payload, ...], ...}`, signed with the webhook's
secret in `Webhook-Signature` (base64 of HMAC-SHA256 over the raw body; Mautic's
developer documentation, "Authenticity verification"). Mautic sends no signed time and no
delivery id: the time is each payload's `timestamp`, the ids are Mautic's own (hit,
submission, contact ...), so a redelivery maps to the same Leadflow ids."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime

from connectors.items import VendorItem, compact, parse_time, stable_id
from connectors.mapping import VendorMapping, pluck

CONTACT_SAVED = ("mautic.lead_post_save_new", "mautic.lead_post_save_update")


def signature_ok(body: bytes, signature: str | None, secret: str) -> bool:
    if not signature:
        return False
    expected = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(expected.encode(), signature.strip().encode())


def newest_time(payload: dict) -> datetime | None:
    """The newest event `timestamp` in the body: what the replay window is checked against."""
    times = [parse_time(item.get("timestamp")) for items in payload.values() if isinstance(items, list)
             for item in items if isinstance(item, dict)]
    times = [t for t in times if t is not None]
    return max(times) if times else None


def items(payload: dict, mapping: VendorMapping) -> list[VendorItem]:
    """Every event of the body, in the body's order."""
    out = []
    for vendor_type, events in payload.items():
        if not isinstance(events, list):
            continue  # e.g. a top-level "timestamp"
        for event in events:
            out.append(_item(vendor_type, event, mapping) if isinstance(event, dict)
                       else VendorItem(vendor_type, problem="an event payload must be an object"))
    return out


def _item(vendor_type: str, event: dict, mapping: VendorMapping) -> VendorItem:
    stamp = parse_time(event.get("timestamp"))
    contact = pluck(event, "contact.id") or pluck(event, "lead.id")
    if vendor_type == "mautic.page_on_hit":
        contact, own_id = pluck(event, "hit.lead.id"), pluck(event, "hit.id")
        when = parse_time(pluck(event, "hit.dateHit")) or stamp
        vendor_id = stable_id("mautic", "hit", own_id)
    elif vendor_type == "mautic.form_on_submit":
        contact, own_id = pluck(event, "submission.lead.id"), pluck(event, "submission.id")
        when = parse_time(pluck(event, "submission.dateSubmitted")) or stamp
        vendor_id = stable_id("mautic", "submission", own_id)
    elif vendor_type in ("mautic.email_on_open", "mautic.email_on_send"):
        when = stamp
        vendor_id = stable_id("mautic", vendor_type.rsplit(".", 1)[1], event.get("idHash"),
                              compact(stamp) if stamp else None)
    elif vendor_type == "mautic.lead_channel_subscription_changed":
        when = stamp
        vendor_id = stable_id("mautic", "channel", contact, event.get("channel"), event.get("new_status"),
                              compact(stamp) if stamp else None)
    else:
        when = stamp
        modified = parse_time(pluck(event, "contact.dateModified")) or stamp
        vendor_id = stable_id("mautic", vendor_type.rsplit(".", 1)[-1], contact,
                              compact(modified) if modified else None)
    item = VendorItem(vendor_type, vendor_id=vendor_id, contact_id=None if contact is None else str(contact),
                      occurred_at=when)
    if vendor_type in CONTACT_SAVED:
        if "contact" not in event and "lead" in event:  # Mautic before 2.9 called the contact "lead"
            event = {**event, "contact": event["lead"]}
        item.facts = mapping.facts_of(event)
        if not item.facts:
            item.ignored = "no mapped contact field has a value"
    else:
        rule = mapping.rule_for(vendor_type, event)
        if rule is None:
            item.ignored = f"no rule maps {vendor_type}"
        elif rule.ignore:
            item.ignored = f"{vendor_type} is ignored by the mapping"
        else:
            item.event_type, item.channel = rule.type, rule.channel
            campaign = pluck(event, rule.campaign_from) if rule.campaign_from else None
            item.campaign = str(campaign).lower() if campaign else None
    item.require("no contact id in the payload", "the payload lacks the ids that identify this event",
                 "no usable timestamp (ISO 8601 with an offset) in the payload")
    return item
