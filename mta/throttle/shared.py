"""Throttles shared by the cluster (SPEC §10): one provider's rate and connections across nodes.

`SharedLimits` keeps everything of `LocalLimits` that is about this node's view of the
receiver (adaptive backoff, warm-up) and moves the two shared quantities to Redis:

- the rate: every message takes one GCRA cell in Redis (scripts.GCRA), so all nodes
  together never exceed the rule's rate plus its burst;
- connections: every worker holds a lease in a Redis sorted set (scripts.LEASE),
  renewed by the heartbeat, so a node that dies gives its slots back within LEASE_MS.
  When another node waits for a slot, a node above its fair share gives one back after
  the message in hand, so both progress.

While Redis is unavailable the node falls back to its share of the cluster: rate and
connections divided by the number of nodes last seen alive (at least one connection).
That is conservative by design: together the nodes stay within the limits the receiver
set, at the price of using only what a node's share allows until Redis is back.

A node's adaptive backoff is its own: a node that was told to slow down takes cells of a
longer interval, which slows the cluster's rate by its part.
"""

from __future__ import annotations

import itertools
import math
import time

from ..cluster.link import ClusterDown, ClusterLink
from ..cluster.scripts import GCRA, LEASE
from ..config import Backoff as BackoffConfig
from ..config import ShapingRule
from .gcra import Gcra, default_burst
from .limits import UNTHROTTLED_BASE, LocalLimits
from .warmup import WarmupCounter

LEASE_MS = 15000  # a dead node's connection slots come back after this
WANT_MS = 3000    # a node refused a slot counts toward the fair share this long


class SharedLimits(LocalLimits):
    shared = True

    def __init__(self, sending_domain: str, rule: ShapingRule, link: ClusterLink,
                 backoff: BackoffConfig | None = None, warmup: WarmupCounter | None = None,
                 *, server_clock: bool = True):
        super().__init__(sending_domain, rule, backoff, warmup)
        self.link = link
        # Production asks Redis for the time (one clock for all nodes); tests pass their own.
        self.server_clock = server_clock
        self.rate_key = link.key("rate", sending_domain, rule.provider)
        self.conn_key = link.key("conns", sending_domain, rule.provider)
        self.want_key = link.key("wants", sending_domain, rule.provider)
        self.share = rule.max_connections  # this node's fair share, while another node wants slots
        self._lease_ids = (f"{link.node}:{n}" for n in itertools.count())
        self.leases: set[str] = set()
        self._degraded_gcra: Gcra | None = None

    def adopt(self, old: LocalLimits) -> None:
        super().adopt(old)
        if isinstance(old, SharedLimits):
            self.leases = old.leases
            self._lease_ids = old._lease_ids

    def _ms(self, now: float) -> float:
        """The `now` the scripts take: -1 for Redis's own clock, else the caller's, in ms."""
        return -1 if self.server_clock else now * 1000.0

    # -- the rate -------------------------------------------------------------------------
    def cluster_rate(self) -> float | None:
        """The rate the whole cluster may send at, after this node's backoff."""
        if not self.rule.max_rate and self.backoff.fraction >= 1.0:
            return None
        return (self.rule.max_rate or UNTHROTTLED_BASE) * self.backoff.fraction

    def acquire(self, now: float) -> float:
        """The local part: backoff suspension, and while degraded the node's share."""
        suspended = self._suspended(now)
        if suspended:
            return suspended
        if not self.link.up:
            delay = self._degraded_take(now)
            if delay:
                self.waits += 1
                return delay
        return 0.0

    def _degraded_take(self, now: float) -> float:
        rate = self.cluster_rate()
        if rate is None:
            return 0.0
        share = rate / max(1, self.link.nodes)
        g = self._degraded_gcra
        if g is None:
            g = self._degraded_gcra = Gcra.at(share)
        elif g.rate != share:
            g.retune(share)
        return g.acquire(now)

    async def reserve(self, now: float) -> float:
        """The shared part: one GCRA cell in Redis (0.0, or the wait in seconds), then the
        warm-up (counted only for a message that really goes)."""
        wait = await self._cell(now)
        if not wait and self.warmup is not None:
            wait = self.warmup.acquire(now)
        if wait:
            self.waits += 1
        return wait

    async def _cell(self, now: float) -> float:
        rate = self.cluster_rate()
        if rate is None or not self.link.up:
            return 0.0
        interval = 1000.0 / rate
        tolerance = (default_burst(rate) - 1) * interval
        try:
            wait_ms = float(await self.link.script(GCRA, [self.rate_key], [interval, tolerance, self._ms(now)]))
        except ClusterDown:
            return self._degraded_take(now)  # this one message goes by the local share
        return wait_ms / 1000.0

    # -- connections ------------------------------------------------------------------------
    @property
    def max_connections(self) -> int:
        full = max(1, math.ceil(self.rule.max_connections * self.backoff.fraction))
        if self.link.up:
            return full
        return max(1, full // max(1, self.link.nodes))

    async def lease(self) -> str | None:
        """A cluster-wide connection slot for one worker; None when the node has its fair
        share and another node wants one, or all are held."""
        lease_id = next(self._lease_ids)
        if not self.link.up:
            return lease_id  # degraded: the local share (max_connections) already limits us
        try:
            taken = await self._lease_script(lease_id)
        except ClusterDown:
            return lease_id
        if not taken:
            return None
        self.leases.add(lease_id)
        return lease_id

    async def _lease_script(self, lease_id: str) -> bool:
        taken, share, others = await self.link.script(
            LEASE, [self.conn_key, self.want_key],
            [lease_id, self.link.node, self.rule.max_connections, self._ms(time.time()), LEASE_MS, WANT_MS])
        self.share = int(share) if others else self.rule.max_connections
        return bool(taken)

    def should_yield(self) -> bool:
        """Above our fair share while another node waits: a worker gives its slot back."""
        return len(self.leases) > self.share

    async def release(self, lease_id: str) -> None:
        if lease_id not in self.leases:
            return
        self.leases.discard(lease_id)
        try:
            await self.link.call(lambda r: r.zrem(self.conn_key, lease_id))
        except ClusterDown:
            pass  # it lapses by itself

    async def renew(self) -> None:
        """Heartbeat: the leases of live workers stay held, and the fair share is learnt
        again (ClusterDown goes to the link)."""
        for lease_id in list(self.leases):
            await self._lease_script(lease_id)
