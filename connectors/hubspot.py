"""HubSpot webhooks (the Webhooks API): a JSON array of events, each with `eventId`,
`subscriptionType`, `objectId` (the contact), `occurredAt` (epoch milliseconds) and, for a
property change, `propertyName`/`propertyValue`. Signed per HubSpot's v3 scheme:
`X-HubSpot-Signature-v3` is base64(HMAC-SHA256(app secret, method + URI + body +
X-HubSpot-Request-Timestamp)), and a request older than 5 minutes is to be refused.
HubSpot keeps `eventId` across its retries, so it is the Leadflow id."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime, timezone

from connectors.items import VendorItem, from_epoch_ms, stable_id
from connectors.mapping import VendorMapping

# HubSpot signs the URI with these characters decoded (its "Validating requests" guide).
_DECODED = {"%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$", "%27": "'", "%28": "(",
            "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";"}


def signed_uri(uri: str) -> str:
    for encoded, char in _DECODED.items():
        uri = uri.replace(encoded, char).replace(encoded.lower(), char)
    return uri


def signature_ok(method: str, uri: str, body: bytes, timestamp: str | None, signature: str | None,
                 secret: str) -> bool:
    if not signature or not timestamp:
        return False
    source = method.upper().encode() + signed_uri(uri).encode() + body + timestamp.encode()
    expected = base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(expected.encode(), signature.strip().encode())


def request_time(timestamp: str | None) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(timestamp or "") / 1000, timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None


def items(payload: list, mapping: VendorMapping) -> list[VendorItem]:
    return [_item(event, mapping) if isinstance(event, dict) else VendorItem("?", problem="an event must be an object")
            for event in payload]


def _item(event: dict, mapping: VendorMapping) -> VendorItem:
    vendor_type = str(event.get("subscriptionType") or "?")
    contact = event.get("objectId")
    item = VendorItem(vendor_type, vendor_id=stable_id("hubspot", event.get("portalId"), event.get("eventId")),
                      contact_id=None if contact is None else str(contact),
                      occurred_at=from_epoch_ms(event.get("occurredAt")))
    rule = mapping.rule_for(vendor_type, event)
    if rule is not None and not rule.ignore:
        item.event_type, item.channel = rule.type, rule.channel
    elif rule is None and vendor_type == "contact.propertyChange" and event.get("propertyName") in mapping.facts:
        item.facts = mapping.facts_of({event["propertyName"]: event.get("propertyValue")})
        if not item.facts:
            item.ignored = f"{event['propertyName']} has no usable value"
    else:
        item.ignored = f"{vendor_type} is ignored by the mapping" if rule else f"no rule maps {vendor_type}" + (
            f" ({event['propertyName']})" if event.get("propertyName") else "")
    item.require("no objectId (contact) in the event", "no portalId/eventId in the event",
                 "no usable occurredAt (epoch milliseconds) in the event")
    return item
