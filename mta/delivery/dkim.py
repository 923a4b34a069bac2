"""DKIM signing at send time (RFC 6376; ed25519-sha256 per RFC 8463).

The canonicalisation rules come from dkimpy (relaxed/relaxed, header selection, the
b= handling); the key operation goes through `cryptography` (OpenSSL), which is ~25x
faster than dkimpy's pure-Python RSA. Keys are loaded once at start-up: a missing or
unreadable key is a config error, never a delivery failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import re
import sys
import time
from collections.abc import Mapping

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import Relaxed

from ..config import ConfigError, DkimKey, SendingDomain
from ..logs import get as get_logger
from .keyworker import KEY_HEAD, REPLY, SIGN

log = get_logger("mta.delivery")

# SPEC §5, in this order; those present in a message are signed. "from" twice: the second
# signs the absence of another From, so one cannot be prepended (over-signing).
SIGNED_HEADERS = (
    "from", "to", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post", "feedback-id",
    "reply-to", "cc", "mime-version", "content-type", "content-transfer-encoding",
)
_SHA256 = Prehashed(hashes.SHA256())


class DkimSigner:
    def __init__(self, domain: str, key: DkimKey, private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        self.domain = domain
        self.selector = key.selector
        self.algorithm = key.algorithm
        self._private = private

    def __repr__(self) -> str:  # never show the key
        return f"DkimSigner({self.domain}, s={self.selector}, a={self.algorithm})"

    @property
    def slow(self) -> bool:
        """An RSA key operation (~0.5 ms for 2048 bits) is worth a trip to the key worker."""
        return isinstance(self._private, rsa.RSAPrivateKey)

    def prepare(self, message: bytes, now: int) -> tuple[bytes, bytes]:
        """(the DKIM-Signature value up to `b=`, the digest to sign) for a CRLF message."""
        headers, body = _split(message)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        present = {name.lower() for name, _ in headers}
        names = [h for h in SIGNED_HEADERS if h.encode() in present] + ["from"]
        # Folded where RFC 6376 §3.2 allows whitespace: between tags, around the colons of
        # h=, and anywhere inside base64 values. The signature covers the value as folded.
        value = (f" v=1; a={self.algorithm}; c=relaxed/relaxed; d={self.domain}; s={self.selector};\r\n"
                 f" t={now};\r\n h={_fold_names(names)};\r\n bh={body_hash.decode()};\r\n b=").encode()
        hasher = hashlib.sha256()
        for line in _selected(headers, names):
            hasher.update(line)
        hasher.update(_relaxed(b"DKIM-Signature", value))  # hashed without its CRLF (RFC 6376 §3.7)
        return value, hasher.digest()

    def key_op(self, digest: bytes) -> bytes:
        if isinstance(self._private, rsa.RSAPrivateKey):
            return self._private.sign(digest, padding.PKCS1v15(), _SHA256)
        return self._private.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 hash

    def private_der(self) -> bytes:
        """The key for the key worker's pipe (PKCS#8 DER, unencrypted: it never touches disk)."""
        return self._private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    @staticmethod
    def field(value: bytes, signature: bytes) -> bytes:
        return b"DKIM-Signature:" + value + _fold_base64(base64.b64encode(signature)) + b"\r\n"

    def signature_header(self, message: bytes, now: int | None = None) -> bytes:
        """The `DKIM-Signature: ...` field (folded, CRLF-terminated) for a CRLF message."""
        value, digest = self.prepare(message, int(now if now is not None else time.time()))
        return self.field(value, self.key_op(digest))


_WSP = re.compile(rb"[\t ]+")


def _split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(header fields as (name, raw value), body). Rendered messages are CRLF throughout and
    take the fast path (a few C-level splits); anything else goes through dkimpy's parser."""
    end = message.find(b"\r\n\r\n")
    head = message[:end] if end >= 0 else b""
    if end < 0 or head.count(b"\n") != head.count(b"\r\n") or head[:1] in (b" ", b"\t"):
        parsed: tuple[list[tuple[bytes, bytes]], bytes] = dkim.rfc822_parse(message)
        return parsed
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, message[end + 4:]


