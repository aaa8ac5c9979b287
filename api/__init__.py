"""Leadflow's HTTP API: one service for the tools around the funnel.

Marketing automation (Mautic, HubSpot, Marketo) posts activity webhooks and
profile facts; presales and sales tools send decisions and get the lead's new
state back; managers' tools read lead states, audit histories, the outbox of
handovers/nurture steps/escalations and the funnel report.

Every call reaches the lead workflows through `client.py` only (signal-with-
start for events and facts, workflow updates for commands, queries for state)
and reads history from the audit store, so the API holds no state of its own:
run as many as you like beside the worker (`uvicorn api:app`, started by
scripts/run_local.py).

Why FastAPI: the funnel's inputs are pydantic models already, and FastAPI
validates requests with pydantic, answers 422 naming the bad field, and
derives the OpenAPI document and interactive docs (/docs, served with
its own files, and /openapi.json) from the same models, so the documentation cannot drift from
what is enforced. uvicorn is its well-kept ASGI server.

Configuration (environment, besides config.py's Settings):

    LEADFLOW_API_KEYS       name:role:key[,name:role:key...]   roles: marketing,
                            presales, sales, manager; keys of 16+ characters
    LEADFLOW_API_KEYS_FILE  a TOML file of [[keys]] tables (name, role and
                            either key or sha256 = hex digest of the key)
    LEADFLOW_API_DEV_KEYS   1: also accept the dev keys dev-marketing,
                            dev-presales, dev-sales, dev-manager (local runs only)
    LEADFLOW_PII_READERS    roles that read personal data (default manager,presales,sales);
                            the others get it masked
    LEADFLOW_CODEC_ORIGINS  origins of the Temporal web UI allowed to call /codec (CORS)

With no key configured the API refuses to start; so it does without payload keys
(LEADFLOW_PAYLOAD_KEYS, see payload_codec.py).
"""

from __future__ import annotations

import client as leads  # noqa: F401 - the routes reach leads through it (tests watch it here)
from api.keys import ConfigError, KeyRing  # noqa: F401 - what callers configure an app with
from api.limits import MAX_BATCH, MAX_BODY_BYTES  # noqa: F401
from api.service import create_app

__all__ = ["ConfigError", "KeyRing", "MAX_BATCH", "MAX_BODY_BYTES", "app", "create_app", "leads"]

app = create_app()
