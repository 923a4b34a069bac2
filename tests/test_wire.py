"""The SMTP client's wire (RFC 2920 pipelining) and the DKIM key worker, against real
servers on loopback: a scripted line-based SMTP server written here, so each test
decides exactly what the client sees and when."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import dkim
import msgspec
import pytest

from mta.config import DkimKey, load_config
from mta.delivery.dkim import DkimSigner, SigningPool
from mta.delivery.smtp import SmtpDispatcher, TemplateCache
from mta.delivery.wire import SmtpWire, WireError, dot_stuff, open_wire
from mta.tokens import TokenSigner
from mta.types import Content, JobInfo, MxHost, RecipientRow, Route

from .conftest import write_config
from .sinks import free_port
from .test_dkim import RSA, dnsfunc

JOB = JobInfo(1, "acme", "job-1", "c1", "mlgnserv.com", 1700000000.0)
CONTENT = msgspec.json.encode(Content(from_="a@mlgnserv.com", subject="Hi {{name}}", text="Hello {{name}}\n.dot\n"))
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]


class ScriptedServer:
    """A TCP server on 127.0.0.12 running `script` per connection; `lines` is what it read."""

    def __init__(self, script: Script):
        self.script = script
        self.lines: list[bytes] = []
        self.server: asyncio.base_events.Server | None = None
        self.port = free_port("127.0.0.12")

    async def __aenter__(self) -> ScriptedServer:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await self.script(reader, writer, self.lines)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.12", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def route(self) -> Route:
        return Route("x.test", (MxHost("mx.x.test", (("127.0.0.12", self.port),)),))


async def read_line(reader: asyncio.StreamReader, lines: list[bytes]) -> bytes:
    line = await reader.readline()
    if not line:
        raise ConnectionError("client went away")
    lines.append(line)
    return line


async def read_message(reader: asyncio.StreamReader, lines: list[bytes]) -> bytes:
    data = await reader.readuntil(b"\r\n.\r\n")
    lines.append(data)
    return data


def smtp_server(extensions: list[str], rcpt_reply: bytes = b"250 ok", strict_lockstep: bool = False) -> Script:
    """A small ESMTP server. With PIPELINING offered it answers MAIL only once it has read
    DATA too, so a client that waits for each reply before the next command hangs.
    `strict_lockstep` (no PIPELINING): a command arriving before the reply to the last one
    is a protocol violation and gets the connection dropped."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lines: list[bytes]) -> None:
        writer.write(b"220 mx ESMTP\r\n")
        await read_line(reader, lines)  # EHLO
        ehlo = [b"250-mx"] + [b"250-" + e.encode() for e in extensions] + [b"250 8BITMIME"]
        writer.write(b"\r\n".join(ehlo) + b"\r\n")
        while True:
            line = await read_line(reader, lines)
            verb = line[:4].upper()
            if verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                return
            if verb == b"RSET":
                writer.write(b"250 reset\r\n")
                continue
            if verb != b"MAIL":
                writer.write(b"503 bad sequence\r\n")
                continue
            if "PIPELINING" in extensions:
                rcpt = await read_line(reader, lines)
                data = await read_line(reader, lines)
                assert rcpt.startswith(b"RCPT TO:") and data == b"DATA\r\n"
                ok = rcpt_reply.startswith(b"2")
                data_reply = b"354 go\r\n" if ok else b"554 no valid recipients\r\n"
                writer.write(b"250 sender ok\r\n" + rcpt_reply + b"\r\n" + data_reply)
                if not ok:
                    continue
            else:
                for reply, expect in ((b"250 sender ok", b"RCPT"), (rcpt_reply, b"DATA")):
                    if strict_lockstep:
                        await asyncio.sleep(0.05)
                        assert not reader._buffer, "command sent before the reply"  # type: ignore[attr-defined]
                    writer.write(reply + b"\r\n")
                    if not reply.startswith(b"2"):
                        break
                    assert (await read_line(reader, lines)).startswith(expect)
                else:
                    writer.write(b"354 go\r\n")
                if not rcpt_reply.startswith(b"2"):
                    continue
            await read_message(reader, lines)
            writer.write(b"250 2.0.0 queued as X\r\n")

    return script


def dispatcher(tmp_path: Path, dkim_signers: list[DkimSigner] | None = None) -> SmtpDispatcher:
    config = load_config(str(write_config(tmp_path)))
    templates = TemplateCache(lambda rowid: CONTENT, TokenSigner(b"k" * 32), config,
                              dkim={"mlgnserv.com": dkim_signers} if dkim_signers else None)
    return SmtpDispatcher(config, templates)


def row(n: int, local: str = "ok") -> RecipientRow:
    return RecipientRow(100 + n, JOB, n, f"{local}{n}@x.test", "x.test", {"name": f"N{n}"}, 0)


