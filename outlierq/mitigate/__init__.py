"""Mitigations: each one frozen config + one apply function, composed by a recipe."""
