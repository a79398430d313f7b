"""Capture policies: which rules a mode needs, as dialect models. Pure, no I/O."""
