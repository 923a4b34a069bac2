"""The SMTP listener for what comes back: bounces, ARF reports, unsubscribe mails (SPEC §7).

It accepts mail only for
  * VERP return paths   b-<token>@<bounce domain of a managed sending domain>
  * unsubscribe mailtos <unsubscribe_local_part>-<token>@<bounce domain>
  * the feedback-loop addresses of `listener.fbl_addresses`
and refuses every other recipient with 550 (never an open relay). A token is verified with
the HMAC key at RCPT, before anything is looked up or recorded: a forged or altered token
gets 550 5.7.1, a log line, and changes nothing.

Abuse limits (sessions per client, recipients per session, message size, bad recipients
per session) never refuse a recipient that carries a valid token: the session cap is
checked at connect, where it only bounds parallelism; the bad-recipient cap closes the
session only after that many forged or foreign addresses.

aiosmtpd (>= 1.4.5) ends DATA only at <CR><LF>.<CR><LF>: a bare LF around the dot does
not end the message, so SMTP smuggling cannot split one message into two here.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from .bounce.analyse import Result, analyse
from .config import Config
from .logs import get as get_logger
from .queue.spool import Spool
from .returns import Returns, Signal
from .tokens import BOUNCE, UNSUBSCRIBE, TokenRef, TokenSigner
from .types import JobInfo

log = get_logger("mta.listener")

MAX_SESSIONS_PER_CLIENT = 20
MAX_RECIPIENTS = 50
MAX_BAD_RECIPIENTS = 10
MAX_MESSAGE_BYTES = 10 * 1024 * 1024
_TOKEN_IN_TEXT = re.compile(rb"\b(b|[a-z0-9]+)-([a-z2-7]{16,60})@([a-z0-9.-]+)", re.I)


@dataclass(slots=True)
class Target:
    """One accepted envelope recipient."""

    purpose: str                    # bounce | unsubscribe | fbl
    ref: TokenRef | None = None


@dataclass(slots=True)
class SessionState:
    targets: list[Target] = field(default_factory=list)
    bad: int = 0


class ReturnHandler:
    """aiosmtpd handler: RCPT filtering and token checks, DATA analysis and recording."""

    def __init__(self, config: Config, signer: TokenSigner, spool: Spool, returns: Returns,
                 jobs: Callable[[int], JobInfo | None]):
        self.signer = signer
        self.spool = spool
        self.returns = returns
        self.jobs = jobs
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.bounce_domains = {sd.bounce_domain.lower() for sd in config.sending_domains.values()}
        self.unsub_prefix = config.unsubscribe_local_part.lower() + "-"
        self.fbl = set(config.fbl_addresses)

    # -- RCPT --------------------------------------------------------------------------
    def target(self, address: str) -> Target | str:
        """The target an address names, or the SMTP reply that refuses it."""
        addr = address.strip().strip("<>").lower()
        if addr in self.fbl:
            return Target("fbl")
        local, _, domain = addr.rpartition("@")
        if domain not in self.bounce_domains:
            return "550 5.7.1 Relaying denied: this host takes mail for its bounce addresses only"
        if local.startswith("b-"):
            purpose, token, want = "bounce", local[2:], BOUNCE
        elif local.startswith(self.unsub_prefix):
            purpose, token, want = "unsubscribe", local[len(self.unsub_prefix):], UNSUBSCRIBE
        else:
            return "550 5.1.1 No such mailbox"
        ref = self.signer.verify(token)
        if ref is None or ref.purpose != want:
            return "550 5.7.1 Invalid or forged token"
        return Target(purpose, ref)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        state = _state(session)
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        found = self.target(address)
        if isinstance(found, str):
            state.bad += 1
            log.warning("listener_refused", peer=_peer(session), reply=found[:40],
                        forged="forged" in found)
            if state.bad > MAX_BAD_RECIPIENTS:
                return "421 4.7.0 Too many refused recipients, closing"
            return found
        state.targets.append(found)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    # -- DATA --------------------------------------------------------------------------
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        state = _state(session)
        targets, state.targets = state.targets, []
        try:
            for target in targets:
                await self._process(target, raw)
        except Exception as exc:
            log.error("listener_error", peer=_peer(session), error=f"{type(exc).__name__}: {exc}")
            return "451 4.3.0 Temporary failure, try again later"
        return "250 2.0.0 OK"

    async def _process(self, target: Target, raw: bytes) -> None:
        if target.purpose == "unsubscribe":
            assert target.ref is not None
            await self._signal(target.ref, "unsubscribed", None, raw)
            return
        results = analyse(raw)
        ref = target.ref
        if ref is None:  # a report to the FBL address: the original names the message
            ref = self._token_in(raw)
            if ref is None:
                log.warning("listener_unattributed", kinds=sorted({r.kind for r in results}))
                return
        for result in results:
            if result.kind == "complaint":
                await self._signal(ref, "complained", result, raw)
                return
            if result.kind in ("hard", "soft") and (result.status or result.replycode or result.reason != "onhold"):
                # (a "bounce" that names no code and no reason is not evidence of anything)
                await self._signal(ref, "bounced", result, raw)
                return
        log.info("listener_ignored", kinds=sorted({r.kind for r in results}) or ["none"])

    def _token_in(self, raw: bytes) -> TokenRef | None:
        """A verified VERP or unsubscribe token in an attached original message."""
        for m in _TOKEN_IN_TEXT.finditer(raw):
            if m.group(3).decode().lower() not in self.bounce_domains:
                continue
            ref = self.signer.verify(m.group(2).decode())
            if ref is not None:
                return ref
        return None

    async def _signal(self, ref: TokenRef, kind: str, result: Result | None, raw: bytes) -> None:
        found = self.spool.recipient(ref.recipient)
        job = self.jobs(ref.job)
        if found is None or job is None or found[0] != ref.job:
            log.warning("listener_unknown_message", job=ref.job)
            return
        _, rhash, address, _ = found
        if (address is None and result is not None and result.recipient
                and self.signer.address_hash(result.recipient) == rhash):
            # the address left the spool when delivery was final; the report may name it
            address = result.recipient
        detail: dict[str, Any] = {}
        if kind == "bounced" and result is not None:
            code = " ".join(str(x) for x in (result.replycode, result.status) if x)
            detail = {"kind": result.kind, "reason": result.reason, "code": code or None}
        elif kind == "complained" and result is not None:
            address = None  # SPEC §8: never the complainer's address
            detail = {"feedback_type": result.feedback_type or "abuse"}
        await self.returns.record(Signal(kind, job.account, job.campaign, rhash, address, job.job_id,
                                         ref.recipient, **detail))


def _state(session: Session) -> SessionState:
    state = getattr(session, "mta_state", None)
    if state is None:
        state = SessionState()
        session.mta_state = state  # type: ignore[attr-defined]
    return state


def _peer(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class ListenerServer:
    """The listening socket, with a per-client cap on concurrent sessions."""

    def __init__(self, config: Config, handler: ReturnHandler, hostname: str):
        self.host, self.port = config.listener_listen
        self.handler = handler
        self.hostname = hostname
        self.server: asyncio.AbstractServer | None = None
        self.sessions: Counter[str] = Counter()

    def _protocol(self) -> SMTP:
        listener = self

        class CappedSMTP(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                peer = transport.get_extra_info("peername")
                self._mta_ip = str(peer[0]) if isinstance(peer, tuple) else "local"
                listener.sessions[self._mta_ip] += 1
                if listener.sessions[self._mta_ip] > MAX_SESSIONS_PER_CLIENT:
                    assert isinstance(transport, asyncio.WriteTransport)
                    transport.write(b"421 4.7.0 Too many sessions from your address\r\n")
                    transport.close()
                    return
                super().connection_made(transport)

            def connection_lost(self, error: Exception | None) -> None:
                listener.sessions[self._mta_ip] -= 1
                if listener.sessions[self._mta_ip] <= 0:
                    del listener.sessions[self._mta_ip]
                if getattr(self, "_handler_coroutine", None) is not None:
                    super().connection_lost(error)

        return CappedSMTP(self.handler, hostname=self.hostname, data_size_limit=MAX_MESSAGE_BYTES,
                          enable_SMTPUTF8=True, decode_data=False, ident="mta listener")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, self.host, self.port, reuse_address=True)
        log.info("listener_started", listen=f"{self.host}:{self.port}")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def attach(config: Config, signer: TokenSigner, spool: Spool, returns: Returns,
           jobs: Callable[[int], JobInfo | None]) -> ListenerServer:
    """The listener wired to the daemon's parts (the app's composition root calls this)."""
    handler = ReturnHandler(config, signer, spool, returns, jobs)
    hostname = next(iter(config.sending_domains.values())).ehlo if config.sending_domains else "localhost"
    return ListenerServer(config, handler, hostname)


__all__ = ["ListenerServer", "ReturnHandler", "attach"]
