"""What comes back after delivery: asynchronous bounces, complaints and unsubscribes.

Every such signal, from the listener or from a campaign system's `event` op, goes through
`Returns.record`: at most once per message and type, it appends the event (complaints
with a keyed hash, never the address: SPEC §8), updates the suppression lists, counts the
metric, logs one line and tells the listeners (the account policy's campaign counters).

Suppression is kept in memory as sets of keyed address hashes (one per account, `*` for
the global list) so that a submission checks each recipient in O(1); the spool table is
the durable copy and keeps the address only while it is known (SPEC §12).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .events import event_row
from .logs import get as get_logger
from .queue.spool import Spool, add_return, append_events, delete_suppression, put_suppression
from .types import Classification, Disposition, Outcome, WriteOp

log = get_logger("mta.returns")

GLOBAL = "*"
# user-unknown and host-unknown hard bounces also go to the global list (SPEC §7)
GLOBAL_REASONS = frozenset({"userunknown", "hostunknown"})
# ARF feedback types that are a request not to be mailed again (SPEC §1: abuse, fraud,
# virus, other count as abuse; opt-out as an unsubscribe; auth-failure and not-spam as neither)
SUPPRESSING_FEEDBACK = frozenset({"abuse", "fraud", "virus", "other", "opt-out"})


@dataclass(frozen=True, slots=True)
class Signal:
    """One bounce, complaint or unsubscribe about one message."""

    type: str                       # bounced | complained | unsubscribed
    account: str
    campaign: str
    rhash: str                      # keyed hash of the recipient's address
    address: str | None = None      # the address when known (never written for complaints)
    job_id: str | None = None
    recipient_row: int | None = None
    kind: str | None = None         # bounced: hard | soft
    reason: str | None = None       # bounced: sisimai reason
    code: str | None = None         # bounced: status / diagnostic
    feedback_type: str | None = None
    source: str = "listener"        # listener | campaign_system


Listener = Callable[[Signal], None]
SuppressionRow = tuple[str, str, str | None, str, float]  # account (or *), hash, address, reason, time


class Suppression:
    """Keyed hashes per account (and `*`), with the address while it is known."""

    def __init__(self) -> None:
        self._hashes: dict[str, set[str]] = defaultdict(set)
        self._entries: dict[tuple[str, str], tuple[str | None, str, float]] = {}

    def load(self, rows: Any) -> None:
        for account, rhash, address, reason, when in rows:
            self.add(account, rhash, address, reason, when)

    def add(self, account: str, rhash: str, address: str | None, reason: str, when: float) -> bool:
        key = (account, rhash)
        old = self._entries.get(key)
        if old is not None:
            if address and not old[0]:
                self._entries[key] = (address, old[1], old[2])
            return False
        self._hashes[account].add(rhash)
        self._entries[key] = (address, reason, when)
        return True

    def is_suppressed(self, account: str, rhash: str) -> bool:
        return rhash in self._hashes.get(account, ()) or rhash in self._hashes.get(GLOBAL, ())

    def remove(self, account: str, rhash: str) -> bool:
        self._hashes.get(account, set()).discard(rhash)
        return self._entries.pop((account, rhash), None) is not None

    def drop_account(self, account: str) -> None:
        self._hashes.pop(account, None)
        for key in [k for k in self._entries if k[0] == account]:
            del self._entries[key]

    def erase(self, rhash: str, when: float) -> None:
        """An erased address: suppressed everywhere, known only by its hash (SPEC §12)."""
        for key, (address, reason, time_) in list(self._entries.items()):
            if key[1] == rhash and address is not None:
                self._entries[key] = (None, reason, time_)
        self.add(GLOBAL, rhash, None, "erased", when)

    def forget_addresses(self, before: float) -> None:
        """Entries older than the retention keep only their hash."""
        for key, (address, reason, when) in list(self._entries.items()):
            if address is not None and when < before:
                self._entries[key] = (None, reason, when)

    def entries(self, account: str | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for (acct, rhash), (address, reason, when) in self._entries.items():
            if account is None or acct == account:
                out.append({"account": None if acct == GLOBAL else acct, "address": address,
                            "hash": rhash, "reason": reason, "time": when})
        out.sort(key=lambda e: e["time"])
        return out


class Returns:
    def __init__(self, spool: Spool, address_hash: Callable[[str], str], clock: Callable[[], float] = time.time):
        self.spool = spool
        self.address_hash = address_hash
        self.clock = clock
        self.suppression = Suppression()
        self.listeners: list[Listener] = []
        # writes a listener owes for a signal (policy counters), done in the signal's own
        # transaction and only if it is not a repeat
        self.write_hooks: list[Callable[[Signal], list[WriteOp]]] = []
        self._pending: list[tuple[str, str, str | None, str, float]] = []  # in-session hard bounces
        # cluster mode (sharing/suppression.py): new entries and removals go to the other nodes
        self.on_suppress: list[Callable[[list[SuppressionRow]], None]] = []
        self.on_unsuppress: list[Callable[[str, str], None]] = []

    def load(self) -> None:
        """The suppression lists from the spool."""
        self.suppression.load(self.spool.suppression())

    def is_suppressed(self, account: str, rhash: str) -> bool:
        return self.suppression.is_suppressed(account, rhash)

    async def record(self, s: Signal) -> bool:
        """Record a signal durably; False when this message already had one of this type."""
        now = self.clock()
        body: dict[str, Any] = {"campaign": s.campaign, "source": s.source}
        if s.job_id is not None:
            body["job_id"] = s.job_id
        if s.type == "complained":
            body["recipient_hash"] = s.rhash          # SPEC §8: never the complainer's address
            body["feedback_type"] = s.feedback_type
        else:
            body["recipient"] = s.address
            if s.address is None:
                body["recipient_hash"] = s.rhash
        if s.type == "bounced":
            body.update({"kind": s.kind, "reason": s.reason, "code": s.code, "async": True})
        suppress = self._suppressions(s, now)
        events = [event_row(s.type, s.account, body, now)]
        # the spool's (recipient, type) key decides what is a repeat (receivers resend DSNs)
        extras = [op for hook in self.write_hooks for op in hook(s)]
        if not await self.spool.transact(_write, events, suppress, s.recipient_row, s.type, extras):
            log.info("return_duplicate", type=s.type, account=s.account, campaign=s.campaign)
            return False
        self._added([row for row in suppress if self.suppression.add(*row)])
        if s.type == "bounced":
            metrics.BOUNCES.labels(s.kind or "soft", s.reason or "undefined").inc()
        elif s.type == "complained":
            metrics.COMPLAINTS.labels(s.feedback_type or "abuse").inc()
        else:
            metrics.UNSUBSCRIBES.inc()
        log.info("return", type=s.type, source=s.source, account=s.account, campaign=s.campaign,
                 rcpt_hash=s.rhash, kind=s.kind, reason=s.reason, feedback_type=s.feedback_type,
                 suppressed=[a for a, *_ in suppress])
        for listener in self.listeners:
            listener(s)
        return True

    def on_outcome(self, d: Disposition, outcome: Outcome, cls: Classification | None) -> None:
        """Results listener: a hard bounce in the SMTP session suppresses like a DSN does
        (SPEC §7). In memory at once; durable with the results batch (`take_writes`)."""
        if outcome is not Outcome.BOUNCED or cls is None or cls.kind != "hard":
            return
        job = d.row.job
        s = Signal("bounced", job.account, job.campaign, self.address_hash(d.row.email), d.row.email.lower(),
                   kind=cls.kind, reason=cls.reason, source="smtp")
        added = [row for row in self._suppressions(s, self.clock()) if self.suppression.add(*row)]
        self._pending += added
        self._added(added)

    def _added(self, rows: list[SuppressionRow]) -> None:
        if rows:
            for hook in self.on_suppress:
                hook(rows)

    def apply_remote(self, rows: list[SuppressionRow]) -> None:
        """Entries another node added (hash only): suppressed here at once, durable soon."""
        new = [row for row in rows if self.suppression.add(*row)]
        if new:
            self.spool.post(put_suppression, new)

    def remove_remote(self, account: str, rhash: str) -> None:
        if self.suppression.remove(account, rhash):
            self.spool.post(delete_suppression, account, [rhash])

    def take_writes(self) -> list[WriteOp]:
        if not self._pending:
            return []
        rows, self._pending = self._pending, []
        return [(put_suppression, (rows,))]

    def _suppressions(self, s: Signal, now: float) -> list[tuple[str, str, str | None, str, float]]:
        address = None if s.type == "complained" else s.address
        if s.type == "bounced":
            if s.kind != "hard":
                return []
            rows = [(s.account, s.rhash, address, f"hard:{s.reason}", now)]
            if s.reason in GLOBAL_REASONS:
                rows.append((GLOBAL, s.rhash, address, f"hard:{s.reason}", now))
            return rows
        if s.type == "complained":
            if (s.feedback_type or "abuse") not in SUPPRESSING_FEEDBACK:
                return []
            return [(s.account, s.rhash, None, f"complaint:{s.feedback_type or 'abuse'}", now)]
        return [(s.account, s.rhash, address, "unsubscribe", now)]

    async def add(self, account: str | None, address: str, reason: str = "admin") -> dict[str, Any]:
        rhash = self.address_hash(address)
        row = (account or GLOBAL, rhash, address.strip().lower(), reason, self.clock())
        await self.spool.transact(put_suppression, [row])
        added = self.suppression.add(*row)
        self._added([row] if added else [])
        return {"account": account, "hash": rhash, "added": added}

    async def remove(self, account: str | None, address: str) -> dict[str, Any]:
        key = address.strip().lower()
        rhash = key if len(key) == 32 and "@" not in key else self.address_hash(key)
        await self.spool.transact(delete_suppression, account or GLOBAL, [rhash])
        for hook in self.on_unsuppress:
            hook(account or GLOBAL, rhash)
        return {"account": account, "hash": rhash, "removed": self.suppression.remove(account or GLOBAL, rhash)}


def _write(conn: Any, events: list[tuple[float, str, str | None, bytes]],
           suppress: list[tuple[str, str, str | None, str, float]], recipient_row: int | None, stype: str,
           extras: list[WriteOp]) -> bool:
    """Everything a signal writes, in one transaction; False (and nothing written) for a repeat."""
    if recipient_row is not None and not add_return(conn, recipient_row, stype):
        return False
    append_events(conn, events)
    for fn, args in extras:
        fn(conn, *args)
    if suppress:
        put_suppression(conn, suppress)
    return True

