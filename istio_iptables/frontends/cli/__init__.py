"""The command-line front ends beside ``istio-iptables``'s Istio flag surface (``ambient``)."""
