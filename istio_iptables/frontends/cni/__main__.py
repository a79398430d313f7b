"""``python -m istio_iptables.frontends.cni``: the ``istio-cni`` executable."""

from istio_iptables.frontends.cni.plugin import program

program()
