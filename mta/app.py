"""Composition root: builds every part, wires collaborators, signals, sd_notify, drain, reload.

Nothing else constructs stages or knows how they connect; each stage gets what it needs
passed in (DESIGN.md, principle 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import shutil
import signal
import socket
import time
from typing import Any

import msgspec

from . import metrics
from .accounting import AccountingLog
from .cluster.link import ClusterDown, ClusterLink
from .config import Backoff as BackoffConfig
from .config import Config, ConfigError, ShapingRule, load_config
from .control.service import ControlService
from .delivery.dkim import load_signers
from .delivery.dns import MxResolver
from .delivery.smtp import SmtpDispatcher, TemplateCache
from .httpd import HttpEndpoint
from .jsonlines import JsonLineServer
from .listener import attach
from .logs import get as get_logger
from .logs import setup as setup_logs
from .policy.accounts import AccountBook
from .policy.counters import CampaignBook
from .policy.enforce import PolicyEnforcer
from .policy.review import ReviewDesk
from .privacy.audit import AuditLog
from .privacy.erasure import Erasure
from .privacy.retention import Retention
from .queue.ready import ReadyQueues
from .queue.scheduler import Scheduler
from .queue.spool import Spool, put_kv
from .results import Results
from .returns import Returns
from .sdnotify import Notifier
from .sharing.accounts import SharedAccounts
from .sharing.counters import SharedCounters
from .sharing.jobs import SharedJobKeys
from .sharing.privacy import SharedErasure
from .sharing.suppression import SharedSuppression
from .submit.job import decode_job
from .submit.service import SubmitService
from .throttle.limits import LocalLimits, MakeLimits, Throttles
from .throttle.shaping import RuleBook
from .throttle.shared import SharedLimits
from .throttle.warmup import WarmupCounter
from .tokens import TokenSigner, load_key

log = get_logger("mta.app")
DRAIN_DEADLINE = 25.0


class App:
    def __init__(self, config: Config):
        self.config = config
        self.started = time.time()
        self.notifier = Notifier()
        self.stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._warmup_dirty: dict[str, WarmupCounter] = {}
        self._rate_samples: list[tuple[float, int]] = []  # (time, finished deliveries) every 5 s
        self._warmup_handle: asyncio.TimerHandle | None = None
        self._key_mismatch = False

    # -- start ------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        try:
            key = load_key(cfg.token_key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"security.token_key_file: {exc}") from None
        self.signer = TokenSigner(key)
        signers = load_signers(cfg.sending_domains)  # an unreadable key stops the start, before the spool opens
        self.spool = Spool(cfg.state_dir)
        self.spool.open(asyncio.get_running_loop())
        self.accounts = AccountBook(self.spool)
        self.accounts.load()
        self.accounting = AccountingLog(os.path.join(cfg.state_dir, "accounting"))
        self.results = Results(self.spool, cfg, self.signer.address_hash, accounting=self.accounting)
        self.returns = Returns(self.spool, self.signer.address_hash)
        self.returns.load()
        self.scheduler = Scheduler(self.spool, self.results.record, self.accounts.is_held)
        self.resolver = MxResolver(cfg.nameservers, cfg.dns_static)
        self.templates = TemplateCache(self.spool.template, self.signer, cfg, dkim=signers,
                                       footer_for=self._footer_for)
        self.dispatcher = SmtpDispatcher(cfg, self.templates)
        self.link = ClusterLink(cfg.redis_url, self._node_id()) if cfg.redis_url else None
        self.throttles = Throttles(cfg.backoff, self._warmups(cfg), make=self._limits_factory())
        self.ready = ReadyQueues(self.resolver, RuleBook(cfg.shaping), self.throttles, self.dispatcher,
                                 self.scheduler, on_connections=self._connections)
        self.scheduler.router = self.ready
        self.accounts.on_release.append(self.scheduler.release)
        recovered = self.scheduler.recover()
        # a purge or erasure cut short by a crash may have left old page images in the WAL
        self.spool.truncate_wal()

        self.submit_service = SubmitService(cfg, self.spool, self.accounts, self.scheduler, self.signer.address_hash,
                                            self.returns)
        self.review = ReviewDesk(self.spool, self.scheduler.add)
        self.campaigns = CampaignBook(self.spool)
        self.campaigns.load()
        self.policy = PolicyEnforcer(cfg.policy, self.accounts, self.campaigns, self.spool,
                                     send_notice=self.submit_service.submit_notice)
        self.results.listeners += [self.policy.on_outcome, self.returns.on_outcome]
        self.results.write_hooks += [self.campaigns.take_writes, self.returns.take_writes]
        self.returns.write_hooks.append(self.policy.signal_writes)
        self.returns.listeners.append(self.policy.on_signal)
        self.accounts.on_status.append(self.policy.on_status)
        self.audit = AuditLog(cfg.audit_log, self.signer.address_hash)
        self.erasure = Erasure(self.spool, self.accounts, self.campaigns, self.returns, self.scheduler, self.results,
                               self.signer.address_hash)
        self.retention = Retention(self.spool, self.returns.suppression, cfg.retention)
        if self.link is not None:
            await self._join_cluster(self.link)
        self.listener = attach(cfg, self.signer, self.spool, self.returns, self.spool.job)
        self.submit_server = JsonLineServer(cfg.submit_socket, self.submit_service.handle,
                                            max_line=cfg.max_line_bytes, mode=0o660, group=cfg.submit_group,
                                            allowed_uids=cfg.allowed_uids,
                                            typed={"submit": decode_job})
        self.control_service = ControlService(self)
        self.control_server = JsonLineServer(cfg.control_socket, self.control_service.handle,
                                             max_line=1 << 20, mode=0o600, max_clients=32)
        self.http = HttpEndpoint(*cfg.metrics_listen, {"/metrics": self._metrics, "/healthz": self._healthz})
        await self.control_server.start()
        await self.http.start()
        try:
            await self.listener.start()
        except OSError as exc:
            raise ConfigError(f"listener.listen: cannot listen on {cfg.listener_listen[0]}:"
                              f"{cfg.listener_listen[1]}: {exc.strerror}") from None
        await self.submit_server.start()  # last: a ping that answers means everything is up
        metrics.UP.set(1)
        for feature in cfg.not_yet_in_effect:
            log.warning("config_not_yet_in_effect", key=feature)
        log.info("started", recovered=recovered, submit_socket=cfg.submit_socket,
                 control_socket=cfg.control_socket, metrics=f"{cfg.metrics_listen[0]}:{cfg.metrics_listen[1]}",
                 pid=os.getpid())
        self.notifier.notify("READY=1", f"STATUS=serving; {recovered} recipients recovered", f"MAINPID={os.getpid()}")
        loop = asyncio.get_running_loop()
        if self.notifier.watchdog_interval:
            self._background.append(loop.create_task(self._watchdog()))
        self._background.append(loop.create_task(self._housekeeping()))
        self._background.append(loop.create_task(self.retention.run()))

    # -- cluster mode (SPEC §10) ------------------------------------------------------------
    def _node_id(self) -> str:
        """This node's name in the cluster, kept in its spool: its shared counters are its own
        across restarts (a new name would count its campaigns twice)."""
        saved = self.spool.kv("cluster:node")
        if saved is not None:
            return saved.decode()
        host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
        node = f"{host}-{secrets.token_hex(3)}"
        self.spool.post(put_kv, "cluster:node", node.encode())
        return node

    def _limits_factory(self) -> MakeLimits:
        link = self.link
        if link is None:
            return LocalLimits

        def make(sending_domain: str, rule: ShapingRule, backoff: BackoffConfig,
                 warmup: WarmupCounter | None) -> LocalLimits:
            return SharedLimits(sending_domain, rule, link, backoff, warmup)

        return make

    async def _join_cluster(self, link: ClusterLink) -> None:
        """Share accounts, suppression, counters, job keys and erasures; first contact (and
        reconcile) before the node serves, or degraded from the start if Redis is away."""
        shared_accounts = SharedAccounts(link, self.accounts)
        SharedSuppression(link, self.returns)
        SharedCounters(link, self.campaigns, self.policy.rejudge)
        self.submit_service.job_keys = SharedJobKeys(link, self.config.retention)
        SharedErasure(link, self.erasure, shared_accounts)

        async def renew_leases() -> None:
            for limits in self.throttles.all():
                if isinstance(limits, SharedLimits):
                    await limits.renew()

        link.on_beat.append(renew_leases)
        check = self.signer.address_hash("mta-cluster-key-check")
        link.on_up.insert(0, lambda: self._same_key(link, check))
        await link.start()
        if self._key_mismatch:
            await link.close()
            raise ConfigError("security.token_key_file: this node's key is not the one the other nodes of "
                              "the cluster use (suppression hashes and bounce tokens must match)")
        if not link.up:
            log.warning("cluster_degraded", error="redis unavailable at start", nodes=link.nodes)

    async def _same_key(self, link: ClusterLink, check: str) -> None:
        """Every node must hold the same token key: suppression is shared as keyed hashes."""
        key = link.key("key_check")

        async def compare(r: Any) -> bool:
            await r.set(key, check, nx=True)
            return bool(await r.get(key) == check.encode())

        self._key_mismatch = not await link.call(compare)
        if self._key_mismatch:
            raise ClusterDown("token key mismatch")  # never up with a key the others do not share

    def _warmups(self, cfg: Config) -> dict[str, WarmupCounter]:
        """Warm-up counters per sending domain, with today's count restored from the spool."""
        out: dict[str, WarmupCounter] = {}
        for plan in cfg.warmup:
            counter = WarmupCounter.of(plan)
            saved = self.spool.kv(f"warmup:{plan.sending_domain}")
            if saved is not None:
                state = msgspec.json.decode(saved)
                counter.day, counter.sent = float(state["day"]), int(state["sent"])
            counter.on_change = self._warmup_changed
            out[plan.sending_domain] = counter
        return out

    def _warmup_changed(self, counter: WarmupCounter) -> None:
        # Persisted at most once a second: a crash can forget the last second's count, which
        # only lets that many more messages out on the same day.
        self._warmup_dirty[counter.plan.sending_domain] = counter
        if self._warmup_handle is None:
            self._warmup_handle = asyncio.get_running_loop().call_later(1.0, self._save_warmups)

    def _save_warmups(self) -> None:
        self._warmup_handle = None
        dirty, self._warmup_dirty = self._warmup_dirty, {}
        for sd, counter in dirty.items():
            self.spool.post(put_kv, f"warmup:{sd}", msgspec.json.encode({"day": counter.day, "sent": counter.sent}))

    # -- running ----------------------------------------------------------------------
    def _footer_for(self, account_id: str) -> tuple[str, str] | None:
        """The provider footer, unless the account has the PRO package (--no-footer)."""
        account = self.accounts.get(account_id)
        if account is not None and account.no_footer:
            return None
        return self.config.footer_text, self.config.footer_html

    def _connections(self, sending_domain: str, provider: str, n: int) -> None:
        metrics.CONNECTIONS.labels(sending_domain, provider).set(n)

    async def _watchdog(self) -> None:
        # Pinged from the event loop itself: a wedged loop stops the pings and systemd restarts us.
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(self.notifier.watchdog_interval)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(5)
            depth = self.scheduler.depth()
            self._rate_samples = [*self._rate_samples[-12:], (time.monotonic(), self._finished())]
            for state, n in depth.items():
                metrics.QUEUE_DEPTH.labels(state).set(n)
            metrics.PAUSED_ACCOUNTS.set(self.accounts.paused_count())
            self._disk_metrics()
            self._throttle_metrics()
            self.notifier.notify(f"STATUS=queue ready={depth['ready']} deferred={depth['deferred']} "
                                 f"held={depth['held']}; delivered={self.results.counts['delivered']}")

    def _throttle_metrics(self) -> None:
        now = time.time()
        for limits in self.throttles.all():
            labels = (limits.sending_domain, limits.rule.provider)
            metrics.THROTTLE_WAITS.labels(*labels).inc(limits.waits)
            limits.waits = 0
            metrics.THROTTLE_RATE.labels(*labels).set(limits.current_rate or 0)
            metrics.THROTTLE_SUSPENDED.labels(*labels).set(limits.backoff.wait(now))

    def _disk_metrics(self) -> None:
        try:
            usage = shutil.disk_usage(self.config.state_dir)
        except OSError:
            return
        metrics.DISK_FREE.set(usage.free)
        metrics.DISK_SIZE.set(usage.total)
        metrics.SPOOL_BYTES.set(self.spool.size_bytes())
        newest = self.spool.last_cursor()
        metrics.EVENT_FEED_CURSOR.set(newest)
        metrics.EVENT_FEED_LAG.set(max(0, newest - self.submit_service.read_up_to))

    def _metrics(self) -> tuple[int, str, bytes]:
        self._throttle_metrics()
        self._disk_metrics()
        for state, n in self.scheduler.depth().items():
            metrics.QUEUE_DEPTH.labels(state).set(n)
        metrics.PAUSED_ACCOUNTS.set(self.accounts.paused_count())
        metrics.DNS_LOOKUPS.labels("hit")._value.set(self.resolver.hits)
        metrics.DNS_LOOKUPS.labels("miss")._value.set(self.resolver.misses)
        return 200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()

    def _healthz(self) -> tuple[int, str, bytes]:
        if self.spool.last_error:
            return 503, "text/plain", f"spool: {self.spool.last_error}\n".encode()
        return 200, "text/plain", b"ok\n"

    def _finished(self) -> int:
        c = self.results.counts
        return c["delivered"] + c["bounced"] + c["expired"]

    def _rate_per_minute(self) -> float:
        """Finished deliveries per minute over the last minute (sampled every 5 s)."""
        if not self._rate_samples:
            return 0.0
        t0, n0 = self._rate_samples[0]
        elapsed = time.monotonic() - t0
        return 60.0 * (self._finished() - n0) / elapsed if elapsed > 0 else 0.0

    def status(self) -> dict[str, Any]:
        depth = self.scheduler.depth()
        try:
            disk = shutil.disk_usage(self.config.state_dir)
            disk_free = disk.free
        except OSError:
            disk_free = -1
        paused = [{"id": a.id, "reason": a.pause_reason} for a in self.accounts.accounts.values()
                  if a.status == "paused"]
        return {
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
            "queue": depth, "totals": dict(self.results.counts),
            "rate_per_minute": round(self._rate_per_minute(), 1),
            "spool": {"bytes": self.spool.size_bytes(), "disk_free_bytes": disk_free,
                      "commits": self.spool.commits, "error": self.spool.last_error or None},
            "connections": self.ready.stats(), "paused_accounts": paused,
            "throttles": [t.state(time.time()) for t in self.throttles.all()],
            "accounts": len(self.accounts.accounts), "review": self.review.count(),
            "not_yet_in_effect": list(self.config.not_yet_in_effect),
            "cluster": None if self.link is None else {"node": self.link.node, "degraded": not self.link.up,
                                                        "nodes": self.link.nodes},
        }

    def reload(self) -> dict[str, Any]:
        """Re-read the config file; a bad one is refused and the old one stays (SPEC §3)."""
        try:
            new = load_config(self.config.path)
            signers = load_signers(new.sending_domains)
        except ConfigError as exc:
            log.error("config_reload_refused", error=str(exc), path=self.config.path)
            return {"reloaded": False, "error": str(exc)}
        fixed = ("state_dir", "submit_socket", "control_socket", "metrics_listen")
        kept = [k for k in fixed if getattr(new, k) != getattr(self.config, k)]
        self.config = new
        self.results.config = new
        self.policy.policy = new.policy
        self.retention.retention = new.retention
        self.audit.reopen()  # log rotation renames the file, then reloads
        self.submit_service.config = new
        self.dispatcher.reconfigure(new, signers)
        self.ready.rules = RuleBook(new.shaping)
        known = self.throttles.warmups
        fresh = self._warmups(new)
        for sd, counter in fresh.items():  # a changed plan keeps today's count
            if sd in known:
                counter.day, counter.sent = known[sd].day, known[sd].sent
        self.throttles.reconfigure(new.backoff, fresh)
        self.ready.retune()
        self.resolver.static = new.dns_static
        log.info("config_reloaded", path=new.path, restart_needed_for=kept or None)
        return {"reloaded": True, "restart_needed_for": kept}

    # -- stop ---------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop taking work, let in-flight SMTP transactions finish (bounded), flush the spool."""
        self.notifier.notify("STOPPING=1")
        log.info("stopping")
        self.submit_server.accepting = False
        self.scheduler.draining = True
        await self.submit_server.close()
        await self.listener.close()
        for rq in self.ready.queues.values():
            rq.stop_waiting()
        deadline = time.monotonic() + DRAIN_DEADLINE
        while any(rq.workers for rq in self.ready.queues.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._background:
            task.cancel()
        self.scheduler.stop()
        if self.link is not None:
            await self.link.close()
        await self.control_server.close()
        await self.http.close()
        self.results.flush()
        self._save_warmups()
        self.spool.close()
        self.accounting.close()
        await self.templates.signing.aclose()
        self.audit.close()
        metrics.UP.set(0)
        log.info("stopped")


async def serve(config: Config) -> int:
    app = App(config)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    await app.start()
    gc.freeze()  # what start-up built lives as long as the daemon: later collections skip it
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    await done.wait()
    with contextlib.suppress(NotImplementedError):
        loop.remove_signal_handler(signal.SIGHUP)
    await app.stop()
    return 0


GC_THRESHOLD = 50_000  # allocations between young collections (CPython's default: 700)


def run(config_path: str) -> int:
    """`mta run --config PATH`: the daemon in the foreground on uvloop."""
    import uvloop

    setup_logs()
    # A 10,000-recipient job allocates some 50,000 objects; at the default threshold of 700
    # that set off dozens of young collections per job, each walking what the job had
    # built so far. Almost none of it is cyclic garbage (structs, strings, tuples).
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("config_invalid", error=str(exc))
        print(f"mta: invalid config: {exc}", flush=True)
        return 2
    try:
        return uvloop.run(serve(config))
    except ConfigError as exc:
        log.error("config_invalid", error=str(exc))
        print(f"mta: invalid config: {exc}", flush=True)
        return 2
    except RuntimeError as exc:
        log.error("start_failed", error=str(exc))
        return 1
