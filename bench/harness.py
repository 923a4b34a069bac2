"""What the benchmarks share: a daemon in a temp directory, Postfix's `smtp-sink`, the job.

Everything listens on 127.0.0.0/8. The daemon is a real `python -m mta run` process with a
generated config (SPEC §3); jobs go over its submit socket as one JSON line (SPEC §4).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SENDING = "mlgnserv.com"
PARAGRAPH = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
             "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco.\n")
# ~5 KB of text personalised twice, as a campaign's mail is
BODY = "Hi {{name}},\n\n" + PARAGRAPH * 26 + "\nSee you, {{name}}.\n"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, limit: float) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def recipients(n: int, domains: list[str], prefix: str = "user") -> list[dict[str, Any]]:
    return [{"email": f"{prefix}{i}@{domains[i % len(domains)]}", "vars": {"name": f"User {i}"}}
            for i in range(n)]


def job_line(job_id: str, rcpts: list[dict[str, Any]], account: str = "bench") -> bytes:
    job = {"op": "submit", "job_id": job_id, "account": account, "campaign": "bench",
           "sending_domain": SENDING, "from": "Bench News <news@bench.example>",
           "subject": "Hello {{name}}", "text": BODY, "recipients": rcpts}
    return json.dumps(job, separators=(",", ":")).encode() + b"\n"


class SmtpSink:
    """Postfix's `smtp-sink` (C): accepts everything, counts completed DATA with -c."""

    def __init__(self, workdir: Path, host: str, port: int, tag: str = "sink"):
        if shutil.which("smtp-sink") is None:
            raise SystemExit("smtp-sink not found: `apt-get install postfix` (bench/README.md)")
        self.host, self.port = host, port
        self.path = workdir / f"{tag}.out"
        self._out = open(self.path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"{host}:{port}", "1024"],
                                     stdout=self._out, stderr=subprocess.STDOUT)
        if not wait_port(host, port, 5):
            self.stop()
            raise SystemExit(f"smtp-sink did not start on {host}:{port}")

    def count(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 200))
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0

    def wait(self, target: int, limit: float) -> float | None:
        """Monotonic time at which `target` messages had arrived, or None after `limit` seconds."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self.count() >= target:
                return time.monotonic()
            time.sleep(0.01)
        return None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._out.close()


class TimingSink:
    """A minimal SMTP sink (asyncio, in a thread) that notes when each recipient's message
    completed: for latency figures, where smtp-sink only counts."""

    def __init__(self, host: str, port: int):
        import asyncio

        self.host, self.port = host, port
        self.arrived: dict[str, float] = {}
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve() -> None:
            await asyncio.start_server(self._session, host, port)
            started.set()

        self._thread = threading.Thread(target=lambda: (self._loop.run_until_complete(serve()),
                                                        self._loop.run_forever()), daemon=True)
        self._thread.start()
        started.wait(5)

    async def _session(self, reader: Any, writer: Any) -> None:
        writer.write(b"220 timing sink\r\n")
        rcpt = ""
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-sink\r\n250 PIPELINING\r\n")
                elif verb == b"RCPT":
                    rcpt = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await reader.readuntil(b"\r\n.\r\n")
                    self.arrived[rcpt] = time.time()
                    writer.write(b"250 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        writer.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class Daemon:
    """`mta run` on a generated config; `routes` maps destination domains to host:port."""

    def __init__(self, routes: dict[str, str], *, connections: int = 20, dkim: bool = False,
                 rate: str = "6000000/min", extra: str = "", python: str = sys.executable):
        self.dir = Path(tempfile.mkdtemp(prefix="mta-bench-"))
        (self.dir / "token.key").write_text(secrets.token_hex(32))
        self.dkim_key = self.dir / "dkim.pem" if dkim else None
        if self.dkim_key is not None:
            self.dkim_public = make_rsa_key(self.dkim_key)
        self.config = self.dir / "mta.toml"
        self.config.write_text(self._config(routes, connections, rate, extra))
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self, routes: dict[str, str], connections: int, rate: str, extra: str) -> str:
        static = "\n".join(f'"{dom}" = ["{hostport}"]' for dom, hostport in routes.items())
        hosts = sorted({hp.rsplit(":", 1)[0] for hp in routes.values()} | {f".{d}" for d in routes})
        dkim = f'dkim = {{ selector = "s1", key_file = "{self.dkim_key}" }}' if self.dkim_key else ""
        return f"""
