from istio_iptables.cli import main

main()
