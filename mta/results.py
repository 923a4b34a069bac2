"""Every outcome goes through one function: `Results.record(Disposition) -> Verdict`.

It decides what happens next (done, retry at T, expire), and feeds the spool state, the
event feed, metrics, the log and the listeners (policy counters) from the same place,
so nothing is counted twice or missed (DESIGN.md, principle 5).

Spool writes are coalesced: everything recorded within FLUSH_DELAY goes to the writer as
one operation, which commits with whatever else is pending. Nothing waits for these
writes (no one is told "delivered" before they commit); batching them saves a hand-over
to the writer thread, a GIL switch and a log-file write per message at full speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from . import metrics
from .accounting import AccountingLog
from .bounce.analyse import classify_reply
from .config import Config
from .events import event_row
from .logs import get as get_logger
from .logs import redact
from .queue.spool import Spool, append_events, set_deferred, set_final
from .types import Classification, Disposition, Outcome, State, Verdict, WriteOp

log = get_logger("mta.delivery")
FLUSH_DELAY = 0.005  # seconds
Listener = Callable[[Disposition, Outcome, Classification | None], None]


def _write_outcomes(conn: Any, finals: list[tuple[int, int]], deferrals: list[tuple[int, float, int]],
                    events: list[tuple[float, str, str | None, bytes]], extras: list[WriteOp]) -> None:
    for fn, args in extras:  # the listeners' own writes (policy counters) about these outcomes
        fn(conn, *args)
    if finals:
        set_final(conn, finals)
    if deferrals:
        set_deferred(conn, deferrals)
    if events:
        append_events(conn, events)


class Results:
    def __init__(self, spool: Spool, config: Config, address_hash: Callable[[str], str],
                 clock: Callable[[], float] = time.time, accounting: AccountingLog | None = None):
        self.spool = spool
        self.accounting = accounting
        self._accounting: list[dict[str, object]] = []
        self.config = config
        self.address_hash = address_hash
        self.clock = clock
        self.listeners: list[Listener] = []
        # writes the listeners owe for what they were told, taken at each flush so they
        # commit in the same transaction as the outcomes behind them
        self.write_hooks: list[Callable[[], list[WriteOp]]] = []
        self._finals: list[tuple[int, int]] = []
        self._deferrals: list[tuple[int, float, int]] = []
        self._events: list[tuple[float, str, str | None, bytes]] = []
        self._flush_scheduled = False
        # deleted accounts and erased addresses (keyed hashes): an outcome of a message that
        # was on the wire when it happened is recorded without the address (SPEC §12)
        self._forgotten_accounts: set[str] = set()
        self._erased: set[str] = set()
        self.counts = {o.value: 0 for o in Outcome}

    def forget_account(self, account: str) -> None:
        self._forgotten_accounts.add(account)

    def forget_address(self, rhash: str) -> None:
        self._erased.add(rhash)

    def record(self, d: Disposition) -> Verdict:
        row, job = d.row, d.row.job
        now = self.clock()
        outcome = d.outcome
        cls = d.classification
        verdict = Verdict(final=True)
        if outcome is not Outcome.DELIVERED and cls is None:
            cls = classify_reply(d.reply)
        if outcome is Outcome.DEFERRED:
            attempts = row.attempts + 1
            if now - job.created >= self.config.max_age:
                outcome = Outcome.EXPIRED
                cls = Classification("soft", "expired")
            else:
                schedule = self.config.retry_schedule
                retry_at = now + schedule[min(attempts, len(schedule)) - 1]
                self._deferrals.append((attempts, retry_at, row.rowid))
                verdict = Verdict(final=False, retry_at=retry_at)
        if verdict.final:
            state = {Outcome.DELIVERED: State.DELIVERED, Outcome.BOUNCED: State.BOUNCED,
                     Outcome.EXPIRED: State.EXPIRED}[outcome]
            self._finals.append((int(state), row.rowid))
        body: dict[str, Any] = {"campaign": job.campaign, "job_id": job.job_id, "recipient": row.email,
                                "code": d.reply.line()}
        if cls is not None:
            body["kind"] = cls.kind
            body["reason"] = cls.reason
        if outcome is not Outcome.DELIVERED:
            body["attempts"] = row.attempts + 1
        rcpt_hash = self.address_hash(row.email)  # one HMAC per outcome, for the log and accounting
        if rcpt_hash in self._erased:
            body["recipient"], body["code"] = None, str(d.reply.code)
            body["recipient_hash"] = rcpt_hash
        if job.account not in self._forgotten_accounts:
            self._events.append(event_row(outcome.value, job.account, body, now))
        if verdict.final and self.accounting is not None:
            self._accounting.append({"time": now, "result": outcome.value, "account": job.account,
                                     "campaign": job.campaign, "job_id": job.job_id,
                                     "sending_domain": job.sending_domain, "provider": d.provider,
                                     "rcpt_domain": row.domain, "rcpt_hash": rcpt_hash,
                                     "attempts": row.attempts + 1, "code": d.reply.code,
                                     "reason": cls.reason if cls else None})
        self.counts[outcome.value] += 1
        metrics.DELIVERIES.labels(job.sending_domain, d.provider, outcome.value).inc()
        if outcome is Outcome.DELIVERED:
            metrics.LATENCY.observe(d.latency)
        elif outcome in (Outcome.BOUNCED, Outcome.EXPIRED) and cls is not None:
            metrics.BOUNCES.labels(cls.kind, cls.reason).inc()
        log.info("delivery", result=outcome.value, account=job.account, campaign=job.campaign,
                 sending_domain=job.sending_domain, provider=d.provider, rcpt_domain=row.domain,
                 rcpt_hash=rcpt_hash, attempt=row.attempts + 1, stage=d.reply.stage,
                 reply=redact(d.reply.line()[:300], row.email), kind=cls.kind if cls else None,
                 reason=cls.reason if cls else None,
                 retry_at=verdict.retry_at or None)
        for listener in self.listeners:
            listener(d, outcome, cls)
        self._schedule_flush()
        return verdict

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if not (self._finals or self._deferrals or self._events or self._accounting):
            return
        finals, deferrals, events = self._finals, self._deferrals, self._events
        self._finals, self._deferrals, self._events = [], [], []
        extras = [op for hook in self.write_hooks for op in hook()]
        self.spool.post(_write_outcomes, finals, deferrals, events, extras)
        if self._accounting and self.accounting is not None:
            records, self._accounting = self._accounting, []
            self.accounting.write(records)
