"""Front ends: the ways a configuration reaches the engine (a Pod object, the CNI protocol)."""
