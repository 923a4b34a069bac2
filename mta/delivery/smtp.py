"""SMTP client sessions: one connection, many transactions (SPEC §6).

One recipient per transaction (each message has its own rendering and return path),
many transactions per connection, MAIL/RCPT/DATA pipelined where the receiver offers
PIPELINING (wire.py says why the wire is our own). Every failure comes back as a `Reply`,
never an exception, so the ready queue has one thing to hand to results.record(): code 0 means
"no reply" (connection lost, timeout), which is always temporary.
"""

from __future__ import annotations

import itertools
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable

from .. import metrics
from ..config import Config, SendingDomain
from ..logs import get as get_logger
from ..tokens import TokenSigner
from ..types import ConnectFailed, JobInfo, RecipientRow, Reply, Route
from .dkim import DkimSigner, SigningPool
from .render import CompiledJob
from .wire import SmtpWire, WireError, dot_stuff, open_wire

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
        self.signing = SigningPool()

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


def _reply(code: int, text: str, stage: str) -> Reply:
    return Reply(code, " ".join(text.split()), stage)


class SmtpSession:
    """An open connection past EHLO; `deliver` runs one transaction on it."""

    def __init__(self, wire: SmtpWire, extensions: set[str], templates: TemplateCache, config: Config, peer: str):
        self.wire = wire
        self.templates = templates
        self.timeouts = config.timeouts
        self.peer = peer
        self.pipelining = "pipelining" in extensions
        self.smtputf8 = "smtputf8" in extensions
        self._closing = False

    @property
    def usable(self) -> bool:
        return not self._closing and self.wire.usable

    async def deliver(self, row: RecipientRow) -> Reply:
        try:
            compiled = self.templates.get(row.job)
            rendered = compiled.render(row, signed=False)
        except (LookupError, KeyError, ValueError) as exc:
            return Reply(554, f"5.3.0 message could not be rendered: {exc}", "local")
        data = await self.templates.signing.sign(compiled.dkim, rendered.data) if compiled.dkim else rendered.data
        encoding, params = "ascii", b""
        if rendered.smtputf8:
            if not self.smtputf8:
                # RFC 6531 §3.4: without SMTPUTF8 at the receiver the address cannot be used.
                return Reply(553, "5.6.7 non-ASCII address and the receiver does not offer SMTPUTF8", "local")
            encoding, params = "utf-8", b" SMTPUTF8"
        mail = b"MAIL FROM:<" + rendered.mail_from.encode(encoding) + b">" + params + b"\r\n"
        rcpt = b"RCPT TO:<" + row.email.encode(encoding) + b">\r\n"
        wire, t = self.wire, self.timeouts
        stage = "mail"
        try:
            if self.pipelining:  # RFC 2920: MAIL, RCPT and DATA in one write, three replies back
                wire.write(mail + rcpt + b"DATA\r\n")
                replies = await wire.replies(3, t.mail + t.rcpt + t.data)
            else:
                replies = [await wire.command(mail, t.mail)]
                if replies[0][0] // 100 == 2:
                    stage = "rcpt"
                    replies.append(await wire.command(rcpt, t.rcpt))
                    if replies[1][0] // 100 == 2:
                        stage = "data"
                        replies.append(await wire.command(b"DATA\r\n", t.data))
            failed = self._first_failure(replies)
            if failed is not None:
                if replies[-1][0] == 354:  # DATA was taken although a step before it failed: end it empty
                    stage = "data"
                    await wire.command(b".\r\n", t.final_dot)
                await self._after_failure(failed)
                return failed
            stage = "data"
            wire.write(dot_stuff(data))
            await wire.drain()
            code, text = (await wire.replies(1, t.final_dot))[0]
            reply = _reply(code, text, "data")
            if code >= 400:
                await self._after_failure(reply)
            return reply
        except WireError as exc:
            self._closing = True
            return Reply(0, f"{_SOFT_LOST} during {stage.upper()} with {self.peer}: {exc}", stage)

    @staticmethod
    def _first_failure(replies: list[tuple[int, str]]) -> Reply | None:
        for (code, text), stage, ok in zip(replies, ("mail", "rcpt", "data"), (2, 2, 3), strict=False):
            if code // 100 != ok:
                return _reply(code, text, stage)
        return None

    async def _after_failure(self, reply: Reply) -> None:
        if reply.code == 421:  # the server is closing the connection (RFC 5321 §3.8)
            self._closing = True
            return
        try:
            code, _ = await self.wire.command(b"RSET\r\n", self.timeouts.mail)
            if code // 100 != 2:
                self._closing = True
        except WireError:
            self._closing = True

    async def close(self) -> None:
        self._closing = True
        if self.wire.usable:
            try:
                self.wire.write(b"QUIT\r\n")  # the reply is not worth a wait: close() flushes it out
            except WireError:
                pass
        self.wire.close()


