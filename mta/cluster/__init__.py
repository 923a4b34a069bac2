"""Cluster mode (SPEC §10): state shared between nodes through Redis."""
