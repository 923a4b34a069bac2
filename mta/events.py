"""The durable event feed (SPEC §8): append-only rows in the spool with a monotonic cursor.

Events are written in the same transaction as the state change they report, so the feed
never claims a delivery the spool does not know, and a crash loses neither.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from . import metrics
from .queue.spool import Spool

MAX_PAGE = 10000
_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(dict[str, Any])


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_row(etype: str, account: str | None, body: dict[str, Any], when: float | None = None
              ) -> tuple[float, str, str | None, bytes]:
    """A row for spool.append_events (time, type, account, JSON body)."""
    metrics.EVENTS.labels(etype).inc()
    if account is not None:
        body["account"] = account
    return (when if when is not None else time.time(), etype, account, _encode(body))


def read(spool: Spool, after: int, limit: int) -> dict[str, Any]:
    """The answer of the `events` op: events after a cursor, and the cursor to ask from next."""
    limit = max(1, min(limit, MAX_PAGE))
    events = []
    last = after
    for cursor, when, etype, body in spool.events(after, limit):
        event = {"cursor": cursor, "type": etype, "time": iso(when)}
        event.update(_decode.decode(body))
        events.append(event)
        last = cursor
    return {"ok": True, "events": events, "next": last}
