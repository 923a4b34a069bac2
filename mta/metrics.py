"""The Prometheus registry (SPEC §9). A leaf: it imports no stage.

Labels are bounded: sending domain, provider, result, kind, reason, state. Never an
address, an account or a campaign id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

SUBMITTED_JOBS = Counter("mta_submitted_jobs", "Jobs accepted on the submit socket", registry=REGISTRY)
SUBMITTED_RECIPIENTS = Counter("mta_submitted_recipients", "Recipients accepted on the submit socket",
                               registry=REGISTRY)
REJECTED_RECIPIENTS = Counter("mta_rejected_recipients", "Recipients refused at submission", ["code"],
                              registry=REGISTRY)
SUBMIT_ERRORS = Counter("mta_submit_errors", "Submit requests refused as a whole", ["code"], registry=REGISTRY)
DELIVERIES = Counter("mta_deliveries", "Delivery attempts by result", ["sending_domain", "provider", "result"],
                     registry=REGISTRY)
BOUNCES = Counter("mta_bounces", "Bounces by kind and reason", ["kind", "reason"], registry=REGISTRY)
COMPLAINTS = Counter("mta_complaints", "Feedback-loop complaints", ["feedback_type"], registry=REGISTRY)
UNSUBSCRIBES = Counter("mta_unsubscribes", "Unsubscribe requests received", registry=REGISTRY)
QUEUE_DEPTH = Gauge("mta_queue_depth", "Queued recipients by state", ["state"], registry=REGISTRY)
CONNECTIONS = Gauge("mta_active_connections", "Open SMTP client sessions", ["sending_domain", "provider"],
                    registry=REGISTRY)
LATENCY = Histogram("mta_delivery_latency_seconds", "Time of one SMTP transaction (MAIL to final reply)",
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY)
PAUSED_ACCOUNTS = Gauge("mta_paused_accounts", "Accounts currently paused", registry=REGISTRY)
THROTTLE_WAITS = Counter("mta_throttle_waits", "Times a sender waited for a rate limit",
                         ["sending_domain", "provider"], registry=REGISTRY)
BACKOFF = Counter("mta_backoff_decisions", "Adaptive backoff decisions (cut, suspend)",
                  ["sending_domain", "provider", "decision"], registry=REGISTRY)
THROTTLE_RATE = Gauge("mta_throttle_rate", "Current allowed message rate per second (0: unthrottled)",
                      ["sending_domain", "provider"], registry=REGISTRY)
THROTTLE_SUSPENDED = Gauge("mta_throttle_suspended_seconds", "Seconds until a suspended provider is tried again",
                           ["sending_domain", "provider"], registry=REGISTRY)
DISK_FREE = Gauge("mta_state_disk_free_bytes", "Free bytes on the state directory's file system", registry=REGISTRY)
DISK_SIZE = Gauge("mta_state_disk_size_bytes", "Size of the state directory's file system", registry=REGISTRY)
SPOOL_ERRORS = Counter("mta_spool_commit_errors", "Spool transactions that failed to commit", registry=REGISTRY)
EVENT_FEED_CURSOR = Gauge("mta_event_feed_cursor", "Cursor of the newest event in the feed", registry=REGISTRY)
EVENT_FEED_LAG = Gauge("mta_event_feed_lag", "Events newer than the last cursor a campaign system read past",
                       registry=REGISTRY)
SPOOL_BYTES = Gauge("mta_spool_bytes", "Size of the spool database files", registry=REGISTRY)
EVENTS = Counter("mta_events", "Events appended to the feed", ["type"], registry=REGISTRY)
DNS_LOOKUPS = Counter("mta_dns_cache", "MX resolutions by cache result", ["result"], registry=REGISTRY)
TLS_FALLBACKS = Counter("mta_tls_fallbacks", "STARTTLS handshakes that failed; the host gets mail in the clear",
                        ["sending_domain"], registry=REGISTRY)
CLUSTER_DEGRADED = Gauge("mta_cluster_degraded",
                         "1 while cluster mode is on and Redis does not answer (local limits in effect)",
                         registry=REGISTRY)
CLUSTER_NODES = Gauge("mta_cluster_nodes", "Nodes seen alive in the cluster (cluster mode)", registry=REGISTRY)
CLUSTER_OUTAGES = Counter("mta_cluster_outages", "Times this node lost its Redis and went degraded",
                          registry=REGISTRY)
UP = Gauge("mta_up", "1 while the daemon is serving", registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
