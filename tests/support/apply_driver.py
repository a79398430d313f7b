"""Run one lifecycle check in-process from inside ``ip netns exec`` (so /etc/netns/NAME/group applies).

Usage: python -m tests.support.apply_driver NAMESPACE BACKEND ARGS_JSON ENV_JSON
"""

from __future__ import annotations

import json
import sys

from tests.support.lifecycle_support import lifecycle
from tests.support.netns import NetNS


class ExistingNetNS(NetNS):
    def __init__(self, name: str) -> None:  # the test owns (and deletes) the namespace
        self.name = name


if __name__ == "__main__":
    name, backend, args, env = sys.argv[1:5]
    lifecycle(ExistingNetNS(name), backend, json.loads(args), json.loads(env), via_cli=False)
