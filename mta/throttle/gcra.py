"""GCRA (generic cell rate algorithm): a rate limiter that answers, never sleeps.

State is one number, the theoretical arrival time (TAT). A request at `now` is allowed
when TAT - tolerance <= now; taking it moves TAT one emission interval on. The caller
gets either 0.0 (allowed, taken) or how long until it would be allowed. The clock is the
caller's: tests pass their own times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class Gcra:
    rate: float  # per second
    burst: int = 1  # requests allowed back to back from idle
    tat: float = 0.0

    @property
    def interval(self) -> float:
        return 1.0 / self.rate

    @property
    def tolerance(self) -> float:
        return (self.burst - 1) * self.interval

    def acquire(self, now: float) -> float:
        """Take one request if allowed now (returns 0.0), else return the wait in seconds."""
        tat = self.tat if self.tat > now else now
        allowed_at = tat - self.tolerance
        if allowed_at > now:
            return allowed_at - now
        self.tat = tat + self.interval
        return 0.0

    def peek(self, now: float) -> float:
        tat = self.tat if self.tat > now else now
        return max(0.0, tat - self.tolerance - now)

    def set_rate(self, rate: float) -> None:
        """Change the rate; the time already reserved is kept (no burst from a rate change)."""
        self.rate = rate

    @classmethod
    def at(cls, rate: float) -> Gcra:
        """A limiter for `rate` with the default burst."""
        return cls(rate, default_burst(rate))

    def retune(self, rate: float) -> None:
        """A new rate with its default burst (time already reserved is kept)."""
        self.set_rate(rate)
        self.burst = default_burst(rate)


def default_burst(rate: float) -> int:
    """Requests allowed back to back: 50 ms worth of the rate, at least one.

    Enough to absorb event-loop jitter at high rates, small enough that a 10/s rule
    never shows a burst at the receiver.
    """
    return max(1, math.ceil(rate * 0.05))
