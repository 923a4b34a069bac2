"""Job idempotency across the cluster (SPEC §4, §10): a job_id is accepted once, whichever
node (or both at once) gets it.

Before a node spools a job it claims the key in Redis (SET NX GET): a free key becomes
"pending" for CLAIM_MS; after the job is durable the key holds the digest and the first
answer, which any node then replays. A key held as pending by another node answers
`unavailable` (retry shortly). A node that dies mid-claim frees the key when it lapses.

Without Redis a node accepts alone (the same job_id sent to the same node is still
refused by its spool); the keys of jobs accepted meanwhile are written on reconnect.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..cluster.link import ClusterDown, ClusterLink

CLAIM_MS = 30000


class Claim(msgspec.Struct, array_like=True):
    node: str
    digest: str = ""     # hex; empty while pending
    answer: bytes = b""  # the first answer, once the job is durable


class SharedJobKeys:
    def __init__(self, link: ClusterLink, ttl: float):
        self.link = link
        self.ttl = max(60, int(ttl))
        self._unsent: list[tuple[str, Claim]] = []
        link.on_up.append(self.reconcile)

    def _key(self, account: str, job_id: str) -> str:
        return self.link.key("job", account, job_id)

    async def claim(self, account: str, job_id: str) -> Claim | None:
        """None: ours to accept (or Redis is away). Else the claim that holds the key."""
        mine = msgspec.msgpack.encode(Claim(self.link.node))
        try:
            old = await self.link.call(lambda r: r.set(self._key(account, job_id), mine, nx=True, px=CLAIM_MS,
                                                       get=True))
        except ClusterDown:
            return None
        if old is None:
            return None
        claim = msgspec.msgpack.decode(old, type=Claim)
        if claim.node == self.link.node and not claim.digest:
            return None  # our own claim from an attempt that failed: still ours
        return claim

    async def accepted(self, account: str, job_id: str, digest: bytes, answer: bytes) -> None:
        key = self._key(account, job_id)
        claim = Claim(self.link.node, digest.hex(), answer)
        try:
            await self.link.call(lambda r: r.set(key, msgspec.msgpack.encode(claim), ex=self.ttl))
        except ClusterDown:
            self._unsent.append((key, claim))

    async def abandon(self, account: str, job_id: str) -> None:
        """The job was not accepted after all: free our pending claim."""
        key = self._key(account, job_id)
        mine = msgspec.msgpack.encode(Claim(self.link.node))

        async def drop(r: Any) -> None:
            if await r.get(key) == mine:
                await r.delete(key)

        try:
            await self.link.call(drop)
        except ClusterDown:
            pass  # it lapses by itself

    async def reconcile(self) -> None:
        while self._unsent:
            key, claim = self._unsent[0]
            blob = msgspec.msgpack.encode(claim)
            async def put(r: Any, k: str = key, b: bytes = blob) -> Any:
                return await r.set(k, b, ex=self.ttl, nx=True)

            await self.link.call(put)
            self._unsent.pop(0)
