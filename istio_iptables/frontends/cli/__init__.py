"""The click command line: istio-iptables and its explain subcommand."""