class _TlsFailed(Exception):
    """The STARTTLS handshake failed after the server offered it."""


class _Refused(Exception):
    """The server answered the greeting or EHLO with a refusal."""

    def __init__(self, reply: Reply):
        super().__init__(reply.line())
        self.reply = reply


class SmtpDispatcher:
    """Opens sessions to a route from a sending domain's egress (EHLO name, source IP)."""

    def __init__(self, config: Config, templates: TemplateCache):
        self.config = config
        self.templates = templates
        self._source = itertools.count()
        self._no_tls: dict[tuple[str, int], float] = {}  # (ip, port) -> until when we skip STARTTLS
        # Opportunistic TLS (RFC 7435): encrypt when offered, verify nothing, as MTAs do
        # without DANE or MTA-STS; a certificate problem must not stop the mail.
        self._tls_context = ssl.create_default_context()
        self._tls_context.check_hostname = False
        self._tls_context.verify_mode = ssl.CERT_NONE

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

    async def _open(self, sending: SendingDomain, host: str, ip: str, port: int,
                    tls: bool) -> tuple[SmtpWire, set[str]]:
        """A session past EHLO, with STARTTLS when offered and `tls` (opportunistic, RFC 3207)."""
        t = self.config.timeouts
        wire = await open_wire(ip, port, self._source_address(sending, ip), t.connect)
        try:
            code, text = (await wire.replies(1, t.greeting))[0]
            if code != 220:
                raise _Refused(_reply(code, text, "connect"))
            extensions = await self._ehlo(wire, sending.ehlo)
            if tls and "starttls" in extensions:
                try:
                    code, text = await wire.command(b"STARTTLS\r\n", t.greeting)
                    if code != 220:
                        raise WireError(f"STARTTLS answered {code} {text}")
                    await wire.starttls(self._tls_context, host, t.greeting)
                except (WireError, OSError, ssl.SSLError, TimeoutError) as exc:
                    raise _TlsFailed(exc) from exc
                extensions = await self._ehlo(wire, sending.ehlo)
        except BaseException:
            wire.close()
            raise
        return wire, extensions

    async def _ehlo(self, wire: SmtpWire, name: str) -> set[str]:
        """The extensions the server offers (lower-case keywords); HELO if EHLO is refused."""
        timeout = self.config.timeouts.greeting
        code, text = await wire.command(b"EHLO " + name.encode("ascii") + b"\r\n", timeout)
        if code == 250:
            return {line.split(" ", 1)[0].lower() for line in text.split("\n")[1:] if line}
        code, text = await wire.command(b"HELO " + name.encode("ascii") + b"\r\n", timeout)
        if code != 250:
            raise _Refused(_reply(code, text, "connect"))
        return set()

    async def connect(self, route: Route, sending_domain: str) -> SmtpSession:
        sending = self.config.sending_domains[sending_domain]
        last = Reply(0, f"4.4.1 no MX host of {route.domain} could be reached", "connect")
        for host in route.hosts:
            for ip, port in host.addresses:
                peer = f"{host.name}[{ip}]:{port}"
                try:
                    try:
                        tls = self._no_tls.get((ip, port), 0) < time.time()
                        wire, extensions = await self._open(sending, host.name, ip, port, tls)
                    except _TlsFailed as exc:
                        # Opportunistic TLS must not make mail undeliverable: this host gets it in the
                        # clear for a while (like Postfix's smtp_tls_security_level = may), and we count it.
                        self._no_tls[(ip, port)] = time.time() + TLS_RETRY_AFTER
                        metrics.TLS_FALLBACKS.labels(sending_domain).inc()
                        log.warning("tls_fallback", sending_domain=sending_domain, peer=peer,
                                    error=f"{type(exc.__cause__).__name__}: {exc.__cause__}"[:200])
                        wire, extensions = await self._open(sending, host.name, ip, port, tls=False)
                    return SmtpSession(wire, extensions, self.templates, self.config, peer)
                except _Refused as exc:
                    last = exc.reply
                except (WireError, OSError, TimeoutError) as exc:
                    last = Reply(0, f"4.4.1 connection to {peer} failed: {type(exc).__name__}: {exc}", "connect")
        raise ConnectFailed(last)
