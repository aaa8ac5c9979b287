"""Inbound connectors: vendor webhooks (Mautic, HubSpot) checked and translated into
Leadflow events and profile facts. Pure translation and signature checks; the HTTP route
is api/routes_connectors.py, the mapping table connectors/default.toml."""
