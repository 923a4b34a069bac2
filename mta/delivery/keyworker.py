"""The DKIM key worker: a child process that makes RSA signatures for the daemon.

Why a process: an RSA-2048 signature costs ~0.5 ms of CPU, as much as the rest of a
delivery. OpenSSL releases the GIL while it signs, but a signing thread must take the GIL
back after each signature, and with a busy event loop that wait (the switch interval)
is as long as the signature itself; threads reached ~900 signed messages/s here, this
process reaches what one core can sign. Only digests and signatures cross the pipe:
36 bytes in, 262 out.

Wire format on stdin (parent -> child), records back to back:
    b"K" kid:u16 len:u32 der[len]     a private key (PKCS#8 DER), kept under `kid`
    b"S" rid:u32 kid:u16 digest[32]   sign this SHA-256 digest with key `kid`
on stdout (child -> parent):
    rid:u32 len:u16 signature[len]    len 0: the key was unknown or the signature failed
Key material arrives over the pipe only: never argv, the environment or a file.
"""

from __future__ import annotations

import os
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

KEY_HEAD = struct.Struct(">HI")
SIGN = struct.Struct(">IH32s")
REPLY = struct.Struct(">IH")


def _sign(keys: dict[int, rsa.RSAPrivateKey], kid: int, digest: bytes) -> bytes:
    key = keys.get(kid)
    if key is None:
        return b""
    try:
        return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except ValueError:
        return b""


def serve(read_fd: int, write_fd: int) -> None:
    keys: dict[int, rsa.RSAPrivateKey] = {}
    buf = b""
    while True:
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            return  # the daemon closed the pipe: its end is ours
        buf += chunk
        pos = 0
        while pos < len(buf):
            kind = buf[pos:pos + 1]
            if kind == b"S":
                if len(buf) - pos < 1 + SIGN.size:
                    break
                rid, kid, digest = SIGN.unpack_from(buf, pos + 1)
                pos += 1 + SIGN.size
                signature = _sign(keys, kid, digest)
                # each signature goes back at once: holding a batch's answers until its last
                # signature is made would leave the daemon's connections waiting meanwhile
                _write_all(write_fd, REPLY.pack(rid, len(signature)) + signature)
            elif kind == b"K":
                if len(buf) - pos < 1 + KEY_HEAD.size:
                    break
                kid, size = KEY_HEAD.unpack_from(buf, pos + 1)
                end = pos + 1 + KEY_HEAD.size + size
                if len(buf) < end:
                    break
                key = serialization.load_der_private_key(buf[pos + 1 + KEY_HEAD.size:end], password=None)
                if isinstance(key, rsa.RSAPrivateKey):
                    keys[kid] = key
                pos = end
            else:
                raise SystemExit(f"keyworker: unknown record {kind!r}")
        buf = buf[pos:]


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


if __name__ == "__main__":
    try:
        serve(sys.stdin.fileno(), sys.stdout.fileno())
    except (BrokenPipeError, KeyboardInterrupt):
        pass
