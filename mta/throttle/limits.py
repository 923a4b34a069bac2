"""Throttle state per (sending domain, provider): message rate and connection slots.

One interface, `ProviderLimits`, that the ready queues use: `acquire(now)` is an atomic
check-and-take of one message (0.0 or retry-after seconds); `open_connection()` /
`close_connection()` count sessions against `max_connections`. The local implementation
lives here; a Redis-backed one for clusters can implement the same methods with atomic
scripts, so the ready queues never know which one they have.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..config import ShapingRule
from .gcra import Gcra, default_burst


class ProviderLimits(Protocol):
    sending_domain: str
    rule: ShapingRule

    def acquire(self, now: float) -> float: ...
    def open_connection(self) -> bool: ...
    def close_connection(self) -> None: ...
    def wait_for_connection(self, wake: Callable[[], None]) -> None: ...
    @property
    def connections(self) -> int: ...


class LocalLimits:
    def __init__(self, sending_domain: str, rule: ShapingRule):
        self.sending_domain = sending_domain
        self.rule = rule
        self.gcra = Gcra(rule.max_rate, default_burst(rule.max_rate)) if rule.max_rate else None
        self._connections = 0
        self._waiting: deque[Callable[[], None]] = deque()
        self.waits = 0  # how often a sender had to wait for the rate (metrics)

    @property
    def connections(self) -> int:
        return self._connections

    def acquire(self, now: float) -> float:
        if self.gcra is None:
            return 0.0
        delay = self.gcra.acquire(now)
        if delay:
            self.waits += 1
        return delay

    def open_connection(self) -> bool:
        if self._connections >= self.rule.max_connections:
            return False
        self._connections += 1
        return True

    def close_connection(self) -> None:
        self._connections = max(0, self._connections - 1)
        # A freed slot goes to a ready queue that waited for one (FIFO: fair between sites).
        while self._waiting and self._connections < self.rule.max_connections:
            self._waiting.popleft()()

    def wait_for_connection(self, wake: Callable[[], None]) -> None:
        if wake not in self._waiting:
            self._waiting.append(wake)


class Throttles:
    """Registry of limits, one per (sending domain, provider)."""

    def __init__(self) -> None:
        self._limits: dict[tuple[str, str], LocalLimits] = {}

    def get(self, sending_domain: str, rule: ShapingRule) -> LocalLimits:
        key = (sending_domain, rule.provider)
        limits = self._limits.get(key)
        if limits is None or limits.rule != rule:
            fresh = LocalLimits(sending_domain, rule)
            if limits is not None:  # a reload changed the rule: keep the live counts
                fresh._connections = limits._connections
                fresh._waiting = limits._waiting
            self._limits[key] = limits = fresh
        return limits

    def all(self) -> list[LocalLimits]:
        return list(self._limits.values())
