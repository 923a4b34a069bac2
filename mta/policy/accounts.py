"""Customer accounts (SPEC §1, §2): plan, status, thresholds, and the holds they imply.

Accounts live in memory (a few thousand at most) and are written through to the spool
before a change is acknowledged. An account whose status is not `active` holds its
queued mail: review (new accounts), paused (policy or admin), suspended.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from ..events import event_row
from ..queue.spool import Spool, append_events, put_account

PLANS = ("trial", "free", "monthly", "payg")
STATUSES = ("active", "review", "paused", "suspended")
NEW_ACCOUNT_DAYS = 30
TRIAL_DAYS = 30  # SPEC §1: no sending once the 30-day trial is over
MONTHLY_FACTOR = 109  # SPEC §1: monthly cap = 109 x subscriber level
TRIAL_LIMIT = 100
# The daemon's own mail (policy notices) is queued under this account: never held, never
# judged, never charged. Account ids starting with "_" are reserved for it.
SYSTEM_ACCOUNT = "_mta"


class AccountError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Account(msgspec.Struct):
    id: str
    plan: str
    subscribers: int
    notify: str
    status: str = "review"
    pause_reason: str | None = None
    pause_detail: dict[str, Any] | None = None  # rule, campaign, count, sample, rate, threshold
    hard_bounce_threshold: float | None = None  # None: the plan/age default
    credits: int | None = None
    created: str = ""  # YYYY-MM-DD, the sign-up date as the campaign system knows it
    no_footer: bool = False
    sent_this_month: int = 0
    month: str = ""
    sent_total: int = 0
    rev: int = 0  # revision: cluster mode stores a change only over the revision it was made from

    def age_days(self, now: float) -> float:
        signup = _signup(self.created)
        return 0.0 if signup is None else (now - signup) / 86400.0

    def trial_expired(self, now: float) -> bool:
        return self.plan == "trial" and self.age_days(now) >= TRIAL_DAYS

    def threshold(self, now: float) -> float:
        if self.hard_bounce_threshold is not None:
            return self.hard_bounce_threshold
        young = self.plan == "trial" or self.age_days(now) < NEW_ACCOUNT_DAYS
        return 0.08 if young else 0.15

    @property
    def monthly_cap(self) -> int:
        return MONTHLY_FACTOR * self.subscribers

    def view(self, now: float) -> dict[str, Any]:
        """What `mta accounts show --json` prints (SPEC §2)."""
        this_month = datetime.fromtimestamp(now, UTC).strftime("%Y-%m")
        return {
            "id": self.id, "plan": self.plan, "status": self.status, "pause_reason": self.pause_reason,
            "pause_detail": self.pause_detail,
            "subscribers": self.subscribers,
            "sent_this_month": self.sent_this_month if self.month == this_month else 0,
            "monthly_cap": self.monthly_cap, "hard_bounce_threshold": self.threshold(now),
            "notify": self.notify, "created": self.created, "credits": self.credits,
            "footer": not self.no_footer, "sent_total": self.sent_total,
            **(self._trial(now) if self.plan == "trial" else {}),
        }

    def _trial(self, now: float) -> dict[str, Any]:
        """When the trial ends (TRIAL_DAYS from --created) and what is left of its 100."""
        signup = _signup(self.created)
        ends = (datetime.fromtimestamp(signup + TRIAL_DAYS * 86400, UTC).date().isoformat()
                if signup is not None else None)
        return {"trial_ends": ends, "trial_expired": self.trial_expired(now),
                "trial_left": max(0, TRIAL_LIMIT - self.sent_total)}


@functools.lru_cache(maxsize=4096)
def _signup(created: str) -> float | None:
    """The sign-up date as a timestamp; cached, as the policy asks for it on every outcome."""
    try:
        return datetime.strptime(created, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


# Usage is counted by the node that accepts the mail; a record from another node never
# overwrites it (docs/scaling.md: quotas are per node).
LOCAL_FIELDS = ("sent_this_month", "month", "sent_total")
# (account as it is now, previous status, whether the change was made on this node)
StatusHook = Callable[[Account, str, bool], None]


class SharedStore(Protocol):
    """Cluster mode (sharing/accounts.py): where a change is agreed on before it is made."""

    async def commit(self, account: Account) -> Account | None:
        """Store `account` (revision r + 1) if the shared record is still at r; else return
        the shared record that won. Without Redis, the change is local until reconciled."""
        ...


def _put(conn: Any, account: Account, events: list[tuple[float, str, str | None, bytes]]) -> None:
    put_account(conn, account.id, msgspec.json.encode(account))
    if events:
        append_events(conn, events)


class AccountBook:
    def __init__(self, spool: Spool, clock: Callable[[], float] = time.time):
        self.spool = spool
        self.clock = clock
        self.accounts: dict[str, Account] = {}
        self.on_release: list[Callable[[str], None]] = []
        self.on_status: list[StatusHook] = []  # after every status change
        self.shared: SharedStore | None = None

    def load(self) -> None:
        for account_id, data in self.spool.accounts():
            self.accounts[account_id] = msgspec.json.decode(data, type=Account)

    def get(self, account_id: str) -> Account | None:
        return self.accounts.get(account_id)

    def is_held(self, account_id: str) -> bool:
        if account_id == SYSTEM_ACCOUNT:
            return False
        account = self.accounts.get(account_id)
        if account is None or account.status != "active":
            return True
        # SPEC §1: no sending once the 30-day trial is over; the mail waits, it is not dropped
        return account.trial_expired(self.clock())

    def paused_count(self) -> int:
        return sum(1 for a in self.accounts.values() if a.status == "paused")

    async def set(self, account_id: str, fields: dict[str, Any]) -> Account:
        """Create or change an account (`mta accounts set`); durable before it returns."""
        if not account_id or len(account_id) > 200 or any(c.isspace() for c in account_id):
            raise AccountError("invalid_argument", "account id must be 1-200 characters without spaces")
        if account_id.startswith("_"):
            raise AccountError("invalid_argument", "account ids starting with '_' are reserved for the daemon")
        while True:
            old = self.accounts.get(account_id)
            if old is None:
                missing = [k for k in ("plan", "subscribers", "notify") if fields.get(k) is None]
                if missing:
                    raise AccountError("invalid_argument",
                                       f"a new account needs {', '.join('--' + m for m in missing)}")
            merged: dict[str, Any] = msgspec.structs.asdict(old) if old else {"id": account_id}
            merged.update({k: v for k, v in fields.items() if v is not None})
            merged["rev"] = (old.rev if old else 0) + 1
            if old is None:
                merged.setdefault("status", "review")  # SPEC §1: new accounts wait for an admin
                merged.setdefault("created", datetime.fromtimestamp(self.clock(), UTC).date().isoformat())
            account = _validated(merged)
            if await self._agreed(account):
                break
        events = []
        if old is not None and old.status != account.status:
            events.append(self._status_event(account, old.status))
        await self.spool.transact(_put, account, events)
        self.accounts[account_id] = account
        if old is not None:
            self._changed(account, old.status)
        return account

    async def set_status(self, account_id: str, status: str, reason: str | None = None,
                         detail: dict[str, Any] | None = None) -> Account:
        """Change an account's status. A hold (pause, review, suspension) takes effect in memory
        at once, before the write is durable: mail must stop now, and holding it longer
        than asked (if the write fails) never loses any. A release waits for the write."""
        account = self.accounts.get(account_id)
        if account is None:
            raise AccountError("unknown_account", f"no account {account_id!r}")
        if status not in STATUSES:
            raise AccountError("invalid_argument", f"status must be one of {', '.join(STATUSES)}")
        old_status = account.status
        paused = status == "paused"
        while True:
            changed = msgspec.structs.replace(account, status=status, pause_reason=reason if paused else None,
                                              pause_detail=detail if paused else None, rev=account.rev + 1)
            if status != "active":
                self.accounts[account_id] = changed
            if await self._agreed(changed):
                break
            # another node changed it first (its change is applied now, with its own notice)
            account = self.accounts[account_id]
            if account.status == status:
                return account
        events = [self._status_event(changed, old_status, detail)] if old_status != status else []
        await self.spool.transact(_put, changed, events)
        self.accounts[account_id] = changed
        self._changed(changed, old_status)
        return changed

    async def _agreed(self, account: Account) -> bool:
        """Cluster mode: the change is stored in Redis over the revision it was made from; if
        another node's change won, that one is applied here and the caller starts over."""
        if self.shared is None:
            return True
        winner = await self.shared.commit(account)
        if winner is None:
            return True
        self.apply_remote(winner, force=True)
        return False

    def apply_remote(self, account: Account, force: bool = False) -> bool:
        """Another node's newer record: applied in memory at once (a pause holds mail now),
        written to this node's spool without an event (the other node's feed has it)."""
        old = self.accounts.get(account.id)
        if old is not None and old.rev >= account.rev and not force:
            return False
        if old is not None:
            account = msgspec.structs.replace(account, **{k: getattr(old, k) for k in LOCAL_FIELDS})
        self.accounts[account.id] = account
        self.spool.post(_put, account, [])
        if old is not None:
            self._changed(account, old.status, local=False)
        return True

    def remove(self, account_id: str) -> None:
        """Forget a deleted account (the spool rows are gone already)."""
        self.accounts.pop(account_id, None)

    def replace(self, account: Account) -> None:
        """Swap the in-memory account (quota taken at submission; the spool write follows)."""
        self.accounts[account.id] = account

    def _status_event(self, account: Account, old: str, extra: dict[str, Any] | None = None
                      ) -> tuple[float, str, str | None, bytes]:
        etype = "paused" if account.status == "paused" else "resumed" if account.status == "active" else "status"
        body: dict[str, Any] = {"status": account.status, "previous": old}
        if account.pause_reason:
            body["reason"] = account.pause_reason
        body.update(extra or {})
        return event_row(etype, account.id, body, self.clock())

    def _changed(self, account: Account, old_status: str, local: bool = True) -> None:
        if account.status == old_status:
            return
        if account.status == "active":
            for release in self.on_release:
                release(account.id)
        for callback in self.on_status:
            callback(account, old_status, local)


