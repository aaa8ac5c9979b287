"""Temporal workflows: the thin shell that turns signals, updates and timers
into calls of the pure core in `funnel/`."""
