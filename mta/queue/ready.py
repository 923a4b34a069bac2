"""Ready queues: one per (sending domain, provider, destination site) own connections
and rates (DESIGN.md, principle 2).

Scheduled queues with work are served round-robin, one message each in turn, so a
million-recipient campaign and a hundred-recipient one to the same site progress side by
side. Each connection is a worker that takes the next message, asks the throttle (which
answers "now" or "after T", never sleeping itself), and hands the attempt's outcome to
the scheduler. A worker ends as soon as its queue is empty: no idle connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .. import metrics
from ..logs import get as get_logger
from ..logs import redact
from ..throttle.limits import ProviderLimits, Throttles
from ..throttle.shaping import RuleBook
from ..types import ConnectFailed, Outcome, RecipientRow, Reply, Route
from .scheduler import ScheduledQueue, Scheduler

log = logging.getLogger("mta.ready")
decisions_log = get_logger("mta.throttle")
# Close a connection rather than hold it through a throttle wait longer than this.
IDLE_CLOSE = 2.0
LEASE_RETRY = 0.5  # cluster mode: how soon to ask again for a connection slot held elsewhere


class Session(Protocol):
    @property
    def usable(self) -> bool: ...

    async def deliver(self, row: RecipientRow) -> Reply: ...
    async def close(self) -> None: ...


class Dispatcher(Protocol):
    async def connect(self, route: Route, sending_domain: str) -> Session: ...


class Resolver(Protocol):
    async def resolve(self, domain: str) -> Route: ...


def outcome_of(reply: Reply) -> Outcome:
    if 200 <= reply.code < 300:
        return Outcome.DELIVERED
    if 500 <= reply.code < 600:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


class ReadyQueue:
    def __init__(self, key: tuple[str, str, tuple[str, ...]], route: Route, limits: ProviderLimits,
                 dispatcher: Dispatcher, scheduler: Scheduler, clock: Callable[[], float],
                 on_connections: Callable[[str, str, int], None] | None = None):
        self.key = key
        self.sending_domain, self.provider, _ = key
        self.route = route
        self.limits = limits
        self.dispatcher = dispatcher
        self.scheduler = scheduler
        self.clock = clock
        self.on_connections = on_connections
        self.sqs: deque[ScheduledQueue] = deque()
        self.workers = 0
        self.sessions = 0  # workers holding an open session
        self.waiting: set[asyncio.Task[None]] = set()  # workers asleep on a throttle (safe to cancel)

    # -- work ---------------------------------------------------------------------
    def offer(self, sq: ScheduledQueue) -> None:
        if not sq.in_ready:
            sq.in_ready = True
            self.sqs.append(sq)
        self.kick()

    def pending(self) -> int:
        return sum(len(sq) for sq in self.sqs)

    def kick(self) -> None:
        want = self.pending()
        while self.workers < want and self.limits.open_connection():
            self.workers += 1
            asyncio.get_running_loop().create_task(self._worker())
        if self.workers == 0 and want:
            self.limits.wait_for_connection(self.kick)

    def _next_row(self) -> RecipientRow | None:
        """Round-robin over the scheduled queues, one message each in turn."""
        held = self.scheduler.is_held
        while self.sqs:
            sq = self.sqs[0]
            if held(sq.account):
                self.sqs.popleft()
                self.scheduler.detach(sq)
                continue
            row = self.scheduler.pop_row(sq)
            if row is None:
                self.sqs.popleft()
                self.scheduler.detach(sq)
                continue
            self.sqs.rotate(-1)
            return row
        return None

    # -- one connection -------------------------------------------------------------
    async def _worker(self) -> None:
        session: Session | None = None
        sent = 0
        limits = self.limits
        per_connection = limits.rule.max_messages_per_connection
        lease: str | None = None
        try:
            lease = await limits.lease()  # cluster mode: a slot of the provider's cluster-wide connections
            if lease is None:
                return  # all held by other nodes: `finally` asks again shortly
            while self.sqs and not self.scheduler.draining:
                delay = limits.acquire(self.clock())
                if not delay and limits.shared:
                    delay = await limits.reserve(self.clock())
                if delay > 0:
                    if session is not None and delay > IDLE_CLOSE:
                        await self._close(session)
                        session = None
                    await self._sleep(delay)
                    continue
                row = self._next_row()
                if row is None:
                    break
                if session is not None and (sent >= per_connection or not session.usable):
                    await self._close(session)
                    session = None
                if session is None:
                    try:
                        session = await self.dispatcher.connect(self.route, self.sending_domain)
                    except ConnectFailed as exc:
                        self._observe(exc.reply, row.email)
                        self._connect_failed(row, exc.reply)
                        break
                    self.sessions += 1
                    self._report()
                    sent = 0
                started = time.monotonic()
                reply = await session.deliver(row)
                sent += 1
                self._observe(reply, row.email)
                self.scheduler.settle(row, outcome_of(reply), reply, self.provider,
                                      latency=time.monotonic() - started)
                if not session.usable:
                    await self._close(session)
                    session = None
                if limits.shared and limits.should_yield():
                    break  # another node waits for this provider's connections
        except asyncio.CancelledError:
            pass  # drained while waiting for a throttle
        except Exception:
            log.exception("ready queue worker failed for %s", self.key)
        finally:
            if session is not None:
                await self._close(session)
            if lease:
                await limits.release(lease)
            self.workers -= 1
            # the slot goes back to the current limits: a reload that replaced them carried
            # the open-connection count over (Throttles.get)
            self.limits.close_connection()
            if self.sqs and self.workers == 0 and not self.scheduler.draining:
                if lease is None:  # leases carry no wake-up: poll for a slot
                    asyncio.get_running_loop().call_later(LEASE_RETRY, self.kick)
                else:
                    self.kick()

    async def _sleep(self, delay: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.waiting.add(task)
        try:
            await asyncio.sleep(delay)
        finally:
            self.waiting.discard(task)

    def stop_waiting(self) -> None:
        """On drain: workers asleep on a throttle hold no transaction, so they simply end."""
        for task in list(self.waiting):
            task.cancel()

    def _observe(self, reply: Reply, address: str) -> None:
        """Adaptive backoff: every reply is shown to the throttle; decisions are logged and counted."""
        if 200 <= reply.code < 300:
            return
        decision = self.limits.observe(reply, self.clock())
        if decision is not None:
            metrics.BACKOFF.labels(self.sending_domain, self.provider, decision).inc()
            state = self.limits.state(self.clock())
            decisions_log.warning("backoff", decision=decision, sending_domain=self.sending_domain,
                                  provider=self.provider, reply=redact(reply.line()[:200], address),
                                  rate=state.get("current_rate"), fraction=state.get("fraction"),
                                  suspended_for=state.get("suspended_for"))

    async def _close(self, session: Session) -> None:
        self.sessions -= 1
        self._report()
        await session.close()

    def _report(self) -> None:
        if self.on_connections is not None:
            self.on_connections(self.sending_domain, self.provider, self.sessions)

    def _connect_failed(self, row: RecipientRow, reply: Reply) -> None:
        self.scheduler.settle(row, Outcome.DEFERRED, reply, self.provider)
        if self.sessions == 0 and self.workers == 1:
            # The site is unreachable from here: the whole queue defers, each message on
            # its own retry schedule, instead of every message retrying the connection.
            while (other := self._next_row()) is not None:
                self.scheduler.settle(other, Outcome.DEFERRED, reply, self.provider)


class ReadyQueues:
    """The router: destination -> route (DNS) -> shaping rule -> ready queue."""

    def __init__(self, resolver: Resolver, rules: RuleBook, throttles: Throttles, dispatcher: Dispatcher,
                 scheduler: Scheduler, clock: Callable[[], float] = time.time,
                 on_connections: Callable[[str, str, int], None] | None = None):
        self.resolver = resolver
        self.rules = rules
        self.throttles = throttles
        self.dispatcher = dispatcher
        self.scheduler = scheduler
        self.clock = clock
        self.on_connections = on_connections
        self.queues: dict[tuple[str, str, tuple[str, ...]], ReadyQueue] = {}

    async def route(self, sq: ScheduledQueue) -> ReadyQueue:
        route = await self.resolver.resolve(sq.domain)
        rule = self.rules.match(sq.domain, route.site)
        key = (sq.sending_domain, rule.provider, route.site)
        rq = self.queues.get(key)
        limits = self.throttles.get(sq.sending_domain, rule)
        if rq is None:
            rq = self.queues[key] = ReadyQueue(key, route, limits, self.dispatcher, self.scheduler, self.clock,
                                               self.on_connections)
        else:
            rq.route = route  # fresher DNS answer
            rq.limits = limits
        return rq

    def retune(self) -> None:
        """After a reload: each ready queue takes its limits from the new rules at once, and
        its workers asleep on the old throttle wake up (they hold no transaction), so that a
        lifted or tightened limit takes effect now, not when the old wait runs out."""
        for rq in self.queues.values():
            rule = self.rules.match(rq.route.domain, rq.route.site)
            rq.limits = self.throttles.get(rq.sending_domain, rule)
            rq.stop_waiting()

    def stats(self) -> list[dict[str, object]]:
        return [{"sending_domain": k[0], "provider": k[1], "site": list(k[2]), "queued": rq.pending(),
                 "connections": rq.sessions} for k, rq in self.queues.items() if rq.sqs or rq.sessions]
