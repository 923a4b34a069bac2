"""Erasure across the cluster (SPEC §12): `accounts delete` and `privacy erase` on one node
run on every node, since each keeps its own spool.

The request travels on a pub/sub channel and is not stored in Redis (an address to erase
must not be kept anywhere). The deleted account's shared record is removed, so no
reconcile brings it back. A node that is apart when the request is made misses it: the
admin repeats it there (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from ..cluster.link import ClusterDown, ClusterLink
from ..logs import get as get_logger
from ..privacy.erasure import Erasure
from .accounts import SharedAccounts

log = get_logger("mta.cluster")
CHANNEL = "privacy"


class Request(msgspec.Struct):
    op: str                  # delete | erase
    account: str | None = None
    address: str | None = None


class SharedErasure:
    def __init__(self, link: ClusterLink, erasure: Erasure, accounts: SharedAccounts):
        self.link = link
        self.erasure = erasure
        self.accounts = accounts
        self.suppression = link.key("suppression")  # the account's entries go with it
        self._tasks: set[asyncio.Task[Any]] = set()
        link.subscribe(CHANNEL, self._message)
        erasure.on_delete.append(self._deleted)
        erasure.on_erase.append(self._erased)

    async def _deleted(self, account: str) -> None:
        blob = msgspec.json.encode(Request("delete", account=account))

        async def drop(r: Any) -> None:
            stale = [k async for k in r.hscan_iter(self.suppression, match=_glob(account) + "\0*",
                                                          count=1000)]
            async with r.pipeline(transaction=True) as pipe:
                if stale:
                    pipe.hdel(self.suppression, *stale)
                pipe.hdel(self.accounts.records, account)
                pipe.hdel(self.accounts.revs, account)
                pipe.publish(self.link.key(CHANNEL), self.link.message(blob))
                await pipe.execute()

        await self._send(drop)

    async def _erased(self, address: str) -> None:
        blob = msgspec.json.encode(Request("erase", address=address))
        await self._send(lambda r: r.publish(self.link.key(CHANNEL), self.link.message(blob)))

    async def _send(self, fn: Any) -> None:
        try:
            await self.link.call(fn)
        except ClusterDown:
            log.warning("cluster_erasure_not_shared", reason="redis unavailable; repeat it on the other nodes")

    def _message(self, payload: bytes) -> None:
        request = msgspec.json.decode(payload, type=Request)
        task = asyncio.get_running_loop().create_task(self._apply(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply(self, request: Request) -> None:
        try:
            if request.op == "delete" and request.account and self.erasure.accounts.get(request.account):
                await self.erasure.delete_account(request.account, announce=False)
            elif request.op == "erase" and request.address:
                await self.erasure.erase(request.address, announce=False)
        except Exception as exc:
            log.error("cluster_erasure_failed", op=request.op, error=str(exc))


def _glob(text: str) -> str:
    """`text` matched literally in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
