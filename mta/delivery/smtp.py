"""SMTP client sessions with aiosmtplib: one connection, many transactions (SPEC §6).

One recipient per transaction (each message has its own rendering and return path),
many transactions per connection. Every failure comes back as a `Reply`, never an
exception, so the ready queue has one thing to hand to results.record(): code 0 means
"no reply" (connection lost, timeout), which is always temporary.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable

import aiosmtplib

from .. import metrics
from ..config import Config, SendingDomain
from ..logs import get as get_logger
from ..tokens import TokenSigner
from ..types import ConnectFailed, JobInfo, RecipientRow, Reply, Route
from .dkim import DkimSigner
from .render import CompiledJob

_SOFT_LOST = "4.4.2 connection lost"
TLS_RETRY_AFTER = 3600.0  # after a failed handshake, a host gets mail in the clear this long
log = get_logger("mta.delivery")


class TemplateCache:
    """Compiled job templates by job row; bounded, so a million-job spool stays small."""

    def __init__(self, load: Callable[[int], bytes | None], signer: TokenSigner, config: Config, *,
                 dkim: dict[str, list[DkimSigner]] | None = None,
                 footer_for: Callable[[str], tuple[str, str] | None] | None = None, size: int = 512):
        self._load = load
        self.signer = signer
        self.config = config
        self.dkim = dkim or {}
        self.footer_for = footer_for
        self._size = size
        self._cache: OrderedDict[int, CompiledJob] = OrderedDict()

    def clear(self) -> None:
        """Forget compiled jobs (after a reload or an account's footer setting changed)."""
        self._cache.clear()

    def get(self, job: JobInfo) -> CompiledJob:
        compiled = self._cache.get(job.rowid)
        if compiled is not None:
            self._cache.move_to_end(job.rowid)
            return compiled
        blob = self._load(job.rowid)
        if blob is None:
            raise LookupError(f"job {job.rowid} has no template in the spool")
        compiled = CompiledJob(job, blob, self.config.sending_domains[job.sending_domain], self.signer,
                               self.config.unsubscribe_local_part,
                               footer=self.footer_for(job.account) if self.footer_for else None,
                               dkim=self.dkim.get(job.sending_domain))
        self._cache[job.rowid] = compiled
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return compiled


def _reply_of(exc: aiosmtplib.SMTPResponseException, stage: str) -> Reply:
    return Reply(int(exc.code), " ".join(str(exc.message).split()), stage)


class SmtpSession:
    def __init__(self, smtp: aiosmtplib.SMTP, templates: TemplateCache, config: Config, peer: str):
        self.smtp = smtp
        self.templates = templates
        self.timeouts = config.timeouts
        self.peer = peer
        self.usable = True
        self.smtputf8 = smtp.supports_extension("smtputf8")

    async def deliver(self, row: RecipientRow) -> Reply:
        try:
            rendered = self.templates.get(row.job).render(row)
        except (LookupError, KeyError, ValueError) as exc:
            return Reply(554, f"5.3.0 message could not be rendered: {exc}", "local")
        options: list[str] = []
        encoding = "ascii"
        if rendered.smtputf8:
            if not self.smtputf8:
                # RFC 6531 §3.4: without SMTPUTF8 at the receiver the address cannot be used.
                return Reply(553, "5.6.7 non-ASCII address and the receiver does not offer SMTPUTF8", "local")
            options, encoding = ["SMTPUTF8"], "utf-8"
        stage = "mail"
        try:
            await self.smtp.mail(rendered.mail_from, options=options, encoding=encoding,
                                 timeout=self.timeouts.mail)
            stage = "rcpt"
            await self.smtp.rcpt(row.email, encoding=encoding, timeout=self.timeouts.rcpt)
            stage = "data"
            response = await self.smtp.data(rendered.data, timeout=self.timeouts.final_dot)
            return Reply(int(response.code), " ".join(response.message.split()), "data")
        except aiosmtplib.SMTPResponseException as exc:
            reply = _reply_of(exc, stage)
            if reply.code == 421:  # the server is closing the connection (RFC 5321 §3.8)
                self.usable = False
            else:
                await self._reset()
            return reply
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.usable = False
            return Reply(0, f"{_SOFT_LOST} during {stage.upper()} with {self.peer}: {type(exc).__name__}", stage)

    async def _reset(self) -> None:
        try:
            await self.smtp.rset(timeout=self.timeouts.mail)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self.usable = False

    async def close(self) -> None:
        self.usable = False
        try:
            if self.smtp.is_connected:
                await self.smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            self.smtp.close()


class _TlsFailed(Exception):
    """The STARTTLS handshake failed after the server offered it."""


class SmtpDispatcher:
    """Opens sessions to a route from a sending domain's egress (EHLO name, source IP)."""

    def __init__(self, config: Config, templates: TemplateCache):
        self.config = config
        self.templates = templates
        self._source = itertools.count()
        self._no_tls: dict[tuple[str, int], float] = {}  # (ip, port) -> until when we skip STARTTLS

    def reconfigure(self, config: Config, dkim: dict[str, list[DkimSigner]]) -> None:
        self.config = config
        self.templates.config = config
        self.templates.dkim = dkim
        self.templates.clear()

    def _source_address(self, sending: SendingDomain, ip: str) -> tuple[str, int] | None:
        candidates = [s for s in sending.source_ips if (":" in s) == (":" in ip)]
        if not candidates:
            return None
        return candidates[next(self._source) % len(candidates)], 0

    async def _open(self, sending: SendingDomain, ip: str, port: int, tls: bool) -> aiosmtplib.SMTP:
        """A session past EHLO, with STARTTLS when offered and `tls` (opportunistic, RFC 3207)."""
        t = self.config.timeouts
        smtp = aiosmtplib.SMTP(hostname=ip, port=port, local_hostname=sending.ehlo,
                               source_address=self._source_address(sending, ip),
                               timeout=t.connect, start_tls=False, validate_certs=False)
        try:
            await smtp.connect(timeout=t.connect)
            if smtp.last_ehlo_response is None:
                await smtp.ehlo(timeout=t.greeting)
        except BaseException:
            smtp.close()
            raise
        if tls and smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(timeout=t.greeting)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                smtp.close()
                raise _TlsFailed(exc) from exc
        return smtp

    async def connect(self, route: Route, sending_domain: str) -> SmtpSession:
        sending = self.config.sending_domains[sending_domain]
        last = Reply(0, f"4.4.1 no MX host of {route.domain} could be reached", "connect")
        for host in route.hosts:
            for ip, port in host.addresses:
                peer = f"{host.name}[{ip}]:{port}"
                try:
                    try:
                        smtp = await self._open(sending, ip, port, tls=self._no_tls.get((ip, port), 0) < time.time())
                    except _TlsFailed as exc:
                        # Opportunistic TLS must not make mail undeliverable: this host gets it in the
                        # clear for a while (like Postfix's smtp_tls_security_level = may), and we count it.
                        self._no_tls[(ip, port)] = time.time() + TLS_RETRY_AFTER
                        metrics.TLS_FALLBACKS.labels(sending_domain).inc()
                        log.warning("tls_fallback", sending_domain=sending_domain, peer=peer,
                                    error=f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:200])
                        smtp = await self._open(sending, ip, port, tls=False)
                    return SmtpSession(smtp, self.templates, self.config, peer)
                except aiosmtplib.SMTPResponseException as exc:
                    last = Reply(int(exc.code), " ".join(str(exc.message).split()), "connect")
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    last = Reply(0, f"4.4.1 connection to {peer} failed: {type(exc).__name__}: {exc}", "connect")
        raise ConnectFailed(last)
