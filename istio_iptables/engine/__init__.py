"""The actions (render, apply, cleanup, check, validate) and their orchestration per form."""
