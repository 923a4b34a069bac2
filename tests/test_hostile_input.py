"""Hostile input on the submit socket: a seeded fuzz of mangled requests, each answered,
and the daemon still up and delivering afterwards. (The bounce parsers have their own
property tests in test_bounce_classify.py; SMTP smuggling is in test_listener.py.)"""

from __future__ import annotations

import json
import random
from typing import Any

from .conftest import job, wait_for
from .sinks import Sink

SEED = 20261122
LINES = 600


def mangled(rng: random.Random, good: bytes) -> bytes:
    """One request line: random bytes, a cut or flipped valid job, or a valid shape with hostile values."""
    choice = rng.randrange(6)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"\n", b" ")
    if choice == 1:
        return good[: rng.randrange(1, len(good))]
    if choice == 2:
        data = bytearray(good)
        for _ in range(rng.randrange(1, 10)):
            data[rng.randrange(len(data))] = rng.randrange(32, 127)
        return bytes(data)
    hostile: list[Any] = [None, True, -1, 2**70, 1e308, "", "\x00", "a\r\nBcc: x@evil.test", [], {}, "é" * 500,
                          {"$ne": 1}, "{{name}}" * 50]
    body = json.loads(good)
    for key in rng.sample(sorted(body), rng.randrange(1, 4)):
        body[key] = rng.choice(hostile)
    if choice == 4:
        body["recipients"] = [{"email": rng.choice(hostile), "vars": rng.choice(hostile)}]
    if choice == 5:
        body = {"op": rng.choice(["submit", "events", "event", "ping", "nope", None, 7]), **{
            k: rng.choice(hostile) for k in ("after", "limit", "type", "account", "email")}}
    return json.dumps(body).encode()


async def test_fuzzed_submit_lines_are_each_answered_and_the_daemon_carries_on(daemon_factory: Any,
                                                                             sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    rng = random.Random(SEED)
    good = json.dumps(job("fuzz", ["ok@d.test"])).encode()
    client = await d.client()
    try:
        for _ in range(LINES):
            await client.send_raw(mangled(rng, good))
            answer = await client.read()
            assert isinstance(answer, dict) and "ok" in answer
            if answer["ok"] is False:
                assert answer["error"]["code"] and answer["error"]["message"]
        assert (await client.request({"op": "ping"}))["ok"] is True
    finally:
        await client.close()
    accepted = await d.submit(job("after-fuzz", ["ok-after@d.test"]))
    assert accepted["accepted"] == 1
    await wait_for(lambda: sink.delivered()["ok-after@d.test"], 10)
    # nothing injected reached the wire as a header of its own
    assert all(b"\r\nBcc:" not in m.data for m in sink.messages())


def test_fd_exhaustion_and_a_connection_flood_cost_nothing_accepted(tmp_path: Any, sink: Sink) -> None:
    """The daemon under a 160-descriptor limit, flooded with 600 connections to its submit
    socket: it stays up, a campaign system's open connection still gets its job accepted,
    the mail is delivered once, and new clients are served once the flood is gone."""
    import os
    import socket
    import time

    from .conftest import DaemonProcess, mta_cli, write_config

    cfg = write_config(tmp_path, static={"f.test": [sink.addr]})
    daemon = DaemonProcess(cfg, nofile=160)
    daemon.start()
    try:
        assert mta_cli("accounts", "set", "acme", "--plan", "monthly", "--subscribers", "1000", "--notify",
                       "o@acme.test", "--status", "active", "--config", str(cfg)).returncode == 0
        path = str(tmp_path / "submit.sock")
        worker = socket.socket(socket.AF_UNIX)
        worker.connect(path)
        worker.settimeout(30)
        flood: list[socket.socket] = []
        for _ in range(600):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except (BlockingIOError, OSError):
                s.close()  # the backlog is full: the kernel refuses for the daemon
                continue
            flood.append(s)
        time.sleep(1.0)
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) >= 155  # the flood took every descriptor
        body = job("during-flood", [f"ok{i}@f.test" for i in range(20)])
        worker.sendall(json.dumps(body).encode() + b"\n")
        answer = json.loads(worker.makefile("rb").readline())
        assert answer["ok"] is True and answer["accepted"] == 20
        time.sleep(1.0)
        for s in flood:
            s.close()
        end = time.monotonic() + 40
        while len(sink.delivered()) < 20 and time.monotonic() < end:
            time.sleep(0.2)
        assert len(sink.delivered()) == 20 and all(n == 1 for n in sink.delivered().values())
        fresh = socket.socket(socket.AF_UNIX)
        fresh.settimeout(10)
        fresh.connect(path)
        fresh.sendall(b'{"op": "ping"}\n')
        assert json.loads(fresh.makefile("rb").readline()) == {"ok": True}
        fresh.close()
        worker.close()
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()


async def test_clients_beyond_the_cap_are_answered_unavailable_and_closed(tmp_path: Any) -> None:
    import asyncio

    from mta.jsonlines import JsonLineServer

    async def handler(request: dict[str, Any], peer: Any) -> dict[str, Any]:
        return {"ok": True}

    server = JsonLineServer(str(tmp_path / "s.sock"), handler, max_line=1024, mode=0o600, max_clients=3)
    await server.start()
    try:
        held = [await asyncio.open_unix_connection(str(tmp_path / "s.sock")) for _ in range(4)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert answer["error"]["code"] == "unavailable" and "too many connections" in answer["error"]["message"]
        assert await asyncio.wait_for(reader.read(), 5) == b""  # and closed
        writer.close()
        r0, w0 = held[0]
        w0.write(b'{"op": "ping"}\n')
        assert json.loads(await asyncio.wait_for(r0.readline(), 5)) == {"ok": True}  # the others are served
        for _, w in held:
            w.close()
    finally:
        await server.close()
