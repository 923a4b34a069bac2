"""MX resolution against a real DNS server (dnsmasq on a high port)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from mta.delivery.dns import MxResolver
from mta.types import RouteError

from .conftest import job, wait_for
from .sinks import Sink


def resolver(dnsmasq: str) -> MxResolver:
    host, port = dnsmasq.split(":")
    return MxResolver(((host, int(port)),), {}, timeout=2.0)


async def test_mx_in_preference_order_and_cached(dnsmasq: str) -> None:
    r = resolver(dnsmasq)
    route = await r.resolve("mx.test")
    assert [h.name for h in route.hosts] == ["mx1.mx.test", "mx2.mx.test"]
    assert route.hosts[0].addresses == (("127.0.0.2", 25),)
    await r.resolve("MX.test.")
    assert (r.hits, r.misses) == (1, 1)


async def test_implicit_mx(dnsmasq: str) -> None:
    route = await resolver(dnsmasq).resolve("implicit.test")
    assert route.hosts[0].name == "implicit.test" and route.hosts[0].addresses == (("127.0.0.2", 25),)


@pytest.mark.parametrize("domain,reason", [("nullmx.test", "notaccept"), ("nowhere.test", "hostunknown")])
async def test_permanent_failures(dnsmasq: str, domain: str, reason: str) -> None:
    with pytest.raises(RouteError) as err:
        await resolver(dnsmasq).resolve(domain)
    assert err.value.permanent and err.value.reason == reason and err.value.reply.code >= 500


async def test_servfail_is_temporary(dnsmasq: str) -> None:
    with pytest.raises(RouteError) as err:
        await resolver(dnsmasq).resolve("servfail.test")
    assert not err.value.permanent and err.value.reply.code == 451


def _port_25_free(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 25))
            return True
        except OSError:
            return False


async def test_daemon_delivers_via_dns_and_bounces_null_mx(daemon_factory: Any, dnsmasq: str) -> None:
    if not _port_25_free("127.0.0.2"):
        pytest.skip("cannot bind 127.0.0.2:25 for the MX sink")
    mx = Sink("127.0.0.2", port=25).start()
    try:
        d = await daemon_factory(nameservers=[dnsmasq])
        await d.account()
        await d.submit(job("dns", ["ok1@mx.test", "ok2@implicit.test", "x@nullmx.test", "y@nowhere.test",
                                   "z@servfail.test"]))
        await wait_for(lambda: len(mx.delivered()) == 2, 20)
        for _ in range(100):
            bounced = {e["recipient"]: e for e in await d.events("bounced")}
            deferred = {e["recipient"] for e in await d.events("deferred")}
            if len(bounced) == 2 and deferred:
                break
            await asyncio.sleep(0.1)
        assert bounced["x@nullmx.test"]["reason"] == "notaccept" and bounced["x@nullmx.test"]["kind"] == "hard"
        assert bounced["y@nowhere.test"]["reason"] == "hostunknown"
        assert deferred == {"z@servfail.test"}  # SERVFAIL defers, never bounces
    finally:
        mx.stop()
