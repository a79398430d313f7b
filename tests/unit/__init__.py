"""No root, no namespace, seconds: `python -m pytest tests/unit`."""
