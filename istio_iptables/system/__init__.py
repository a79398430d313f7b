"""Side effects that reach outside the process: the Kubernetes API (more move here in the layout of issue 13)."""
