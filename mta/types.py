"""Shared vocabulary of the pipeline: what flows from submit through delivery to results.

Only plain data lives here, so every stage can import it without importing another stage.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

# A spool write to run inside someone else's transaction: (fn(conn, *args), args).
WriteOp = tuple[Callable[..., Any], tuple[Any, ...]]
# A recipient as a job brings it to the spool: (index in the job, address, A-label domain,
# variables as JSON, keyed hash of the address). Raw: the JSON goes into the spool's insert
# as it is, without another copy or conversion per row.
NewRecipient = tuple[int, str, str, msgspec.Raw, str]


class Content(msgspec.Struct, omit_defaults=True):
    """What is stored once per job and rendered per recipient (the spool's template blob)."""

    from_: str | None = msgspec.field(default=None, name="from")
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    raw: str | None = None
    headers: dict[str, str] = {}
    list_unsubscribe_url: str | None = None
    # The daemon's own notices (policy): no List-Unsubscribe, no footer. Never taken from a
    # submitted job (submit.job.content_of does not copy it).
    transactional: bool = False


class State(enum.IntEnum):
    """A recipient row's state in the spool. QUEUED is the only non-final one."""

    QUEUED = 0
    DELIVERED = 1
    BOUNCED = 2
    EXPIRED = 3
    CANCELLED = 4  # removed by an admin (account deletion, erasure, review rejection)


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class JobInfo:
    """What the scheduler and results need about a job (one object per job, not per recipient)."""

    rowid: int
    account: str
    job_id: str
    campaign: str
    sending_domain: str
    created: float


@dataclass(slots=True)
class RecipientRow:
    """One queued recipient as loaded from the spool for sending (a bounded prefetch window)."""

    rowid: int
    job: JobInfo
    idx: int
    email: str
    domain: str
    vars: dict[str, str]
    attempts: int


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply, or a local failure expressed as one (code 0: no reply at all)."""

    code: int
    text: str
    stage: str = "rcpt"  # connect | mail | rcpt | data | dns | local

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status code at the start of the text, or ''."""
        head = self.text.split(" ", 1)[0]
        parts = head.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and head[0] in "245":
            return head
        return ""

    def line(self) -> str:
        return f"{self.code} {self.text}".strip() if self.code else self.text


@dataclass(frozen=True, slots=True)
class Classification:
    kind: str  # hard | soft
    reason: str  # sisimai vocabulary


@dataclass(frozen=True, slots=True)
class Disposition:
    """The result of one delivery attempt, handed to results.record()."""

    row: RecipientRow
    outcome: Outcome
    reply: Reply
    provider: str
    classification: Classification | None = None
    latency: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the scheduler does with the recipient next."""

    final: bool
    retry_at: float = 0.0


@dataclass(frozen=True, slots=True)
class MxHost:
    """One MX host with the addresses to try, in order."""

    name: str
    addresses: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Route:
    """Where mail for a destination domain goes: MX hosts in preference order."""

    domain: str
    hosts: tuple[MxHost, ...]

    @property
    def site(self) -> tuple[str, ...]:
        """The MX host set: destination domains that share it share connections."""
        return tuple(h.name for h in self.hosts)


class RouteError(Exception):
    """The destination cannot be resolved; `permanent` decides bounce or defer."""

    def __init__(self, reply: Reply, permanent: bool, reason: str):
        super().__init__(reply.text)
        self.reply = reply
        self.permanent = permanent
        self.reason = reason


class ConnectFailed(Exception):
    """No session could be opened to any MX host of a route."""

    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply
