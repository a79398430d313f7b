"""Configuration: settings with their provenance, parsed and validated per capture mode."""