def _relaxed(name: bytes, value: bytes) -> bytes:
    """Relaxed header canonicalisation (RFC 6376 §3.4.2), without the line end."""
    if b"\r\n" in value:
        value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:  # the regex only when there is something to compress
        value = _WSP.sub(b" ", value)
    return name.lower().rstrip() + b":" + value.strip()


# Canonical lines of fields seen before: a campaign's From, MIME and Feedback-ID fields (and
# the Date within a second) repeat in every message. Bounded: cleared when full.
_CANONICAL: dict[tuple[bytes, bytes], bytes] = {}
_CANONICAL_MAX = 4096


def _selected(headers: list[tuple[bytes, bytes]], names: list[str]) -> list[bytes]:
    """The canonical lines of the fields h= names, each name taking the last unused instance
    from the bottom up (RFC 6376 §5.4.2); a name with none left (over-signing) adds nothing."""
    instances: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for field in headers:
        instances.setdefault(field[0].lower().rstrip(), []).append(field)
    out = []
    cache = _CANONICAL
    for name in names:
        left = instances.get(name.encode())
        if left:
            field = left.pop()
            line = cache.get(field)
            if line is None:
                if len(cache) >= _CANONICAL_MAX:
                    cache.clear()
                line = cache[field] = _relaxed(*field) + b"\r\n"
            out.append(line)
    return out


