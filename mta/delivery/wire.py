"""The SMTP client's wire: an asyncio protocol that pipelines (RFC 2920).

Why our own and not aiosmtplib's protocol (measured, docs/performance.md): aiosmtplib
sends one command and waits for its reply. Its protocol cannot be driven to pipeline:
data that arrives while no command is pending is dropped, and one read hands over only
the first of several replies in the buffer. It also normalises line ends and
dot-stuffs every message with regexes over a copy, which our rendered messages do not
need. Here replies are parsed as they arrive and handed over in order, so MAIL, RCPT
and DATA go out in one write and their three replies come back in one wake-up.

Everything the caller gets is a `(code, text)` pair or a `WireError` (connection lost,
timeout, garbage from the server).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

MAX_LINE = 4096  # RFC 5321 §4.5.3.1.5 says 512 octets; servers are generous, so are we
MAX_LINES = 100  # of one multi-line reply
MAX_BUFFER = 65536


class WireError(Exception):
    """The connection is unusable: lost, timed out, or the server spoke nonsense."""


class SmtpWire(asyncio.Protocol):
    """One connection. A single reader at a time asks for the next `n` replies."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._lines: list[bytes] = []  # the lines so far of a multi-line reply
        self._replies: list[tuple[int, str]] = []
        self._need = 0
        self._waiter: asyncio.Future[list[tuple[int, str]]] | None = None
        self._error: WireError | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(WireError(f"connection lost: {exc}" if exc else "connection closed by the server"))
        self.transport = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def eof_received(self) -> bool:
        self._fail(WireError("connection closed by the server"))
        return False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:end + 1])
            start = end + 1
            if len(line) > MAX_LINE or len(line) < 4 or not line[:3].isdigit() or line[3:4] not in b" -\r\n":
                self._fail(WireError(f"malformed reply line {line[:80]!r}"))
                return
            if line[3:4] == b"-":
                self._lines.append(line)
                if len(self._lines) > MAX_LINES:
                    self._fail(WireError("reply of too many lines"))
                    return
                continue
            lines, self._lines = self._lines, []
            lines.append(line)
            # lines of a multi-line reply (EHLO's extensions) stay apart, one per "\n"
            text = b"\n".join([piece[4:].strip() for piece in lines]).decode("utf-8", "replace")
            self._replies.append((int(line[:3]), text))
        if start:
            del buf[:start]
        if len(buf) > MAX_BUFFER:
            self._fail(WireError("reply line too long"))
            return
        waiter = self._waiter
        if waiter is not None and len(self._replies) >= self._need and not waiter.done():
            waiter.set_result(self._take(self._need))

    # -- the caller's side --------------------------------------------------------------
    def _take(self, n: int) -> list[tuple[int, str]]:
        out, self._replies = self._replies[:n], self._replies[n:]
        self._waiter = None
        return out

    def _fail(self, error: WireError) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._error)
            self._waiter.exception()  # retrieved: nobody may await it any more (cancelled caller)
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        return self._error is None and self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self.transport is None or self.transport.is_closing():
            raise WireError("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the kernel's send buffer is full (a large message to a slow server)."""
        if self._paused and self.transport is not None:
            self._drained = self.loop.create_future()
            await self._drained

    async def replies(self, n: int, timeout: float) -> list[tuple[int, str]]:
        """The next `n` replies, in order; WireError if they do not all come within `timeout`."""
        if len(self._replies) >= n:
            return self._take(n)
        if self._error is not None:
            raise self._error
        waiter = self._waiter = self.loop.create_future()
        self._need = n
        timer = self.loop.call_later(timeout, self._timed_out, waiter, timeout)
        try:
            got: list[tuple[int, str]] = await waiter
            return got
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[list[tuple[int, str]]], timeout: float) -> None:
        if not waiter.done():
            self._fail(WireError(f"no reply within {timeout:g}s"))

    async def command(self, line: bytes, timeout: float) -> tuple[int, str]:
        self.write(line)
        return (await self.replies(1, timeout))[0]

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None, timeout: float) -> None:
        assert self.transport is not None
        transport = await asyncio.wait_for(
            self.loop.start_tls(self.transport, self, context, server_hostname=server_hostname), timeout)
        if transport is None:
            raise WireError("TLS handshake gave no transport")
        self.transport = transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_wire(host: str, port: int, source: tuple[str, int] | None, timeout: float) -> SmtpWire:
    loop = asyncio.get_running_loop()
    factory: Callable[[], SmtpWire] = lambda: SmtpWire(loop)  # noqa: E731
    try:
        _, protocol = await asyncio.wait_for(
            loop.create_connection(factory, host, port, local_addr=source), timeout)
    except TimeoutError:
        raise WireError(f"connect timed out after {timeout:g}s") from None
    return protocol


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line that starts with '.' gets another; then the end-of-data line."""
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\n.", b"\n..")
    return data + b".\r\n" if data.endswith(b"\r\n") else data + b"\r\n.\r\n"
