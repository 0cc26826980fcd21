"""Shipped gate policies (YAML), installed as ``gate.policies`` and found by name."""
