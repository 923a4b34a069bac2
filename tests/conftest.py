"""Fixtures: real sinks on loopback, a real dnsmasq, and the daemon (in process or as `mta run`)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.app import App
from mta.config import load_config

from .sinks import Sink, free_port

SENDING_DOMAINS = ("mlgnserv.com", "mlgn2ca.com", "mlgn2usa.com", "mailgait.com")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def write_config(tmp: Path, *, static: dict[str, list[str]] | None = None, nameservers: list[str] | None = None,
                 retry: list[str] | None = None, max_age: str = "1h", shaping: list[dict[str, Any]] | None = None,
                 extra: str = "") -> Path:
    """A complete config for a daemon living in tmp (sockets, state, keys)."""
    key = tmp / "token.key"
    if not key.exists():
        key.write_text(secrets.token_hex(32) + "\n")
    lines = [
        "[daemon]", f'state_dir = "{tmp}/state"', f'submit_socket = "{tmp}/submit.sock"',
        f'control_socket = "{tmp}/control.sock"',
        "[metrics]", f'listen = "127.0.0.1:{free_port()}"',
        "[listener]", f'listen = "127.0.0.1:{free_port()}"',
        "[dns]", f"nameservers = {toml_value(nameservers or [])}",
        "[dns.static]", *[f"{json.dumps(d)} = {toml_value(h)}" for d, h in (static or {}).items()],
        "[queue]", f"retry_schedule = {toml_value(retry or ['1s', '2s'])}", f'max_age = "{max_age}"',
        "[security]", f'token_key_file = "{key}"',
    ]
    for sd in SENDING_DOMAINS:
        lines += [f'[sending_domains."{sd}"]', f'ehlo = "mta1.{sd}"', 'source_ips = ["127.0.0.1"]',
                  f'bounce_domain = "bounces.{sd}"']
    for rule in shaping or []:
        lines.append("[[shaping]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
    path = tmp / "mta.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink("127.0.0.2").start()
    yield s
    s.stop()


@pytest.fixture
def sink2() -> Iterator[Sink]:
    s = Sink("127.0.0.3").start()
    yield s
    s.stop()


class Client:
    """The campaign system's side of the submit socket (asyncio)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 26)
        return cls(reader, writer)

    async def send_raw(self, line: bytes) -> None:
        self.writer.write(line if line.endswith(b"\n") else line + b"\n")
        await self.writer.drain()

    async def read(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), 30)
        assert line, "the daemon closed the connection"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.send_raw(json.dumps(obj).encode())
        return await self.read()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def job(job_id: str, recipients: list[str] | list[dict[str, Any]], account: str = "acme",
        sending_domain: str = "mlgnserv.com", **fields: Any) -> dict[str, Any]:
    rcpts = [r if isinstance(r, dict) else {"email": r, "vars": {"name": r.split("@")[0]}} for r in recipients]
    body = {"op": "submit", "job_id": job_id, "account": account, "campaign": fields.pop("campaign", "camp"),
            "sending_domain": sending_domain, "from": "Acme News <news@acme.example>",
            "subject": "Hello {{name}}", "text": "Hi {{name}},\nnews.\n", "html": "<p>Hi {{name}}</p>",
            "recipients": rcpts}
    body.update(fields)
    return body


class Daemon:
    """An App in the test's own event loop, with helpers to talk to it."""

    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.app: App | None = None

    async def start(self) -> App:
        self.app = App(load_config(self.config_path))
        await self.app.start()
        return self.app

    async def stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
            self.app = None

    @property
    def submit_socket(self) -> str:
        assert self.app is not None
        return self.app.config.submit_socket

    async def client(self) -> Client:
        return await Client.open(self.submit_socket)

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        c = await self.client()
        try:
            return await c.request(body)
        finally:
            await c.close()

    async def account(self, account_id: str = "acme", **fields: Any) -> None:
        assert self.app is not None
        values = {"plan": "monthly", "subscribers": 100000, "notify": f"owner@{account_id}.test",
                  "status": "active", **fields}
        await self.app.accounts.set(account_id, values)

    async def events(self, etype: str | None = None) -> list[dict[str, Any]]:
        answer = await self.submit({"op": "events", "after": 0, "limit": 10000})
        return [e for e in answer["events"] if etype is None or e["type"] == etype]


async def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(interval)


async def poll_events(d: Daemon, etype: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Events of a type, once there are at least n of them."""
    for _ in range(int(timeout / 0.1)):
        events = await d.events(etype)
        if len(events) >= n:
            return events
        await asyncio.sleep(0.1)
    raise AssertionError(f"fewer than {n} {etype} events after {timeout}s")


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[Daemon] = []

    async def make(**config: Any) -> Daemon:
        d = Daemon(write_config(tmp_path, **config))
        await d.start()
        started.append(d)
        return d

    yield make
    for d in started:
        await d.stop()


# -- dnsmasq ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real DNS server on 127.0.0.1:<port> answering for *.test (authoritative)."""
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not os.path.exists(binary):
        pytest.skip("dnsmasq is not installed (the README's test command installs it)")
    port = free_port()
    dead = free_port()
    d = tmp_path_factory.mktemp("dns")
    args = [
        binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-daemon", "--bind-interfaces",
        "--listen-address=127.0.0.1", f"--port={port}", "--user=root", f"--pid-file={d}/pid",
        "--local=/test/", "--log-facility=-",
        # MX with two hosts in preference order
        "--mx-host=mx.test,mx1.mx.test,10", "--mx-host=mx.test,mx2.mx.test,20",
        "--host-record=mx1.mx.test,127.0.0.2", "--host-record=mx2.mx.test,127.0.0.3",
        # no MX at all, only an address: implicit MX (RFC 5321 §5.1)
        "--host-record=implicit.test,127.0.0.2",
        # null MX (RFC 7505): preference 0, exchange "." (raw RDATA 0000 00)
        "--dns-rr=nullmx.test,15,000000",
        # forwarded to a port where nothing answers: SERVFAIL / timeout
        f"--server=/servfail.test/127.0.0.1#{dead}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.fail(f"dnsmasq did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
    yield f"127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=5)


# -- `mta run` as a process ---------------------------------------------------------------
class DaemonProcess:
    def __init__(self, config_path: Path, nofile: int | None = None):
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.nofile = nofile  # a low RLIMIT_NOFILE, for file-descriptor exhaustion

    def _limits(self) -> None:
        if self.nofile is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def start(self) -> None:
        self.starts += 1
        log = open(self.config_path.parent / f"daemon-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "mta", "run", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=self._limits if self.nofile else None)
        sock = load_config(self.config_path).submit_socket
        end = time.monotonic() + 30
        while time.monotonic() < end:
            assert self.proc.poll() is None, (self.config_path.parent / f"daemon-{self.starts}.log").read_text()
            if os.path.exists(sock):
                try:
                    cli = mta_cli("accounts", "list", "--json", "--config", str(self.config_path))
                    if cli.returncode == 0:
                        return
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(0.1)
        raise AssertionError("daemon did not come up")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None


def mta_cli(*args: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True, input=stdin, timeout=timeout)


# -- redis-server ---------------------------------------------------------------------------
class RedisServer:
    """A real redis-server on 127.0.0.1 (no persistence), which a test may stop and restart."""

    def __init__(self, workdir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (the README's test command installs it)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1)
        end = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
