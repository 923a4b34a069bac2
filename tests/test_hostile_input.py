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
