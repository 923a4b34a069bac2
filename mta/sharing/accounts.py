"""Accounts across the cluster: a change is stored in Redis over the revision it was made
from (scripts.ACCOUNT) and published; every node applies it at once. A pause made on one
node holds on all, and only the node that made it writes the event and sends the notice.

Without Redis a node changes its accounts alone; on reconnect the higher revision wins
(on a tie, the one in Redis), so every node ends with the same record.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..cluster.link import ClusterDown, ClusterLink
from ..cluster.scripts import ACCOUNT
from ..logs import get as get_logger
from ..policy.accounts import LOCAL_FIELDS, Account, AccountBook

log = get_logger("mta.cluster")
CHANNEL = "accounts"


class SharedAccounts:
    def __init__(self, link: ClusterLink, book: AccountBook):
        self.link = link
        self.book = book
        self.records = link.key("accounts")
        self.revs = link.key("account_revs")
        link.subscribe(CHANNEL, self._message)
        link.on_up.append(self.reconcile)
        book.shared = self

    async def commit(self, account: Account) -> Account | None:
        blob = msgspec.json.encode(account)
        try:
            answer = await self.link.script(
                ACCOUNT, [self.records, self.revs],
                [account.id, blob, account.rev - 1, self.link.key(CHANNEL), self.link.message(blob)])
        except ClusterDown:
            return None  # degraded: the change is ours alone until reconcile() pushes it
        if len(answer) == 1:
            return None
        rev, current = int(answer[0]), answer[1]
        if current is None:  # a revision without a record: take it over
            return msgspec.structs.replace(account, rev=rev)
        winner = msgspec.json.decode(current, type=Account)
        return msgspec.structs.replace(winner, rev=rev)

    def _message(self, payload: bytes) -> None:
        self.book.apply_remote(msgspec.json.decode(payload, type=Account))

    async def reconcile(self) -> None:
        """After (re)connecting: newer records in, newer local ones out."""
        remote: dict[Any, Any] = await self.link.call(lambda r: r.hgetall(self.records))
        revs: dict[Any, Any] = await self.link.call(lambda r: r.hgetall(self.revs))
        seen = set()
        for key, blob in remote.items():
            account = msgspec.json.decode(blob, type=Account)
            rev = int(revs.get(key, account.rev))
            seen.add(account.id)
            local = self.book.get(account.id)
            if local is None or rev > local.rev or (rev == local.rev and _differs(local, account)):
                self.book.apply_remote(msgspec.structs.replace(account, rev=rev), force=True)
            elif local.rev > rev:
                await self._push(local)
        for account in list(self.book.accounts.values()):
            if account.id not in seen and not account.id.startswith("_"):
                await self._push(account)

    async def _push(self, account: Account) -> None:
        blob = msgspec.json.encode(account)

        async def put(r: Any) -> None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hset(self.records, account.id, blob)
                pipe.hset(self.revs, account.id, account.rev)
                pipe.publish(self.link.key(CHANNEL), self.link.message(blob))
                await pipe.execute()

        await self.link.call(put)
        log.info("cluster_account_pushed", account=account.id, rev=account.rev)


def _differs(a: Account, b: Account) -> bool:
    da, db = msgspec.structs.asdict(a), msgspec.structs.asdict(b)
    return any(da[k] != db[k] for k in da if k not in LOCAL_FIELDS)
