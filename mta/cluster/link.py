"""The node's link to the cluster's Redis (SPEC §10): connection, degraded mode, pub/sub.

Every user of shared state goes through one `ClusterLink`. While Redis answers, `up` is
true and the scripts run; on the first connection error the link goes degraded (`up`
false, the metric `mta_cluster_degraded` 1, one log line) and callers fall back to their local
state: the throttles to their share of the cluster's limits, the rest to the node's own
spool. A background task reconnects every second; on success it runs the `on_up`
reconcilers (counters, accounts, suppression, job keys written while apart) before it
declares the link up again.

No home-made consensus: Redis scripts are the only atomic step, and each node keeps its
own durable spool, so a lost Redis loses no acknowledged mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from ..logs import get as get_logger

log = get_logger("mta.cluster")
PREFIX = "mta:"
HEARTBEAT = 2.0    # seconds between a node's "alive" marks
NODE_TTL = 10.0    # a node not seen for this long no longer counts toward the shares
RECONNECT = 1.0
TIMEOUT = 1.0      # a Redis call slower than this counts as Redis unavailable
# What counts as "Redis is unavailable" (a script error is a bug, not an outage).
DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class ClusterDown(Exception):
    """Redis did not answer: use the local fallback."""


Handler = Callable[[bytes], None]


class ClusterLink:
    def __init__(self, url: str, node: str, clock: Callable[[], float] = time.time):
        self.url = url
        self.node = node
        self.clock = clock
        self.up = False
        self.nodes = 1  # live nodes when last seen: the degraded share is 1/nodes
        self.on_up: list[Callable[[], Awaitable[None]]] = []
        self.on_beat: list[Callable[[], Awaitable[None]]] = []
        self._handlers: dict[str, Handler] = {}
        self._client = redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._scripts: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        metrics.CLUSTER_DEGRADED.set(1)  # until the first contact

    @staticmethod
    def key(*parts: str) -> str:
        return PREFIX + ":".join(parts)

    def subscribe(self, channel: str, handler: Handler) -> None:
        """Messages on `channel` from other nodes (a node never hears its own)."""
        self._handlers[self.key(channel)] = handler

    # -- life ---------------------------------------------------------------------------
    async def start(self) -> None:
        """First contact before the node serves: up and reconciled, or degraded from the start."""
        await self._connect()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep_up()), loop.create_task(self._listen())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            if self.up:
                await self._client.zrem(self.key("nodes"), self.node)
        with contextlib.suppress(Exception):
            if self._pubsub is not None:
                await self._pubsub.aclose()
        with contextlib.suppress(Exception):
            await self._client.aclose()
        metrics.CLUSTER_DEGRADED.set(0)

    async def _connect(self) -> bool:
        try:
            await self._client.ping()
            await self._beat()
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            if self._handlers:
                await pubsub.subscribe(*self._handlers)
            # Reconcile before declaring up: writes made while apart go out, the others' come in.
            self.up = True
            for reconcile in self.on_up:
                await reconcile()
        except (*DOWN_ERRORS, ClusterDown) as exc:
            self.up = False
            log.debug("cluster_connect_failed", error=str(exc) or type(exc).__name__)
            return False
        old, self._pubsub = self._pubsub, pubsub
        if old is not None:
            with contextlib.suppress(Exception):
                await old.aclose()
        metrics.CLUSTER_DEGRADED.set(0)
        log.info("cluster_up", redis=_safe(self.url), node=self.node, nodes=self.nodes)
        return True

    def _down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            metrics.CLUSTER_DEGRADED.set(1)
            metrics.CLUSTER_OUTAGES.inc()
            log.warning("cluster_degraded", error=str(exc) or type(exc).__name__, nodes=self.nodes,
                        share=round(1 / self.nodes, 3))

    async def _keep_up(self) -> None:
        while True:
            if self.up:
                await asyncio.sleep(HEARTBEAT)
                try:
                    await self._beat()
                    for beat in self.on_beat:
                        await beat()
                except DOWN_ERRORS as exc:
                    self._down(exc)
                except ClusterDown:
                    pass
            else:
                await asyncio.sleep(RECONNECT)
                await self._connect()

    async def _beat(self) -> None:
        now = self.clock()
        nodes = self.key("nodes")
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(nodes, {self.node: now})
            pipe.zremrangebyscore(nodes, "-inf", now - NODE_TTL)
            pipe.zcard(nodes)
            *_, count = await pipe.execute()
        self.nodes = max(1, int(count))
        metrics.CLUSTER_NODES.set(self.nodes)

    async def _listen(self) -> None:
        while True:
            pubsub = self._pubsub
            if not self.up or pubsub is None or not self._handlers:
                await asyncio.sleep(0.2)
                continue
            try:
                message = await pubsub.get_message(timeout=1.0)
            except DOWN_ERRORS as exc:
                self._down(exc)
                continue
            except RedisError as exc:  # e.g. a pubsub closed under us by a reconnect
                log.debug("cluster_listen", error=str(exc))
                await asyncio.sleep(0.2)
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            handler = self._handlers.get(channel)
            data = message["data"]
            sender, _, payload = data.partition(b"|")
            if handler is None or sender.decode() == self.node:
                continue
            try:
                handler(payload)
            except Exception:
                log.exception("cluster_message_failed", channel=channel)

    # -- calls ----------------------------------------------------------------------------
    async def script(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script from scripts.py atomically; ClusterDown when Redis does not answer."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        return await self.call(lambda r: script(keys=list(keys), args=list(args), client=r))

    async def call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `fn(client)` (plain commands or a pipeline); ClusterDown when Redis does not answer."""
        if not self.up:
            raise ClusterDown("degraded")
        try:
            return await fn(self._client)
        except ResponseError:
            raise
        except DOWN_ERRORS as exc:
            self._down(exc)
            raise ClusterDown(str(exc)) from exc

    def message(self, payload: bytes) -> bytes:
        """A pub/sub message: the sender's node id, so it can skip its own."""
        return self.node.encode() + b"|" + payload

    async def publish(self, channel: str, payload: bytes) -> None:
        await self.call(lambda r: r.publish(self.key(channel), self.message(payload)))


def _safe(url: str) -> str:
    """The Redis URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + sep + rest
