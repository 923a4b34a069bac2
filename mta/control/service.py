"""The control socket's operations (admins; SPEC §2). The CLI is a thin client of these.

Answers are `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message"}}`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, parse_duration
from ..events import read as read_events
from ..jsonlines import Peer, error
from ..policy.accounts import AccountError

if TYPE_CHECKING:
    from ..app import App

Op = Callable[[dict[str, Any]], Awaitable[Any]]
ACCOUNT_FIELDS = ("plan", "subscribers", "notify", "status", "hard_bounce_threshold", "credits", "created",
                  "no_footer")


class ControlService:
    def __init__(self, app: App):
        self.app = app
        self.ops: dict[str, Op] = {
            "ping": self.ping,
            "status": self.status,
            "queue": self.queue,
            "events": self.events,
            "reload": self.reload,
            "accounts.set": self.accounts_set,
            "accounts.show": self.accounts_show,
            "accounts.list": self.accounts_list,
            "accounts.approve": self.accounts_approve,
            "accounts.pause": self.accounts_pause,
            "accounts.resume": self.accounts_resume,
            "accounts.delete": self.accounts_delete,
            "privacy.erase": self.privacy_erase,
            "audit": self.audit,
            "review.list": self.review_list,
            "review.approve": self.review_approve,
            "review.reject": self.review_reject,
            "suppress.list": self.suppress_list,
            "suppress.add": self.suppress_add,
            "suppress.remove": self.suppress_remove,
        }

    async def handle(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Run one admin operation; every one but `ping` leaves an audit record (SPEC §12)."""
        name = str(request["op"])
        answer = await self._run(name, request)
        if name != "ping":
            err = answer.get("error") if answer.get("ok") is False else None
            self.app.audit.record(name, request, peer, "error" if err else "ok",
                                  error=err["code"] if err else None)
        return answer

    async def _run(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        op = self.ops.get(name)
        if op is None:
            return error("unknown_op", f"unknown control op {name!r}")
        try:
            return {"ok": True, "result": await op(request)}
        except AccountError as exc:
            return error(exc.code, str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return error("invalid_argument", f"{type(exc).__name__}: {exc}")

    # -- ops --------------------------------------------------------------------------
    async def suppress_list(self, request: dict[str, Any]) -> Any:
        """Entries of one account's list (or the global list without `account`)."""
        account = request.get("account")
        return self.app.returns.suppression.entries(account or "*")

    async def suppress_add(self, request: dict[str, Any]) -> Any:
        address = _address(request)
        account = request.get("account")
        if account and self.app.accounts.get(account) is None:
            raise AccountError("unknown_account", f"no account {account!r}")
        return await self.app.returns.add(account or None, address)

    async def suppress_remove(self, request: dict[str, Any]) -> Any:
        return await self.app.returns.remove(request.get("account") or None, _address(request))

    async def ping(self, request: dict[str, Any]) -> Any:
        return {"pong": True}

    async def status(self, request: dict[str, Any]) -> Any:
        return self.app.status()

    async def queue(self, request: dict[str, Any]) -> Any:
        by = request.get("by") or "domain"
        index = {"account": 0, "campaign": 1, "sending-domain": 2, "sending_domain": 2, "domain": 3}.get(by)
        if index is None:
            raise ValueError("--by must be domain, account, campaign or sending-domain")
        scheduler = self.app.scheduler
        ready: Counter[str] = Counter()
        held: Counter[str] = Counter()
        for key, sq in scheduler.queues.items():
            target = held if scheduler.is_held(sq.account) else ready
            if len(sq):
                target[key[index]] += len(sq)
        deferred: Counter[str] = Counter(key[index] for key in scheduler.deferred_keys())
        names = sorted(set(ready) | set(held) | set(deferred))
        return [{by.replace("-", "_"): n, "ready": ready[n], "deferred": deferred[n], "held": held[n],
                 "total": ready[n] + deferred[n] + held[n]} for n in names]

    async def events(self, request: dict[str, Any]) -> Any:
        after = int(request.get("after") or 0)
        limit = int(request.get("limit") or 1000)
        return read_events(self.app.spool, after, limit)

    async def reload(self, request: dict[str, Any]) -> Any:
        return self.app.reload()

    async def accounts_set(self, request: dict[str, Any]) -> Any:
        fields = {k: request.get(k) for k in ACCOUNT_FIELDS}
        account = await self.app.accounts.set(str(request["id"]), fields)
        self.app.templates.clear()  # the footer setting is compiled into templates
        return account.view(time.time())

    def _account(self, request: dict[str, Any], key: str = "id") -> str:
        """The account a request names under `key`; unknown_account if there is none such."""
        account_id = str(request.get(key) or "")
        if self.app.accounts.get(account_id) is None:
            raise AccountError("unknown_account", f"no account {account_id!r}")
        return account_id

    def _account_filter(self, request: dict[str, Any]) -> str | None:
        """An optional `--account`: None for all accounts, else a known one."""
        return self._account(request, "account") if request.get("account") else None

    async def accounts_show(self, request: dict[str, Any]) -> Any:
        account = self.app.accounts.get(self._account(request))
        assert account is not None
        view = account.view(time.time())
        view["campaigns"] = self.app.policy.campaign_views(account.id)
        return view

    async def accounts_list(self, request: dict[str, Any]) -> Any:
        now = time.time()
        return [a.view(now) for a in sorted(self.app.accounts.accounts.values(), key=lambda a: a.id)]

    async def accounts_approve(self, request: dict[str, Any]) -> Any:
        return (await self.app.accounts.set_status(self._account(request), "active")).view(time.time())

    async def accounts_resume(self, request: dict[str, Any]) -> Any:
        return (await self.app.accounts.set_status(self._account(request), "active")).view(time.time())

    async def accounts_pause(self, request: dict[str, Any]) -> Any:
        reason = str(request.get("reason") or "paused by an admin")
        return (await self.app.accounts.set_status(self._account(request), "paused", reason)).view(time.time())

    async def accounts_delete(self, request: dict[str, Any]) -> Any:
        return await self.app.erasure.delete_account(self._account(request))

    async def privacy_erase(self, request: dict[str, Any]) -> Any:
        return await self.app.erasure.erase(_address(request))

    async def audit(self, request: dict[str, Any]) -> Any:
        since = request.get("since")
        return self.app.audit.read(parse_since(str(since), time.time()) if since else None)

    # -- review --------------------------------------------------------------------------
    async def review_list(self, request: dict[str, Any]) -> Any:
        return self.app.review.waiting(self._account_filter(request), int(request.get("limit") or 1000))

    def _review_target(self, request: dict[str, Any]) -> tuple[list[str] | None, str | None]:
        ids = request.get("ids") or []
        account = self._account_filter(request)
        if request.get("all"):
            if account is None:
                raise ValueError("--all needs --account ID")
            return None, account
        if not ids:
            raise ValueError("name the message ids to decide (see `mta review list`), or --account ID --all")
        return [str(i) for i in ids], account

    async def review_approve(self, request: dict[str, Any]) -> Any:
        return await self.app.review.approve(*self._review_target(request))

    async def review_reject(self, request: dict[str, Any]) -> Any:
        return await self.app.review.reject(*self._review_target(request))


def parse_since(value: str, now: float) -> float:
    """`--since`: an ISO 8601 date or time (UTC unless it says otherwise), or a duration back
    from now ("2h", "7d")."""
    try:
        return now - parse_duration(value, "--since")
    except ConfigError:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {value!r}: give a time (2026-11-22T10:00:00Z) or a duration (2h)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _address(request: dict[str, Any]) -> str:
    address = request.get("address")
    if not isinstance(address, str) or not address.strip() or any(c in address for c in "\r\n\0 "):
        raise ValueError("address: one address (or, for remove, its hash) is required")
    return address.strip()