[daemon]
state_dir = "{self.dir}/state"
submit_socket = "{self.dir}/submit.sock"
control_socket = "{self.dir}/control.sock"
[metrics]
listen = "127.0.0.1:{free_port()}"
[listener]
listen = "127.0.0.1:{free_port()}"
[dns]
nameservers = ["127.0.0.1:{free_port()}"]   # nothing listens: no lookup leaves the machine
[dns.static]
{static}
[security]
token_key_file = "{self.dir}/token.key"
[sending_domains."{SENDING}"]
ehlo = "mta1.{SENDING}"
source_ips = ["127.0.0.1"]
{dkim}
[[shaping]]
match_mx = {json.dumps(hosts)}
max_connections = {connections}
max_messages_per_connection = 100000
max_rate = "{rate}"
{extra}
"""

    @property
    def submit_socket(self) -> str:
        return str(self.dir / "submit.sock")

    def start(self, limit: float = 30.0) -> None:
        self.proc = subprocess.Popen([self.python, "-m", "mta", "run", "--config", str(self.config)],
                                     stdout=open(self.dir / "daemon.log", "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"mta run exited: {(self.dir / 'daemon.log').read_text()[-500:]}")
            try:
                if self.request({"op": "ping"}, timeout=2).get("ok"):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("mta run did not answer on its submit socket")
        self.control({"op": "accounts.set", "id": "bench", "plan": "monthly", "subscribers": 10**8,
                      "notify": "ops@bench.example", "status": "active"})

    def control(self, payload: dict[str, Any]) -> Any:
        from mta.cli import request

        return request(str(self.dir / "control.sock"), payload)

    def request(self, payload: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        with submit_connection(self.submit_socket, timeout) as (sock, answers):
            sock.sendall(json.dumps(payload).encode() + b"\n")
            return json.loads(answers.readline())  # type: ignore[no-any-return]

    def memory_mb(self, field: str = "VmRSS") -> float:
        """A memory figure of the daemon from /proc (VmRSS now, VmHWM the peak), in MB."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU the daemon has used so far (all its threads)."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def children_cpu_seconds(self) -> float:
        """The same for its live child processes (the DKIM key worker)."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return 0.0
        return sum(cpu_seconds(p) for p in pids)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def submit_all(daemon: Daemon, lines: Iterable[bytes], sizes: list[int], timeout: float = 600) -> float:
    """Job lines pipelined on one connection, answers read by a thread meanwhile; seconds
    until the last answer. Each answer must have accepted its job whole (`sizes`). `lines`
    may be a generator: the client then holds one job in memory at a time."""
    with submit_connection(daemon.submit_socket, timeout) as (sock, answers):
        bad: list[bytes] = []

        def read() -> None:
            for size in sizes:
                answer = answers.readline()
                if f'"accepted":{size},'.encode() not in answer:
                    bad.append(answer)

        reader = threading.Thread(target=read)
        reader.start()
        t0 = time.monotonic()
        for line in lines:
            sock.sendall(line)
        reader.join(timeout)
        took = time.monotonic() - t0
    if bad or reader.is_alive():
        raise SystemExit(f"a job was not accepted whole: {bad[0][:300] if bad else 'no answer'!r}")
    return took


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def submit_connection(path: str, timeout: float = 60) -> Iterator[tuple[socket.socket, Any]]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        with sock.makefile("rb") as answers:
            yield sock, answers


def make_rsa_key(path: Path) -> bytes:
    """A 2048-bit RSA key at `path` (PEM); returns the DKIM p= value."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der)


@contextmanager
def profiled(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy (if `out` is given) sampling `pid` while the block runs; writes a flame graph."""
    if out is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = ["-f", "raw"] if out.suffix == ".txt" else []  # collapsed stacks instead of a flame graph
    spy = subprocess.Popen([exe, "record", "-p", str(pid), "-o", str(out), "-r", "200", "--nonblocking", *raw],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(2)
        spy.wait(30)
