"""`mta accounts delete` and `mta privacy erase` (SPEC §12).

The spool part of each is one transaction (`queue/purge.py`), so a crash leaves all of it
or none of it, and running the command again finishes the job. Then the in-memory state
follows: the account's queues, counters and suppression list, or the address's queued
messages and its clear text in the suppression lists. Messages already on the wire when
the command runs may still be delivered; their outcome is then recorded without the
address (`Results.forget_account` / `forget_address`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..events import event_row
from ..logs import get as get_logger
from ..policy.accounts import AccountBook, AccountError
from ..policy.counters import CampaignBook
from ..queue.purge import delete_account, erase_address
from ..queue.scheduler import Scheduler
from ..queue.spool import Spool
from ..results import Results
from ..returns import Returns

log = get_logger("mta.privacy")


class Erasure:
    def __init__(self, spool: Spool, accounts: AccountBook, campaigns: CampaignBook, returns: Returns,
                 scheduler: Scheduler, results: Results, address_hash: Callable[[str], str],
                 clock: Callable[[], float] = time.time):
        self.spool = spool
        self.accounts = accounts
        self.campaigns = campaigns
        self.returns = returns
        self.scheduler = scheduler
        self.results = results
        self.address_hash = address_hash
        self.clock = clock
        # cluster mode (sharing/privacy.py): the same request runs on the other nodes
        self.on_delete: list[Callable[[str], Awaitable[None]]] = []
        self.on_erase: list[Callable[[str], Awaitable[None]]] = []

    async def delete_account(self, account_id: str, announce: bool = True) -> dict[str, Any]:
        if self.accounts.get(account_id) is None:
            raise AccountError("unknown_account", f"no account {account_id!r}")
        # hold at once: nothing more of it goes on the wire while the spool forgets it
        self.results.forget_account(account_id)
        self.scheduler.drop_account(account_id)
        event = event_row("account_deleted", account_id, {"deleted": account_id}, self.clock())
        counts: dict[str, Any] = await self.spool.transact(delete_account, account_id, event)
        self.accounts.remove(account_id)
        self.campaigns.forget(account_id)
        self.returns.suppression.drop_account(account_id)
        self.scheduler.drop_account(account_id)  # anything a timer re-queued meanwhile
        self.spool.truncate_wal()
        log.warning("account_deleted", account=account_id, **counts)
        if announce:
            for hook in self.on_delete:
                await hook(account_id)
        return {"deleted": account_id, **counts}

    async def erase(self, address: str, announce: bool = True) -> dict[str, Any]:
        key = address.strip().lower()
        if "@" not in key or any(c.isspace() or c in "\0" for c in key):
            raise ValueError("privacy erase takes one address")
        rhash = self.address_hash(key)
        now = self.clock()
        self.results.forget_address(rhash)
        self.scheduler.forget_address(key)
        event = event_row("erased", None, {"recipient_hash": rhash}, now)
        counts: dict[str, Any] = await self.spool.transact(erase_address, key, rhash, now, event)
        self.returns.suppression.erase(rhash, now)
        self.scheduler.forget_address(key)
        self.spool.truncate_wal()
        log.warning("address_erased", rcpt_hash=rhash, rcpt_domain=key.rpartition("@")[2], **counts)
        if announce:
            for hook in self.on_erase:
                await hook(key)
        return {"erased": rhash, **counts}
