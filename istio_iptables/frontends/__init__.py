"""Front ends: the ways in (command lines, the CNI plugin) that turn input into an engine action."""
