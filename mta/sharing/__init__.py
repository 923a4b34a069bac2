"""Cluster mode (SPEC §10): what the nodes share through Redis, beyond the throttles.

Each module ties one stage's state to the cluster link: accounts (compare-and-set by
revision, published), suppression (hashes only, published), campaign counters (each
node's absolute counts, summed), job keys (idempotency across nodes), and erasures.
`app.py` wires them; the stages know only small hooks and protocols.
"""