def _validated(fields: dict[str, Any]) -> Account:
    if fields.get("plan") not in PLANS:
        raise AccountError("invalid_argument", f"--plan must be one of {', '.join(PLANS)}")
    if fields.get("status") not in STATUSES:
        raise AccountError("invalid_argument", f"--status must be one of {', '.join(STATUSES)}")
    subs = fields.get("subscribers")
    if not isinstance(subs, int) or isinstance(subs, bool) or subs < 0:
        raise AccountError("invalid_argument", "--subscribers must be a whole number >= 0")
    notify = fields.get("notify")
    if not isinstance(notify, str) or "@" not in notify or any(c in notify for c in "\r\n\0 "):
        raise AccountError("invalid_argument", "--notify must be an email address")
    threshold = fields.get("hard_bounce_threshold")
    if threshold is not None and not 0.08 <= float(threshold) <= 0.15:
        raise AccountError("invalid_argument", "--hard-bounce-threshold must lie within 0.08..0.15 (SPEC §1)")
    credits = fields.get("credits")
    if credits is not None and (not isinstance(credits, int) or credits < 0):
        raise AccountError("invalid_argument", "--credits must be a whole number >= 0")
    created = fields.get("created", "")
    try:
        datetime.strptime(created, "%Y-%m-%d")
    except (TypeError, ValueError):
        raise AccountError("invalid_argument", "--created must be a date YYYY-MM-DD") from None
    try:
        return msgspec.convert(fields, type=Account)
    except msgspec.ValidationError as exc:
        raise AccountError("invalid_argument", str(exc)) from None
