"""The listener over real sockets: DSNs, ARF reports and unsubscribe mails to genuine VERP
and List-Unsubscribe addresses count; forged tokens, relaying, oversized and malformed
mail are refused or ignored, and change nothing."""

from __future__ import annotations

import asyncio
import email
import re
from typing import Any

import aiosmtplib
import pytest

from .conftest import Daemon, job, poll_events, wait_for
from .mails import arf, dsn
from .sinks import Sink


async def send(d: Daemon, mail_from: str, rcpts: list[str], data: bytes) -> tuple[dict[str, Any], str]:
    assert d.app is not None
    host, port = d.app.config.listener_listen
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=10)
    await client.connect()
    try:
        errors, reply = await client.sendmail(mail_from, rcpts, data)
        return errors, reply
    finally:
        client.close()


async def delivered(d: Daemon, sink: Sink, rcpts: list[str], job_id: str = "j1") -> dict[str, Any]:
    await d.account()
    assert (await d.submit(job(job_id, rcpts)))["accepted"] == len(rcpts)
    await wait_for(lambda: all(sink.delivered()[r] for r in rcpts), 20)
    return {r.rcpt: r for r in sink.state.received}


async def test_dsn_to_verp_address_bounces_and_suppresses(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    got = await delivered(d, sink, ["ann@d.test", "bob@d.test"])
    verp = got["ann@d.test"].mail_from
    assert re.fullmatch(r"b-[a-z2-7]+@bounces\.[a-z0-9.]+", verp)
    errors, _ = await send(d, "", [verp], dsn(verp, "ann@d.test"))
    assert errors == {}
    events = await poll_events(d, "bounced", 1)
    assert events[0]["recipient"] == "ann@d.test" and events[0]["kind"] == "hard"
    assert events[0]["reason"] == "userunknown" and events[0]["async"] is True
    # the same DSN again (receivers retry) is not counted twice
    await send(d, "", [verp], dsn(verp, "ann@d.test"))
    await asyncio.sleep(0.3)
    assert len(await d.events("bounced")) == 1
    # suppressed for the account, and (user unknown) globally
    answer = await d.submit(job("j2", ["ann@d.test", "bob@d.test"]))
    assert answer["accepted"] == 1 and answer["rejected"] == [{"index": 0, "email": "ann@d.test", "code": "suppressed"}]
    assert d.app is not None and d.app.returns.is_suppressed("anyone", d.app.signer.address_hash("ann@d.test"))


async def test_arf_to_fbl_address_and_unsubscribe(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    got = await delivered(d, sink, ["carl@d.test", "dora@d.test"])
    original = b"Return-Path: <" + got["carl@d.test"].mail_from.encode() + b">\r\n" + got["carl@d.test"].data
    errors, _ = await send(d, "fbl@isp.test", ["fbl@mlgnserv.com"], arf(original))
    assert errors == {}
    [complaint] = await poll_events(d, "complained", 1)
    assert "carl@d.test" not in str(complaint) and complaint["recipient_hash"] and complaint["feedback_type"] == "abuse"
    # the List-Unsubscribe mailto of dora's message
    msg = email.message_from_bytes(got["dora@d.test"].data)
    mailto = re.search(r"<mailto:([^?>]+)", msg["List-Unsubscribe"]).group(1)  # type: ignore[union-attr]
    unsub = b"From: dora@d.test\r\nTo: " + mailto.encode() + b"\r\nSubject: unsubscribe\r\n\r\nunsubscribe\r\n"
    errors, _ = await send(d, "dora@d.test", [mailto], unsub)
    assert errors == {}
    [event] = await poll_events(d, "unsubscribed", 1)
    assert event["recipient"] in ("dora@d.test", None)
    answer = await d.submit(job("j2", ["carl@d.test", "dora@d.test"]))
    assert {r["code"] for r in answer["rejected"]} == {"suppressed"} and answer["accepted"] == 0


async def test_forged_relay_oversized_and_malformed_change_nothing(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    got = await delivered(d, sink, ["eve@d.test"])
    verp = got["eve@d.test"].mail_from
    local, domain = verp.split("@")
    forged = f"{local[:-2]}{'a' if local[-2] != 'a' else 'b'}{local[-1]}@{domain}"
    for rcpt in (forged, "b-aaaaaaaaaaaaaaaaaaaaaaaaaaaa@" + domain, "victim@elsewhere.test", "postmaster@" + domain):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await send(d, "", [rcpt], dsn(rcpt, "eve@d.test"))
    with pytest.raises(aiosmtplib.SMTPResponseException) as big:
        await send(d, "", [verp], b"Subject: x\r\n\r\n" + b"y" * (11 * 1024 * 1024))
    assert big.value.code == 552
    for junk in (b"", b"\x00\xff" * 100, b"Content-Type: multipart/report; boundary=\r\n\r\n--\r\n--",
                 b"From: MAILER-DAEMON@x\r\nContent-Type: message/delivery-status\r\n\r\nFinal-Recipient: ;\r\n"):
        errors, _ = await send(d, "", [verp], junk)
        assert errors == {}
    await asyncio.sleep(0.3)
    events = await d.events()
    assert not [e for e in events if e["type"] in ("bounced", "complained", "unsubscribed")]
    # still serving: a genuine DSN now counts
    await send(d, "", [verp], dsn(verp, "eve@d.test", "5.2.2", "552 5.2.2 Mailbox full"))
    [event] = await poll_events(d, "bounced", 1)
    assert (event["kind"], event["reason"]) == ("soft", "mailboxfull")


async def test_bare_lf_dot_does_not_end_data(daemon_factory: Any, sink: Sink) -> None:
    """SMTP smuggling: '\\n.\\n' inside DATA must not end the message and start a second one."""
    d = await daemon_factory(static={"d.test": [sink.addr]})
    got = await delivered(d, sink, ["fay@d.test", "gus@d.test"])
    fay, gus = got["fay@d.test"].mail_from, got["gus@d.test"].mail_from
    assert d.app is not None
    host, port = d.app.config.listener_listen
    reader, writer = await asyncio.open_connection(host, port)
    smuggled = (f"Subject: hi\r\n\r\nbody\n.\nMAIL FROM:<>\r\nRCPT TO:<{gus}>\r\nDATA\r\n"
                f"{dsn(gus, 'gus@d.test').decode()}\r\n.\r\nQUIT\r\n")
    script = f"EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<{fay}>\r\nDATA\r\n".encode()
    writer.write(script)
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.write(smuggled.encode())
    await writer.drain()
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await asyncio.sleep(0.3)
    # one message, to fay's address; nothing was recorded about gus's message
    h = d.app.signer.address_hash
    assert all(e.get("recipient_hash") == h("fay@d.test") for e in await d.events("bounced"))
    assert not d.app.returns.is_suppressed("acme", h("gus@d.test")), "the smuggled second message was processed"


async def test_a_connection_flood_is_capped_per_client_and_mail_flows_after(daemon_factory: Any, sink: Sink) -> None:
    """40 idle connections from one address: 20 sessions are served, the rest are told 421 at
    connect; once the flood is gone, a DSN is taken and recorded."""
    from mta.listener import MAX_SESSIONS_PER_CLIENT

    d = await daemon_factory(static={"d.test": [sink.addr]})
    got = await delivered(d, sink, ["cat@d.test"])
    assert d.app is not None
    host, port = d.app.config.listener_listen
    flood = [await asyncio.open_connection(host, port) for _ in range(40)]
    greetings = [await asyncio.wait_for(reader.readline(), 10) for reader, _ in flood]
    assert sum(g.startswith(b"220") for g in greetings) == MAX_SESSIONS_PER_CLIENT
    assert sum(g.startswith(b"421") for g in greetings) == 40 - MAX_SESSIONS_PER_CLIENT
    for _, writer in flood:
        writer.close()
    await asyncio.sleep(0.3)
    verp = got["cat@d.test"].mail_from
    errors, _ = await send(d, "", [verp], dsn(verp, "cat@d.test", "5.2.2", "552 5.2.2 Mailbox full"))
    assert errors == {}
    [event] = await poll_events(d, "bounced", 1)
    assert (event["recipient"], event["reason"], event["async"]) == ("cat@d.test", "mailboxfull", True)
