"""A scriptable receiving MX for tests: aiosmtpd on a loopback address, in its own thread.

The recipient's local part decides the answer:
    ok*     250                    hard*   550 5.1.1 at RCPT
    defer*  451 4.3.0 at RCPT the first `defer_times` tries, then 250
    rate*   421 4.7.28 and close, the first `defer_times` tries
    drop*   connection dropped at RCPT the first `defer_times` tries
    slow*   stall `stall` seconds before answering DATA
    data*   554 5.6.0 after DATA
    block*  554 5.7.1 at RCPT naming a DNS blocklist
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    mail_from: str
    rcpt: str
    data: bytes
    at: float


@dataclass
class SinkState:
    received: list[Received] = field(default_factory=list)
    tries: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    open_now: int = 0
    max_open: int = 0
    tls_sessions: int = 0


class _Handler:
    def __init__(self, sink: Sink):
        self.sink = sink

    async def handle_RCPT(self, server: SMTP, session: object, envelope: object, address: str,
                          options: list[str]) -> str:
        sink = self.sink
        with sink.lock:
            sink.state.tries[address.lower()] += 1
            n = sink.state.tries[address.lower()]
        local = address.lower()
        if local.startswith("hard"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if local.startswith("block"):
            return "554 5.7.1 Service unavailable; client host [127.0.0.1] blocked using zen.spamhaus.org"
        if local.startswith("defer") and n <= sink.defer_times:
            return "451 4.3.0 Temporary failure, try again later"
        if local.startswith("rate") and n <= sink.defer_times:
            asyncio.get_running_loop().call_later(0.02, server.transport.close)
            return "421 4.7.28 Our system has detected an unusual rate of unsolicited mail"
        if local.startswith("drop") and n <= sink.defer_times:
            server.transport.abort()
            return "421 dropped"
        envelope.rcpt_tos.append(address)  # type: ignore[attr-defined]
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        rcpts = list(envelope.rcpt_tos)  # type: ignore[attr-defined]
        if any(r.lower().startswith("slow") for r in rcpts):
            await asyncio.sleep(self.sink.stall)
        if any(r.lower().startswith("data") for r in rcpts):
            return "554 5.6.0 Message content rejected"
        reset = [r for r in rcpts if r.lower().startswith("reset")]
        with self.sink.lock:
            first = reset and self.sink.state.tries[reset[0].lower()] <= self.sink.defer_times
        if first:  # the whole message arrived, then the connection is reset before the 250
            server.transport.abort()
            return "421 reset"
        with self.sink.lock:
            if getattr(session, "ssl", None):
                self.sink.state.tls_sessions += 1
            for r in rcpts:
                self.sink.state.received.append(
                    Received(envelope.mail_from, r, envelope.original_content, time.monotonic()))  # type: ignore
        return "250 2.0.0 Ok: queued"


class _Tracking(SMTP):
    def __init__(self, handler: _Handler, sink: Sink, **kw: object):
        super().__init__(handler, **kw)
        self._sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with self._sink.lock:
            st = self._sink.state
            st.connections += 1
            st.open_now += 1
            st.max_open = max(st.max_open, st.open_now)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        with self._sink.lock:
            self._sink.state.open_now -= 1
        super().connection_lost(exc)


class _Controller(Controller):
    def __init__(self, sink: Sink, **kw: object):
        self._sink = sink
        super().__init__(_Handler(sink), **kw)

    def factory(self) -> SMTP:
        return _Tracking(self.handler, self._sink, **self.SMTP_kwargs)


class Sink:
    def __init__(self, host: str = "127.0.0.2", *, port: int = 0, defer_times: int = 1, stall: float = 1.0,
                 smtputf8: bool = False, tls_context: object = None):
        self.host = host
        self.port = port or free_port(host)
        self.defer_times = defer_times
        self.stall = stall
        self.lock = threading.Lock()
        self.state = SinkState()
        self._controller = _Controller(self, hostname=host, port=self.port, server_hostname="sink.test",
                                       ready_timeout=10, enable_SMTPUTF8=smtputf8,
                                       tls_context=tls_context, require_starttls=False)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Sink:
        self._controller.start()
        with self.lock:
            self.state = SinkState()  # forget aiosmtpd's own start-up probe
        return self

    def stop(self) -> None:
        self._controller.stop(no_assert=True)

    def delivered(self) -> Counter[str]:
        with self.lock:
            return Counter(r.rcpt.lower() for r in self.state.received)

    def messages(self) -> list[Received]:
        with self.lock:
            return list(self.state.received)
