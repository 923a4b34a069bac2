"""Scheduled queues: `account:campaign@destination` (per sending domain) own retries, expiry
timing and holds (DESIGN.md, principle 2).

Memory per queued recipient is one 8-byte row id in an array, never a Python object:
rows are loaded from the spool in small windows just before they are sent. Deferred
recipients wait in one heap, and one timer wakes the scheduler when the earliest is due
(no per-message timers, no polling).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from array import array
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ..types import (
    Classification,
    Disposition,
    JobInfo,
    Outcome,
    RecipientRow,
    Reply,
    RouteError,
    Verdict,
)
from .spool import Spool

if TYPE_CHECKING:
    from .ready import ReadyQueue

log = logging.getLogger("mta.scheduler")
PREFETCH = 64
QueueKey = tuple[str, str, str, str]  # account, campaign, sending domain, destination domain
_decode_vars = msgspec.json.Decoder(dict[str, str])


class IdQueue:
    """A FIFO of row ids in a compact array (8 bytes per entry)."""

    __slots__ = ("_head", "_ids")

    def __init__(self) -> None:
        self._ids = array("q")
        self._head = 0

    def push(self, rowid: int) -> None:
        self._ids.append(rowid)

    def extend(self, rowids: Iterable[int]) -> None:
        self._ids.extend(rowids)

    def take(self, n: int) -> list[int]:
        out = self._ids[self._head:self._head + n].tolist()
        self._head += len(out)
        if self._head > 4096 and self._head * 2 > len(self._ids):
            del self._ids[:self._head]  # compact once the consumed head dominates
            self._head = 0
        return out

    def __len__(self) -> int:
        return len(self._ids) - self._head


class ScheduledQueue:
    __slots__ = ("account", "campaign", "domain", "ids", "in_ready", "key", "loaded", "ready", "routing",
                 "sending_domain", "waiting")

    def __init__(self, key: QueueKey):
        self.key = key
        self.account, self.campaign, self.sending_domain, self.domain = key
        self.ids = IdQueue()
        self.loaded: deque[RecipientRow] = deque()
        self.ready: ReadyQueue | None = None
        self.routing = False
        self.in_ready = False
        self.waiting = 0  # recipients of this queue in the retry heap

    def __len__(self) -> int:
        return len(self.ids) + len(self.loaded)

    @property
    def name(self) -> str:
        return f"{self.account}:{self.campaign}@{self.domain}"


class Router(Protocol):
    async def route(self, sq: ScheduledQueue) -> ReadyQueue: ...


Record = Callable[[Disposition], Verdict]


class Scheduler:
    def __init__(self, spool: Spool, record: Record, is_held: Callable[[str], bool],
                 clock: Callable[[], float] = time.time):
        self.spool = spool
        self.record = record
        self.is_held = is_held
        self.clock = clock
        self.router: Router | None = None
        self.jobs: dict[int, JobInfo] = {}
        self.queues: dict[QueueKey, ScheduledQueue] = {}
        self._timers: list[tuple[float, int, QueueKey]] = []
        self._timer_handle: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False  # set on SIGTERM: finish in-flight transactions, start no new ones

    # -- entry points -----------------------------------------------------------
    def add(self, job: JobInfo, items: Iterable[tuple[int, str]]) -> None:
        """Newly spooled recipients (row id, destination domain) of a job."""
        self.jobs[job.rowid] = job
        by_domain: dict[str, list[int]] = {}  # a job's 10,000 recipients share a few domains
        for rowid, domain in items:
            ids = by_domain.get(domain)
            if ids is None:
                ids = by_domain[domain] = []
            ids.append(rowid)
        for domain, rowids in by_domain.items():
            sq = self._queue((job.account, job.campaign, job.sending_domain, domain))
            sq.ids.extend(rowids)
            self.activate(sq)

    def recover(self) -> int:
        """Load every queued recipient from the spool after a start or a crash."""
        self.jobs.update(self.spool.jobs())
        now = self.clock()
        n = 0
        for ref in self.spool.queued():
            job = self.jobs.get(ref.job)
            if job is None:
                continue
            key = (job.account, job.campaign, job.sending_domain, ref.domain)
            sq = self._queue(key)
            if ref.next_at > now:
                sq.waiting += 1
                self._timers.append((ref.next_at, ref.rowid, key))
            else:
                sq.ids.push(ref.rowid)
            n += 1
        heapq.heapify(self._timers)
        for sq in list(self.queues.values()):
            self.activate(sq)
        self._arm_timer()
        return n

    def release(self, account: str) -> None:
        """An account's hold ended (resume, approve): its queues go back to work."""
        for sq in list(self.queues.values()):
            if sq.account == account:
                self.activate(sq)

    def drop_account(self, account: str) -> None:
        """A deleted account: its queues and retry timers go (the spool rows are gone)."""
        for key in [k for k in self.queues if k[0] == account]:
            sq = self.queues.pop(key)
            sq.loaded.clear()
            sq.ids = IdQueue()
        kept = [t for t in self._timers if t[2][0] != account]
        if len(kept) != len(self._timers):
            self._timers = kept
            heapq.heapify(self._timers)

    def forget_address(self, address: str) -> None:
        """An erased address: drop its messages from the prefetched windows (those still in the
        spool are cancelled there, and a cancelled row is never loaded)."""
        for sq in self.queues.values():
            if sq.loaded and any(r.email.lower() == address for r in sq.loaded):
                sq.loaded = deque(r for r in sq.loaded if r.email.lower() != address)

    # -- queues -------------------------------------------------------------------
    def _queue(self, key: QueueKey) -> ScheduledQueue:
        sq = self.queues.get(key)
        if sq is None:
            sq = self.queues[key] = ScheduledQueue(key)
        return sq

    def activate(self, sq: ScheduledQueue) -> None:
        if not len(sq) or self.is_held(sq.account):
            return
        if sq.ready is not None:
            sq.ready.offer(sq)
            return
        if sq.routing or self.router is None:
            return
        sq.routing = True
        self._spawn(self._route(sq))

    async def _route(self, sq: ScheduledQueue) -> None:
        assert self.router is not None
        try:
            rq = await self.router.route(sq)
        except RouteError as exc:
            self._fail_all(sq, exc)
            return
        finally:
            sq.routing = False
        sq.ready = rq
        rq.offer(sq)

    def _fail_all(self, sq: ScheduledQueue, exc: RouteError) -> None:
        """DNS said no (or not now) for a destination: every queued recipient shares the fate."""
        outcome = Outcome.BOUNCED if exc.permanent else Outcome.DEFERRED
        kind = "hard" if exc.permanent and exc.reason in ("hostunknown", "notaccept") else "soft"
        while (row := self.pop_row(sq)) is not None:
            self.settle(row, outcome, exc.reply, "dns", Classification(kind, exc.reason))
        self._forget_if_idle(sq)

    def detach(self, sq: ScheduledQueue) -> None:
        """The ready queue let go of sq (empty or held); the next activation routes again."""
        sq.in_ready = False
        sq.ready = None
        self._forget_if_idle(sq)

    def _forget_if_idle(self, sq: ScheduledQueue) -> None:
        if not len(sq) and not sq.waiting and not sq.routing and not sq.in_ready:
            self.queues.pop(sq.key, None)

    def pop_row(self, sq: ScheduledQueue) -> RecipientRow | None:
        """The next recipient of sq, loading a small window from the spool when needed."""
        while not sq.loaded:
            ids = sq.ids.take(PREFETCH)
            if not ids:
                return None
            for rowid, job_row, idx, email, domain, vars_blob, attempts in self.spool.load_queued(ids):
                job = self.jobs.get(job_row) or self.spool.job(job_row)
                if job is None:
                    continue
                self.jobs[job_row] = job
                try:
                    values = _decode_vars.decode(vars_blob)
                except (msgspec.DecodeError, TypeError):
                    self._quarantine(RecipientRow(rowid, job, idx, email or "", domain, {}, attempts))
                    continue
                sq.loaded.append(RecipientRow(rowid, job, idx, email, domain, values, attempts))
        return sq.loaded.popleft()

    def _quarantine(self, row: RecipientRow) -> None:
        """A spool record that cannot be read (a damaged disk, a bug): reported and taken out of
        the queue as a bounce, never retried in a loop and never a crash (DESIGN.md, principle 7)."""
        log.error("spool record %s of job %s is unreadable; bounced as systemerror", row.rowid, row.job.job_id)
        self.settle(row, Outcome.BOUNCED, Reply(554, "5.3.0 spool record unreadable (quarantined)", "local"),
                    "local", Classification("soft", "systemerror"))

    # -- outcomes -----------------------------------------------------------------
    def settle(self, row: RecipientRow, outcome: Outcome, reply: Reply, provider: str,
               classification: Classification | None = None, latency: float = 0.0) -> None:
        verdict = self.record(Disposition(row, outcome, reply, provider, classification, latency))
        if not verdict.final:
            self.retry(row, verdict.retry_at)

    def retry(self, row: RecipientRow, at: float) -> None:
        job = row.job
        key = (job.account, job.campaign, job.sending_domain, row.domain)
        sq = self._queue(key)
        sq.waiting += 1
        heapq.heappush(self._timers, (at, row.rowid, key))
        self._arm_timer()

    def _arm_timer(self) -> None:
        if not self._timers:
            return
        due = self._timers[0][0]
        if self._timer_handle is not None and not self._timer_handle.cancelled():
            if self._timer_due <= due:
                return
            self._timer_handle.cancel()
        loop = asyncio.get_running_loop()
        self._timer_due = due
        self._timer_handle = loop.call_at(loop.time() + max(0.0, due - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer_handle = None
        now = self.clock()
        woken: dict[QueueKey, ScheduledQueue] = {}
        while self._timers and self._timers[0][0] <= now:
            _, rowid, key = heapq.heappop(self._timers)
            sq = self._queue(key)
            sq.waiting -= 1
            sq.ids.push(rowid)
            woken[key] = sq
        for sq in woken.values():
            self.activate(sq)
        self._arm_timer()

    # -- bookkeeping ----------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def deferred_keys(self) -> Iterable[QueueKey]:
        """The queue key of every recipient waiting for a retry (admin summaries)."""
        return (key for _, _, key in self._timers)

    def depth(self) -> dict[str, int]:
        ready = sum(len(sq) for sq in self.queues.values())
        waiting = len(self._timers)
        held = sum(len(sq) for sq in self.queues.values() if self.is_held(sq.account))
        return {"ready": ready - held, "deferred": waiting, "held": held}

    def stop(self) -> None:
        if self._timer_handle is not None:
            self._timer_handle.cancel()
            self._timer_handle = None
        for task in list(self._tasks):
            task.cancel()
