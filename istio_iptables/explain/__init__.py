"""Flow evaluation over either dialect's rules (from a configuration or the live kernel). Pure."""
