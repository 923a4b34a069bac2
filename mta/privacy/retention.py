"""Retention (SPEC §12): what carries an address is kept for `privacy.retention`, then purged.

A background task, off the delivery path: every pass deletes, in batches, the events
older than the retention that name a recipient, reduces old suppression entries to their
keyed hash, removes addresses from old jobs' stored answers, and truncates the WAL, so
that old page images leave the disk too. A recipient's own row loses its address and
data the moment its delivery is final (`spool.set_final`), not here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from ..logs import get as get_logger
from ..queue.purge import purge_expired
from ..queue.spool import Spool, put_kv
from ..returns import Suppression

log = get_logger("mta.privacy")
KV_PURGED_TO = "privacy:purged_to"  # {"events": cursor, "jobs": row} where the next pass starts


class Retention:
    def __init__(self, spool: Spool, suppression: Suppression, retention: float,
                 clock: Callable[[], float] = time.time):
        self.spool = spool
        self.suppression = suppression
        self.retention = retention
        self.clock = clock
        saved = spool.kv(KV_PURGED_TO)
        position = msgspec.json.decode(saved, type=dict[str, int]) if saved else {}
        self.events_from, self.jobs_from = position.get("events", 0), position.get("jobs", 0)

    @property
    def interval(self) -> float:
        """Often enough that nothing outlives the retention by more than a quarter of it."""
        return max(1.0, min(self.retention / 4, 300.0))

    async def purge_once(self) -> dict[str, int]:
        cutoff = self.clock() - self.retention
        before = (self.events_from, self.jobs_from)
        deleted, self.events_from, hashed, scrubbed, self.jobs_from = await self.spool.transact(
            purge_expired, cutoff, self.events_from, self.jobs_from)
        if (self.events_from, self.jobs_from) != before:
            self.spool.post(put_kv, KV_PURGED_TO,
                            msgspec.json.encode({"events": self.events_from, "jobs": self.jobs_from}))
        if hashed:  # the in-memory entries follow the table, only when it changed
            self.suppression.forget_addresses(before=cutoff)
        # always: final deliveries clear addresses all the time, and their old page images
        # stay in the WAL until it is truncated
        self.spool.truncate_wal()
        if deleted or hashed or scrubbed:
            log.info("retention_purge", events=deleted, suppression_hashed=hashed, answers_scrubbed=scrubbed)
        return {"events": deleted, "suppression_hashed": hashed, "answers_scrubbed": scrubbed}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                while (await self.purge_once())["events"] >= 5000:  # a backlog: keep going
                    await asyncio.sleep(0)
            except Exception as exc:  # the next pass tries again; the daemon keeps delivering
                log.error("retention_purge_failed", error=str(exc))
