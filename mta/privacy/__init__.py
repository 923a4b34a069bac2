"""Data protection (SPEC §12): retention, erasure and the audit trail."""
