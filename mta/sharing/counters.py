"""Campaign counters across the cluster: each node counts what it delivered and received,
and writes its own absolute counts to Redis (scripts.COUNTS), which answers with the sums
over all nodes. The policy judges a campaign by those sums, so a campaign spread over
three nodes pauses at the same rate as on one.

Writes are idempotent (a node's counts, not increments), so a Redis that restarted empty
is healed by the next write of each node, and an outage needs nothing replayed: on
reconnect every live campaign is written once more. The sums arrive at most FLUSH
seconds late; a rate that crosses a threshold on the sums is judged at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..cluster.link import ClusterDown, ClusterLink
from ..cluster.scripts import COUNTS
from ..logs import get as get_logger
from ..policy.counters import Campaign, CampaignBook

log = get_logger("mta.cluster")
FLUSH = 0.2              # seconds: how often changed campaigns are exchanged
TTL = 90 * 86400         # a campaign's shared counts outlive any retry schedule


class SharedCounters:
    def __init__(self, link: ClusterLink, book: CampaignBook, rejudge: Callable[[Campaign], None]):
        self.link = link
        self.book = book
        self.rejudge = rejudge
        self._dirty: dict[tuple[str, str], Campaign] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._recent: dict[tuple[str, str], Campaign] = {}  # counted here since the last heartbeat
        book.on_bump = self._bumped
        link.on_up.append(self.reconcile)
        link.on_beat.append(self._refresh)

    def _bumped(self, c: Campaign) -> None:
        key = (c.account, c.campaign)
        self._dirty[key] = c
        self._recent[key] = c
        if self._handle is None and self.link.up:
            self._handle = asyncio.get_running_loop().call_later(FLUSH, self._flush_soon)

    def _flush_soon(self) -> None:
        self._handle = None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        try:
            await self.exchange(list(dirty.values()))
        except ClusterDown:
            self._dirty.update(dirty)  # exchanged on reconnect
        except Exception:
            log.exception("cluster_counters_failed")

    async def exchange(self, campaigns: list[Campaign]) -> None:
        """Write ours, read the sums; judge again where the others' share moved."""
        for c in campaigns:
            key = self.link.key("campaign", c.account, c.campaign)
            written = list(c.counts)  # counts move while we wait: the others' share is sums - written
            sums: list[Any] = await self.link.script(COUNTS, [key], [self.link.node, TTL, *written])
            others = [max(0, int(total) - n) for total, n in zip(sums, written, strict=True)]
            if others != c.others:
                c.others = others
                self.rejudge(c)

    async def reconcile(self) -> None:
        """(Re)connected: every campaign once, so the sums are whole again."""
        self._dirty.update(self.book.campaigns)
        dirty, self._dirty = self._dirty, {}
        await self.exchange(list(dirty.values()))

    async def _refresh(self) -> None:
        """Heartbeat: campaigns counted here lately are exchanged once more, so this node
        learns the others' counts after its own have stopped moving."""
        recent, self._recent = self._recent, {}
        await self.exchange(list(recent.values()))
