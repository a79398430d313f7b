"""Live-traffic test beds and their in-namespace child programs (also used by scripts/ and bench/)."""