async def test_pipelines_mail_rcpt_data_when_offered(tmp_path: Path) -> None:
    async with ScriptedServer(smtp_server(["PIPELINING", "SMTPUTF8"])) as server:
        session = await dispatcher(tmp_path).connect(server.route, "mlgnserv.com")
        # the server holds MAIL's reply until DATA arrived: without pipelining this times out
        replies = await asyncio.wait_for(asyncio.gather(*[session.deliver(row(i)) for i in range(1)]), 10)
        for i in range(1, 4):
            replies.append(await asyncio.wait_for(session.deliver(row(i)), 10))
        assert [r.code for r in replies] == [250] * 4 and replies[0].text == "2.0.0 queued as X"
        await session.close()
    messages = [line for line in server.lines if line.endswith(b"\r\n.\r\n")]
    assert len(messages) == 4
    assert b"\r\n..dot\r\n" in messages[0]  # dot-stuffed on the wire


async def test_lockstep_without_pipelining(tmp_path: Path) -> None:
    async with ScriptedServer(smtp_server([], strict_lockstep=True)) as server:
        session = await dispatcher(tmp_path).connect(server.route, "mlgnserv.com")
        assert not session.pipelining
        replies = [await asyncio.wait_for(session.deliver(row(i)), 10) for i in range(2)]
        assert [r.code for r in replies] == [250, 250]
        await session.close()


@pytest.mark.parametrize("extensions", [["PIPELINING"], []])
async def test_refused_recipient_is_reported_at_rcpt_and_the_connection_goes_on(
        tmp_path: Path, extensions: list[str]) -> None:
    async with ScriptedServer(smtp_server(extensions, rcpt_reply=b"550 5.1.1 no such user")) as server:
        session = await dispatcher(tmp_path).connect(server.route, "mlgnserv.com")
        reply = await asyncio.wait_for(session.deliver(row(1)), 10)
        assert (reply.code, reply.stage, reply.text) == (550, "rcpt", "5.1.1 no such user")
        assert session.usable
        again = await asyncio.wait_for(session.deliver(row(2)), 10)
        assert again.code == 550
        await session.close()
    assert b"RSET\r\n" in server.lines


async def test_garbage_and_silence_end_the_session_with_a_soft_failure(tmp_path: Path) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lines: list[bytes]) -> None:
        writer.write(b"220 mx\r\n")
        await read_line(reader, lines)
        writer.write(b"250-mx\r\n250 PIPELINING\r\n")
        await read_line(reader, lines)
        writer.write(b"hello there\r\n")  # not a reply
        await asyncio.sleep(1)

    async with ScriptedServer(garbage) as server:
        session = await dispatcher(tmp_path).connect(server.route, "mlgnserv.com")
        reply = await asyncio.wait_for(session.deliver(row(1)), 10)
        assert reply.code == 0 and "malformed reply" in reply.text and not session.usable
        await session.close()

    loop = asyncio.get_running_loop()
    wire = SmtpWire(loop)
    waiter = asyncio.ensure_future(wire.replies(1, 0.1))
    with pytest.raises(WireError, match="no reply within"):
        await waiter


async def test_wire_parses_multiline_and_split_replies() -> None:
    async def split(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lines: list[bytes]) -> None:
        for piece in (b"220-mx greets\r\n22", b"0 ready\r\n250 one\r\n", b"250 two\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)

    async with ScriptedServer(split) as server:
        wire = await open_wire("127.0.0.12", server.port, None, 5)
        assert await wire.replies(1, 5) == [(220, "mx greets\nready")]
        assert await wire.replies(2, 5) == [(250, "one"), (250, "two")]
        wire.close()


def test_dot_stuff() -> None:
    assert dot_stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert dot_stuff(b"no end") == b"no end\r\n.\r\n"
    # smuggling shapes: a dot after a bare LF is stuffed too, so no receiver sees it end the data
    for payload in (b"a\n.\nMAIL FROM:<x@y>\r\n", b"a\r\n.\nb\r\n", b"a\n.\r\nb\r\n"):
        stuffed = dot_stuff(payload)[:-3]
        assert b"\n.\n" not in stuffed and b"\n.\r" not in stuffed and stuffed.count(b"\n..") == 1


async def test_key_worker_signs_and_a_lost_worker_never_leaves_mail_unsigned() -> None:
    signer = DkimSigner("mlgnserv.com", DkimKey("s1", "-"), RSA)
    message = b"From: a@mlgnserv.com\r\nTo: b@x.test\r\nSubject: s\r\n\r\nbody\r\n"
    pool = SigningPool()
    try:
        signed = await asyncio.gather(*[pool.sign([signer], message) for _ in range(20)])
        assert all(dkim.verify(m, dnsfunc=dnsfunc) for m in signed)
        proc = pool._proc
        assert proc is not None  # the signatures came from the worker process
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        await asyncio.sleep(0.1)
        after = await asyncio.wait_for(pool.sign([signer], message), 10)  # signed in the daemon
        assert dkim.verify(after, dnsfunc=dnsfunc)
        assert pool._proc is None  # and a new worker only after RESTART_AFTER
    finally:
        await pool.aclose()
