"""Live traffic, the container image, the demo: whole-program behaviour in namespaces (root)."""
