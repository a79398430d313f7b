"""Tests that load rules into throwaway network namespaces (root)."""
