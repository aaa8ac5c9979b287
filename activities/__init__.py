"""Everything a lead workflow does outside itself: the audit store, the outbox
and the Temporal activities that use them.

Import from the submodules (`activities.store`, `activities.lead_activities`);
this package imports nothing itself, so workflow code can name it without
pulling sqlmodel or httpx into the workflow sandbox.
"""
