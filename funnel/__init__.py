"""Leadflow's functional core: the funnel's stages, scoring and timers as pure code.

No Temporal, no I/O, no clock: every function takes `now` as an argument.
"""
