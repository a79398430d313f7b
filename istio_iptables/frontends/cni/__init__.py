"""``istio-cni``: Istio's sidecar CNI plugin over our engine (see docs/cni.md)."""
