"""Writing the plan into a network namespace: backend choice, state diff, appliers, routes.

Only the pure parts (:mod:`.state`) and the small edges are imported on the default path;
python-iptables (:mod:`.libiptc`) and pyroute2 (:mod:`.routes`) load only when used.
"""
