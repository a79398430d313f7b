"""A drop-in, pure-Python replacement for Istio's ``istio-iptables`` init program."""

__version__ = "0.1.0"
