from istio_iptables.cli import program

program()
