"""Newline-delimited JSON over a Unix stream socket: the submit and control protocols (SPEC §4).

One request per line, one answer line per request, in order. Requests of one connection
are handled concurrently (so a pipeline of jobs shares group commits) but answered in
the order they came. Anything that is not a JSON object line gets an error answer and
the connection carries on; an over-long line is skipped to its newline.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger("mta.socket")
MAX_IN_FLIGHT = 64  # per connection: beyond this the reader waits (backpressure)
# Clients served at once per socket; more are answered `unavailable` and closed. Campaign
# systems pipeline over a few connections; hundreds at once is a flood or a leak.
MAX_CLIENTS = 512
_encode = msgspec.json.encode
_decode = msgspec.json.decode


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


# A handler gets the request as a dict, or as the Struct of a typed op (see JsonLineServer),
# or an Invalid when a typed op's line did not decode into its Struct.
Handler = Callable[[Any, Peer], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Invalid:
    """A typed op's request that is JSON but not of its type: what is wrong, and the line.
    No generic decoding of the line is tried: for a 60 MB line that would cost more than a
    gigabyte of dicts only to say the same."""

    message: str
    line: bytes


class _Op(msgspec.Struct):
    """Just the op of a request: decoding into it skips every other field without building it."""

    op: Any = None


_decode_op = msgspec.json.Decoder(_Op).decode


def error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"ok": False}
    answer.update(extra)
    answer["error"] = {"code": code, "message": message}
    return answer


def peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return Peer(pid, uid, gid)
    except (OSError, AttributeError):
        return Peer(0, -1, -1)


def prepare_socket_path(path: str) -> None:
    """Remove a stale socket file, refusing to steal one a live daemon still serves."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists() and not p.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        p.unlink()
        return
    finally:
        probe.close()
    raise RuntimeError(f"{path} is in use by a running process")


class JsonLineServer:
    def __init__(self, path: str, handler: Handler, *, max_line: int, mode: int, group: str = "",
                 allowed_uids: tuple[int, ...] = (), max_clients: int = MAX_CLIENTS,
                 typed: dict[str, Callable[[bytes], Any]] | None = None):
        self.max_clients = max_clients
        # ops whose lines are decoded straight into their Struct: a 10,000-recipient job is
        # then 10,000 small structs, not 20,000 dicts converted into structs afterwards
        self.typed = typed or {}
        self.path = path
        self.handler = handler
        self.max_line = max_line
        self.mode = mode
        self.group = group
        self.allowed_uids = allowed_uids
        self.server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.accepting = True

    async def start(self) -> None:
        prepare_socket_path(self.path)
        old = os.umask(0o177)  # no window in which the socket is wider open than `mode`
        try:
            self.server = await asyncio.start_unix_server(self._serve, self.path, limit=self.max_line + 1)
        finally:
            os.umask(old)
        if self.group:
            try:
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            except KeyError:
                log.warning("group %s does not exist; %s keeps the daemon's group", self.group, self.path)
            except PermissionError:
                log.warning("cannot give %s to group %s", self.path, self.group)
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self._connections):
            task.cancel()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = peer_of(writer)
        if self.allowed_uids and peer.uid not in self.allowed_uids and peer.uid != os.getuid():
            writer.write(_encode(error("forbidden", f"uid {peer.uid} may not use this socket")) + b"\n")
            await _drain_close(writer)
            return
        if len(self._connections) > self.max_clients:
            # a flood of connections costs each one answer, not a file descriptor held open
            if task is not None:
                self._connections.discard(task)
            writer.write(_encode(error("unavailable", f"too many connections (over {self.max_clients}); "
                                                      "retry later")) + b"\n")
            await _drain_close(writer)
            return
        answers: asyncio.Queue[asyncio.Future[dict[str, Any]] | None] = asyncio.Queue(MAX_IN_FLIGHT)
        sender = asyncio.create_task(self._send_answers(answers, writer))
        try:
            while True:
                line = await self._read_line(reader)
                if line is None:
                    break
                fut: asyncio.Future[dict[str, Any]]
                if isinstance(line, bytes) and not line.strip():
                    continue
                if isinstance(line, Exception):
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_result(error("malformed_request", str(line)))
                else:
                    fut = asyncio.ensure_future(self._answer(line, peer))
                await answers.put(fut)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            await answers.put(None)
            with contextlib.suppress(Exception):
                await sender
            await _drain_close(writer)
            if task is not None:
                self._connections.discard(task)

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | Exception | None:
        try:
            line = await reader.readuntil(b"\n")
            return line
        except asyncio.IncompleteReadError as exc:
            return exc.partial or None  # a last line without newline still counts
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
            while True:  # skip the rest of the over-long line
                try:
                    await reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await reader.readexactly(more.consumed)
                except asyncio.IncompleteReadError:
                    break
            return ValueError(f"request line longer than {self.max_line} bytes (submit.max_line_bytes)")

    async def _answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            op = _decode_op(line).op
        except msgspec.ValidationError:
            return error("malformed_request", "a request must be a JSON object")
        except (msgspec.DecodeError, RecursionError, ValueError) as exc:
            return error("malformed_request", f"not valid JSON: {str(exc)[:200]}")
        if not isinstance(op, str):
            return error("malformed_request", "a request needs a string \"op\"")
        request: Any = None
        decode = self.typed.get(op)
        if decode is not None:
            try:
                request = decode(line)
            except msgspec.ValidationError as exc:
                request = Invalid(str(exc), line)
        if request is None:
            try:
                request = _decode(line)
            except (msgspec.DecodeError, RecursionError, ValueError) as exc:
                return error("malformed_request", f"not valid JSON: {str(exc)[:200]}")
        if not self.accepting:
            return error("unavailable", "the daemon is shutting down; retry later")
        try:
            return await self.handler(request, peer)
        except Exception as exc:  # a bug must not cost the connection
            log.exception("request %s failed", op)
            return error("internal_error", f"{type(exc).__name__}: {exc}"[:300])

    async def _send_answers(self, answers: asyncio.Queue[asyncio.Future[dict[str, Any]] | None],
                            writer: asyncio.StreamWriter) -> None:
        while True:
            fut = await answers.get()
            if fut is None:
                return
            answer = await fut
            try:
                writer.write(_encode(answer) + b"\n")
                if writer.transport.get_write_buffer_size() > 1 << 20:
                    await writer.drain()
            except (ConnectionError, RuntimeError):
                continue  # the client went away; keep consuming so handlers finish
            if answers.empty():
                with contextlib.suppress(ConnectionError):
                    await writer.drain()


async def _drain_close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()
        await writer.wait_closed()