def relaxed_body(body: bytes) -> bytes:
    """Relaxed body canonicalisation (RFC 6376 §3.4.4).

    Fast path: a body with no tab, no run of spaces, no space before a line end and only
    CRLF line ends has nothing to compress, so only its trailing empty lines go; these
    checks run at C speed. Anything else takes dkimpy's regex implementation.
    """
    if (b"\t" not in body and b"  " not in body and b" \r\n" not in body
            and body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n") and not body.endswith(b" ")):
        stripped = body.rstrip(b"\r\n")
        return stripped + b"\r\n" if stripped else b""
    result: bytes = Relaxed.canonicalize_body(body)
    return result


def _fold_names(names: list[str]) -> str:
    lines, line = [], ""
    for name in names:
        piece = name if not line else ":" + name
        if line and len(line) + len(piece) > 70:
            lines.append(line)
            line = ":" + name
        else:
            line += piece
    lines.append(line)
    return "\r\n ".join(lines)


def _fold_base64(data: bytes, width: int = 72) -> bytes:
    return b"\r\n ".join(data[i:i + width] for i in range(0, len(data), width))


def sign(signers: list[DkimSigner], message: bytes) -> bytes:
    """The message with one signature per key prepended (dual signing: RSA and Ed25519)."""
    if not signers:
        return message
    now = int(time.time())
    return b"".join(s.signature_header(message, now) for s in signers) + message


class SigningPool:
    """RSA signatures by the key worker, a child process on the other core (keyworker.py
    says why not threads). Canonicalising and hashing stay here: they are cheap. If the
    worker is gone, messages are signed in the daemon (slower, never unsigned) and a new
    worker is started after RESTART_AFTER seconds."""

    RESTART_AFTER = 5.0
    TIMEOUT = 10.0

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Lock | None = None
        self._kids: dict[DkimSigner, int] = {}
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._outbox: list[bytes] = []
        self._sent: dict[int, float] = {}  # request -> loop time it went out, oldest first
        self._watchdog: asyncio.TimerHandle | None = None
        self._rid = itertools.count(1)
        self._retry_at = 0.0

    async def sign(self, signers: list[DkimSigner], message: bytes) -> bytes:
        if not signers:
            return message
        now = int(time.time())
        fields = []
        for signer in signers:
            value, digest = signer.prepare(message, now)
            signature = await self._remote(signer, digest) if signer.slow else b""
            fields.append(signer.field(value, signature or signer.key_op(digest)))
        return b"".join(fields) + message

    async def _remote(self, signer: DkimSigner, digest: bytes) -> bytes:
        """The signature from the worker, or b"" when it cannot give one now."""
        proc = self._proc or await self._start()
        if proc is None or proc.stdin is None:
            return b""
        kid = self._kids.get(signer)
        if kid is None:
            kid = self._kids[signer] = len(self._kids) + 1
            der = signer.private_der()
            self._send(proc, b"K" + KEY_HEAD.pack(kid, len(der)) + der)
        rid = next(self._rid) & 0xFFFFFFFF
        loop = asyncio.get_running_loop()
        fut = self._waiting[rid] = loop.create_future()
        self._sent[rid] = loop.time()
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.TIMEOUT / 4, self._watch)
        self._send(proc, b"S" + SIGN.pack(rid, kid, digest))
        try:
            signature: bytes = await fut
            return signature
        finally:
            self._waiting.pop(rid, None)
            self._sent.pop(rid, None)

    def _send(self, proc: asyncio.subprocess.Process, record: bytes) -> None:
        """Records of one pass of the event loop go out in one write (one syscall, and one
        wake-up of the worker, for all the connections that signed meanwhile)."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush, proc)
        self._outbox.append(record)

    def _flush(self, proc: asyncio.subprocess.Process) -> None:
        records, self._outbox = self._outbox, []
        if proc is self._proc and proc.stdin is not None:
            proc.stdin.write(b"".join(records))

    def _watch(self) -> None:
        """One timer for all requests (cheaper than a timeout each): a worker that has sat on
        the oldest request for TIMEOUT is taken for hung, and its requests are signed here."""
        self._watchdog = None
        if not self._sent:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - next(iter(self._sent.values())) > self.TIMEOUT:
            self._lost(f"no signature within {self.TIMEOUT:g} s")
        else:
            self._watchdog = loop.call_later(self.TIMEOUT / 4, self._watch)

    async def _start(self) -> asyncio.subprocess.Process | None:
        if time.monotonic() < self._retry_at:
            return None
        self._starting = self._starting or asyncio.Lock()
        async with self._starting:
            if self._proc is None and time.monotonic() >= self._retry_at:
                try:
                    self._proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "mta.delivery.keyworker",
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
                except OSError as exc:
                    self._lost(f"cannot start: {exc}")
                    return None
                self._kids.clear()
                self._reader = asyncio.get_running_loop().create_task(self._read(self._proc))
        return self._proc

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        buf = b""
        while chunk := await proc.stdout.read(1 << 16):
            buf += chunk
            pos = 0
            while len(buf) - pos >= REPLY.size:
                rid, size = REPLY.unpack_from(buf, pos)
                if len(buf) - pos - REPLY.size < size:
                    break
                fut = self._waiting.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result(buf[pos + REPLY.size:pos + REPLY.size + size])
                pos += REPLY.size + size
            buf = buf[pos:]
        if self._proc is proc:
            self._lost(f"exited with {await proc.wait()}")

    def _lost(self, why: str) -> None:
        log.warning("dkim_worker_lost", error=why, restart_in=self.RESTART_AFTER)
        self._retry_at = time.monotonic() + self.RESTART_AFTER
        self.close()

    async def aclose(self) -> None:
        """At shutdown: the worker is stopped and waited for, so nothing outlives the loop."""
        proc = self._proc
        self.close()
        if proc is not None:
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await asyncio.wait_for(proc.wait(), 5)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._reader = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(b"")  # signed in the daemon instead
        self._waiting.clear()
        self._sent.clear()
        self._outbox.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


def _load_private(path: str, algorithm: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN" in data:
        key = serialization.load_pem_private_key(data, password=None)
    else:  # dkimpy's ed25519 form: the base64 of the 32-byte seed
        key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data.strip()))
    if algorithm == "rsa-sha256" and not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    if algorithm == "ed25519-sha256" and not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 1024:
        raise ValueError(f"RSA key of {key.key_size} bits; RFC 8301 requires at least 1024 (use 2048)")
    assert isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey))
    return key


def load_signers(domains: Mapping[str, SendingDomain]) -> dict[str, list[DkimSigner]]:
    """Every configured key, loaded now; raises ConfigError naming the key on any problem."""
    out: dict[str, list[DkimSigner]] = {}
    for name, sd in domains.items():
        for i, key in enumerate(sd.dkim):
            label = f"sending_domains.{name}.dkim" + (f"[{i}]" if len(sd.dkim) > 1 else "") + ".key_file"
            try:
                private = _load_private(key.key_file, key.algorithm)
            except OSError as exc:
                raise ConfigError(f"{label}: cannot read {key.key_file}: {exc.strerror or exc}") from None
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{label}: {key.key_file} is not a usable {key.algorithm} key: {exc}") from None
            out.setdefault(name, []).append(DkimSigner(name, key, private))
    return out
