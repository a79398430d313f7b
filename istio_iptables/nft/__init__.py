"""Native nftables backend (``--native-nftables``): Istio's policy as ``inet`` tables.

model.py holds the small nftables model, capture.py builds it from a Config (step by step, as
Istio's nftables mode does), render.py writes it as an ``nft -f`` script, system.py talks to the
kernel, and run.py orchestrates one invocation.
"""
