from istio_iptables.frontends.cli.main import program

program()
