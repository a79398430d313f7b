"""The iptables dialect: rule model, restore rendering, the iptables-save reader, reconcile. Pure."""
