"""Throttle state per (sending domain, provider): message rate and connection slots.

One interface, `ProviderLimits`, that the ready queues use: `acquire(now)` is an atomic
check-and-take of one message (0.0 or retry-after seconds); `open_connection()` /
`close_connection()` count sessions against `max_connections`. The local implementation
lives here; the cluster's (throttle/shared.py) adds `reserve` (a cell of the shared rate)
and `lease` (a shared connection slot) behind the same interface.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from ..config import Backoff as BackoffConfig
from ..config import ShapingRule
from ..types import Reply
from .backoff import Backoff, classify
from .gcra import Gcra
from .warmup import WarmupCounter

# A provider without max_rate that answers "slow down" gets this as the rate to cut from.
UNTHROTTLED_BASE = 50.0


class ProviderLimits(Protocol):
    sending_domain: str
    rule: ShapingRule
    shared: bool  # True: `reserve` and `lease` ask the cluster (throttle/shared.py)

    def acquire(self, now: float) -> float: ...
    async def reserve(self, now: float) -> float: ...
    async def lease(self) -> str | None: ...
    async def release(self, lease_id: str) -> None: ...
    def should_yield(self) -> bool: ...
    def observe(self, reply: Reply, now: float) -> str | None: ...
    def state(self, now: float) -> dict[str, object]: ...
    def open_connection(self) -> bool: ...
    def close_connection(self) -> None: ...
    def wait_for_connection(self, wake: Callable[[], None]) -> None: ...
    @property
    def connections(self) -> int: ...


class LocalLimits:
    shared = False

    def __init__(self, sending_domain: str, rule: ShapingRule, backoff: BackoffConfig | None = None,
                 warmup: WarmupCounter | None = None):
        self.sending_domain = sending_domain
        self.rule = rule
        self.warmup = warmup
        cfg = backoff or BackoffConfig()
        self.backoff = Backoff(min_fraction=cfg.min_rate_fraction, hold=cfg.hold, recovery_step=cfg.recovery_step)
        self.gcra = Gcra.at(rule.max_rate) if rule.max_rate else None
        self._connections = 0
        # ready queues waiting for a connection slot, in arrival order (a dict as an ordered set:
        # O(1) membership, which matters with thousands of destination sites)
        self._waiting: dict[Callable[[], None], None] = {}
        self.waits = 0  # how often a sender had to wait for the rate (metrics)

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def current_rate(self) -> float | None:
        return self.gcra.rate if self.gcra is not None else None

    @property
    def max_connections(self) -> int:
        """The rule's connections, scaled down with the backoff fraction (at least one)."""
        return max(1, math.ceil(self.rule.max_connections * self.backoff.fraction))

    def _apply_fraction(self) -> None:
        base = self.rule.max_rate or UNTHROTTLED_BASE
        if self.backoff.fraction >= 1.0 and not self.rule.max_rate:
            self.gcra = None  # fully recovered: unthrottled again
            return
        rate = base * self.backoff.fraction
        if self.gcra is None:
            self.gcra = Gcra.at(rate)
        else:
            self.gcra.retune(rate)

    def _suspended(self, now: float) -> float:
        """Adaptive backoff's part of every acquire: recover on schedule, else the suspension."""
        if self.backoff.recover(now):
            self._apply_fraction()
        suspended = self.backoff.wait(now)
        if suspended:
            self.waits += 1
        return suspended

    def acquire(self, now: float) -> float:
        suspended = self._suspended(now)
        if suspended:
            return suspended
        if self.gcra is not None:
            delay = self.gcra.peek(now)
            if delay:
                self.waits += 1
                return delay
        if self.warmup is not None:
            delay = self.warmup.acquire(now)
            if delay:
                self.waits += 1
                return delay
        if self.gcra is not None:
            self.gcra.acquire(now)  # peeked free above; the loop thread owns this state
        return 0.0

    def adopt(self, old: LocalLimits) -> None:
        """A reload replaced the rule: carry over the live connection count, the queues
        waiting for a slot and the backoff (subclasses add their own state)."""
        self._connections = old._connections
        self._waiting = old._waiting
        self.backoff = old.backoff
        if old.backoff.fraction < 1.0:
            self._apply_fraction()

    async def reserve(self, now: float) -> float:
        return 0.0  # everything was decided by acquire(); only shared limits ask further

    async def lease(self) -> str | None:
        return ""  # a local slot was taken by open_connection()

    async def release(self, lease_id: str) -> None:
        return None

    def should_yield(self) -> bool:
        return False  # only a cluster's fair share takes a slot back

    def observe(self, reply: Reply, now: float) -> str | None:
        """Feed a receiver's reply to adaptive backoff; returns the decision taken, if any."""
        decision = self.backoff.observe(classify(reply), now)
        if decision is not None:
            self._apply_fraction()
        return decision

    def state(self, now: float) -> dict[str, object]:
        return {"sending_domain": self.sending_domain, "provider": self.rule.provider,
                "max_rate": self.rule.max_rate, "current_rate": self.current_rate,
                "fraction": round(self.backoff.fraction, 3), "suspended_for": round(self.backoff.wait(now), 1),
                "connections": self._connections, "max_connections": self.max_connections,
                "decisions": self.backoff.decisions}

    def open_connection(self) -> bool:
        if self._connections >= self.max_connections:
            return False
        self._connections += 1
        return True

    def close_connection(self) -> None:
        self._connections = max(0, self._connections - 1)
        # A freed slot goes to a ready queue that waited for one (FIFO: fair between sites).
        while self._waiting and self._connections < self.max_connections:
            wake = next(iter(self._waiting))
            del self._waiting[wake]
            wake()

    def wait_for_connection(self, wake: Callable[[], None]) -> None:
        self._waiting.setdefault(wake, None)


MakeLimits = Callable[[str, ShapingRule, BackoffConfig, "WarmupCounter | None"], LocalLimits]


class Throttles:
    """Registry of limits, one per (sending domain, provider)."""

    def __init__(self, backoff: BackoffConfig | None = None,
                 warmups: dict[str, WarmupCounter] | None = None, make: MakeLimits | None = None) -> None:
        self.backoff = backoff or BackoffConfig()
        self.warmups = warmups or {}  # per sending domain, shared by all its providers
        self.make: MakeLimits = make or LocalLimits  # cluster mode: SharedLimits bound to the link
        self._limits: dict[tuple[str, str], LocalLimits] = {}

    def reconfigure(self, backoff: BackoffConfig, warmups: dict[str, WarmupCounter]) -> None:
        """A reload: new backoff settings and warm-up plans reach the live limits too."""
        self.backoff, self.warmups = backoff, warmups
        for limits in self._limits.values():
            b = limits.backoff
            b.min_fraction, b.hold, b.recovery_step = backoff.min_rate_fraction, backoff.hold, backoff.recovery_step
            limits.warmup = warmups.get(limits.sending_domain)

    def get(self, sending_domain: str, rule: ShapingRule) -> LocalLimits:
        key = (sending_domain, rule.provider)
        limits = self._limits.get(key)
        if limits is None or limits.rule != rule:
            fresh = self.make(sending_domain, rule, self.backoff, self.warmups.get(sending_domain))
            if limits is not None:  # a reload changed the rule: keep the live counts and backoff
                fresh.adopt(limits)
            self._limits[key] = limits = fresh
        return limits

    def all(self) -> list[LocalLimits]:
        return list(self._limits.values())
