"""Capture policies: which rules a configuration means, as pure data (no I/O).

Ambient mode lives here already (``ambient_config``, ``ambient_xtables``, ``ambient_nft``,
``ambient_footprint``); the sidecar policy joins it when the layout moves (issue 13).
"""
