"""Activities of an erasure (GDPR Art. 17), called by the lead workflow's `erase` update:
scrub the store and rotate the lead's data key; later, in the lead's next run, destroy the
old key generations once nothing of the run needs them (crypto-shredding the history).

They need the worker's Temporal client: its data converter's codec holds the lead keys
(payload_codec.LeadKeys), and the run's own history tells which generations it still uses.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.store import AuditStore
from funnel.personal_data import ErasureReport
from payload_codec import EncryptionCodec, LeadKeys, key_ids_in, parse_lead_key_id


def lead_keys_of(client: Client) -> LeadKeys:
    """The lead keys of a client's codec (config.data_converter)."""
    codec = client.data_converter.payload_codec
    if not isinstance(codec, EncryptionCodec) or codec.lead_keys is None:
        raise ApplicationError("this worker's Temporal client has no payload codec with lead keys "
                               "(connect with config.data_converter)", type="NoCodec", non_retryable=True)
    return codec.lead_keys


class PersonalDataActivities:
    def __init__(self, client: Client, store: AuditStore):
        self.client = client
        self.store = store

    @activity.defn(name="erase_personal_data")
    async def erase_personal_data(self, report: ErasureReport, through_seq: int) -> ErasureReport:
        """A new generation of the lead's key (its payloads are encrypted with it from now on),
        then the store scrubbed of the lead's personal data and the erasure recorded. Both
        steps are idempotent by the erasure id, so a retry does nothing twice."""
        keys = lead_keys_of(self.client)
        generation = await keys.rotate(report.lead_id, report.erasure_id)
        report = report.model_copy(update={"key_generation": generation})
        return await asyncio.to_thread(self.store.erase_personal_data, report, through_seq)

    @activity.defn(name="shred_lead_keys")
    async def shred_lead_keys(self, lead_id: str, below: int) -> bool:
        """Destroy the lead's key generations below `below`, unless the calling run's own
        history still holds a payload encrypted with one of them (then False: the run ends
        for a new one and tries again). After this, nobody can read the lead's earlier
        Temporal history, nor its earlier payloads anywhere."""
        info = activity.info()
        history = await self.client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id).fetch_history()
        in_use = [lead[1] for lead in map(parse_lead_key_id, key_ids_in(history.events))
                  if lead is not None and lead[0] == lead_id]
        if any(generation < below for generation in in_use):
            activity.logger.info("lead %s: this run still holds payloads under an older key; a new run first", lead_id)
            return False
        await lead_keys_of(self.client).destroy(lead_id, below)
        await asyncio.to_thread(self.store.keys_destroyed, lead_id, below, datetime.now(timezone.utc))
        return True

    def all(self) -> list:
        return [self.erase_personal_data, self.shred_lead_keys]
