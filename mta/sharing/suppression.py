"""Suppression across the cluster: every entry a node adds (a hard bounce, a complaint, an
unsubscribe, an admin's) goes to Redis and to the other nodes, as the keyed hash only: an
address never leaves the node that knew it (SPEC §12). Submissions still check their
recipients in memory, on every node.

Without Redis, additions wait in memory and go out on reconnect; reconcile() then brings
in what the others added meanwhile. A node that restarts reconciles the whole list.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from ..cluster.link import ClusterDown, ClusterLink
from ..returns import Returns, SuppressionRow

CHANNEL = "suppression"
BATCH = 1000


class Entry(msgspec.Struct, array_like=True):
    account: str
    hash: str
    reason: str
    time: float


class Op(msgspec.Struct):
    add: list[Entry] = []
    remove: list[tuple[str, str]] = []


class SharedSuppression:
    def __init__(self, link: ClusterLink, returns: Returns):
        self.link = link
        self.returns = returns
        self.table = link.key("suppression")
        self._unsent: list[Entry] = []
        self._tasks: set[asyncio.Task[None]] = set()
        link.subscribe(CHANNEL, self._message)
        link.on_up.append(self.reconcile)
        returns.on_suppress.append(self._added)
        returns.on_unsuppress.append(self._removed)

    def _added(self, rows: list[SuppressionRow]) -> None:
        self._unsent += [Entry(a, h, reason, when) for a, h, _, reason, when in rows]
        self._spawn(self._send())

    def _removed(self, account: str, rhash: str) -> None:
        self._spawn(self._send_removal(account, rhash))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self) -> None:
        if not self._unsent or not self.link.up:
            return
        entries, self._unsent = self._unsent, []
        try:
            await self._store(entries, publish=True)
        except ClusterDown:
            self._unsent = entries + self._unsent  # out again on reconnect

    async def _store(self, entries: list[Entry], publish: bool) -> None:
        for i in range(0, len(entries), BATCH):
            chunk = entries[i:i + BATCH]

            async def put(r: Any, chunk: list[Entry] = chunk) -> None:
                async with r.pipeline(transaction=False) as pipe:
                    pipe.hset(self.table, mapping={f"{e.account}\0{e.hash}": f"{e.reason}\0{e.time}"
                                                   for e in chunk})
                    if publish:
                        pipe.publish(self.link.key(CHANNEL), self.link.message(msgspec.json.encode(Op(add=chunk))))
                    await pipe.execute()

            await self.link.call(put)

    async def _send_removal(self, account: str, rhash: str) -> None:
        async def drop(r: Any) -> None:
            async with r.pipeline(transaction=False) as pipe:
                pipe.hdel(self.table, f"{account}\0{rhash}")
                pipe.publish(self.link.key(CHANNEL),
                             self.link.message(msgspec.json.encode(Op(remove=[(account, rhash)]))))
                await pipe.execute()

        try:
            await self.link.call(drop)
        except ClusterDown:
            pass  # documented: a removal made while apart stays on this node only

    def _message(self, payload: bytes) -> None:
        op = msgspec.json.decode(payload, type=Op)
        if op.add:
            self.returns.apply_remote([(e.account, e.hash, None, e.reason, e.time) for e in op.add])
        for account, rhash in op.remove:
            self.returns.remove_remote(account, rhash)

    async def reconcile(self) -> None:
        """Ours out (all of it: Redis may have restarted empty), theirs in."""
        mine = [Entry(e["account"] or "*", e["hash"], e["reason"], e["time"])
                for e in self.returns.suppression.entries(None)]
        self._unsent = []
        await self._store(mine, publish=False)
        cursor: Any = 0
        while True:
            async def scan(r: Any, at: Any = cursor) -> Any:
                return await r.hscan(self.table, at, count=BATCH)

            cursor, page = await self.link.call(scan)
            rows: list[SuppressionRow] = []
            for key, value in page.items():
                account, _, rhash = key.decode().partition("\0")
                reason, _, when = value.decode().partition("\0")
                rows.append((account, rhash, None, reason, float(when or 0)))
            self.returns.apply_remote(rows)
            if not cursor:
                break
