"""The audit trail (SPEC §12): one JSON line per admin action on the control socket.

`privacy.audit_log` (default `<state_dir>/audit.jsonl`) is only ever appended to: no
control operation writes, truncates or deletes it, so an admin cannot edit the record of
what admins did. Each line says who (peer uid, gid and pid from SO_PEERCRED), when, what
(the operation and its arguments) and how it ended. Recipient addresses in arguments are
replaced by their keyed hash: the log outlives every retention and erasure, so it must
never hold an address in the clear.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from ..events import iso

# Arguments that name a recipient's address: written as their keyed hash.
ADDRESS_ARGS = frozenset({"address", "email", "recipient"})
_decode = msgspec.json.Decoder(dict[str, Any])


class AuditLog:
    def __init__(self, path: str | Path, address_hash: Callable[[str], str], clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.address_hash = address_hash
        self.clock = clock
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def reopen(self) -> None:
        """After a rename by log rotation (`mta reload`): new records go to a new file."""
        fd = self._open()
        with self._lock:
            old, self._fd = self._fd, fd
        os.close(old)

    def record(self, action: str, args: dict[str, Any], peer: Any, result: str, error: str | None = None,
               detail: dict[str, Any] | None = None) -> None:
        """Append one record and sync it: an admin action is rare, and its record must survive a crash."""
        now = self.clock()
        entry: dict[str, Any] = {"time": iso(now), "ts": round(now, 3), "action": action,
                                 "args": self._redacted(args),
                                 "peer": {"uid": getattr(peer, "uid", None), "gid": getattr(peer, "gid", None),
                                          "pid": getattr(peer, "pid", None)},
                                 "result": result}
        if error is not None:
            entry["error"] = error
        if detail:
            entry["detail"] = detail
        line = msgspec.json.encode(entry) + b"\n"
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    def _redacted(self, args: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in args.items():
            if key == "op" or value is None or value is False or value == []:
                continue
            if key in ADDRESS_ARGS and isinstance(value, str):
                text = value.strip().lower()
                # a 32-hex-digit value already is a hash (`suppress remove HASH`)
                out[f"{key}_hash"] = text if len(text) == 32 and "@" not in text else self.address_hash(text)
            else:
                out[key] = value
        return out

    def read(self, since: float | None = None, limit: int = 100_000) -> list[dict[str, Any]]:
        """The records at or after `since` (epoch seconds), oldest first."""
        out: list[dict[str, Any]] = []
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        entry = _decode.decode(line)
                    except msgspec.DecodeError:
                        continue  # a line torn by a crash mid-write
                    if since is None or float(entry.get("ts", 0)) >= since:
                        out.append(entry)
        except FileNotFoundError:
            return []
        return out[-limit:]

    def close(self) -> None:
        os.close(self._fd)
