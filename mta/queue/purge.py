"""Spool writes that remove personal data (SPEC §12): retention, account deletion, erasure.

Each runs in the writer thread inside one transaction, so a crash leaves either all of it
or none of it (a restart of the same command finishes the job). With `secure_delete` on
and the WAL truncated afterwards (`Spool.truncate_wal`), what is removed here is gone
from the files too, not only from the tables.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

from ..types import State

# Events whose body names a recipient: purged after privacy.retention. The others carry
# no address (accepted, paused, resumed, warned) or only a keyed hash (complained, erased).
ADDRESS_EVENTS = ("delivered", "deferred", "bounced", "expired", "unsubscribed")
BATCH = 5000


def _expired(conn: sqlite3.Connection, sql: str, start: int, cutoff: float) -> tuple[list[Any], int]:
    """Rows of `sql` (key, time, ...) from key `start` on, in key order, while older than
    cutoff (keys grow with time, up to a batch), and the key to start from next time."""
    rows, next_from = [], start
    for row in conn.execute(sql, (start, BATCH)).fetchall():
        if row[1] >= cutoff:
            break
        next_from = row[0] + 1
        rows.append(row)
    return rows, next_from


def purge_expired(conn: sqlite3.Connection, cutoff: float, events_from: int,
                  jobs_from: int) -> tuple[int, int, int, int, int]:
    """Drop what carries an address and is older than cutoff: events from cursor events_from
    on, suppression entries' clear address, and the addresses in the stored answers of jobs
    from row jobs_from on. Each pass starts where the last one stopped, so old rows are
    read once. Returns (events deleted, next events cursor, suppression entries hashed,
    answers scrubbed, next job row)."""
    events, next_events = _expired(
        conn, "SELECT cursor, time, type FROM events WHERE cursor >= ? ORDER BY cursor LIMIT ?", events_from, cutoff)
    doomed = [(cursor,) for cursor, _, etype in events if etype in ADDRESS_EVENTS]
    conn.executemany("DELETE FROM events WHERE cursor = ?", doomed)
    hashed = conn.execute("UPDATE suppression SET address = NULL WHERE address IS NOT NULL AND time < ?",
                          (cutoff,)).rowcount
    jobs, next_jobs = _expired(
        conn, "SELECT id, created, answer FROM jobs WHERE id >= ? ORDER BY id LIMIT ?", jobs_from, cutoff)
    named = [(_without_emails(bytes(answer)), job_row) for job_row, _, answer in jobs if b'"email"' in bytes(answer)]
    conn.executemany("UPDATE jobs SET answer = ? WHERE id = ?", named)
    return len(doomed), next_events, hashed, len(named), next_jobs


def _without_emails(answer: bytes, only: str | None = None) -> bytes:
    """A stored submit answer with the rejected recipients' addresses removed (all, or one)."""
    doc: dict[str, Any] = msgspec.json.decode(answer)
    for entry in doc.get("rejected", []):
        if isinstance(entry, dict) and "email" in entry and (only is None or str(entry["email"]).lower() == only):
            del entry["email"]
    return msgspec.json.encode(doc)


def delete_account(conn: sqlite3.Connection, account: str,
                   event: tuple[float, str, str | None, bytes]) -> dict[str, int]:
    """Everything the spool holds for an account, in one transaction, then the event that
    records the deletion (which names the account and nothing else)."""
    jobs = "SELECT id FROM jobs WHERE account = ?"
    rcpts = f"SELECT id FROM recipients WHERE job IN ({jobs})"
    queued = conn.execute(f"SELECT count(*) FROM recipients WHERE job IN ({jobs}) AND state = 0",
                          (account,)).fetchone()[0]
    conn.execute(f"DELETE FROM review WHERE recipient IN ({rcpts})", (account,))
    conn.execute(f"DELETE FROM returns WHERE recipient IN ({rcpts})", (account,))
    messages = conn.execute(f"DELETE FROM recipients WHERE job IN ({jobs})", (account,)).rowcount
    removed_jobs = conn.execute("DELETE FROM jobs WHERE account = ?", (account,)).rowcount
    events = conn.execute("DELETE FROM events WHERE account = ?", (account,)).rowcount
    conn.execute("DELETE FROM campaigns WHERE account = ?", (account,))
    suppressed = conn.execute("DELETE FROM suppression WHERE account = ?", (account,)).rowcount
    conn.execute("DELETE FROM accounts WHERE id = ?", (account,))
    conn.execute("INSERT INTO events (time, type, account, body) VALUES (?, ?, ?, ?)", event)
    return {"queued_cancelled": int(queued), "messages": messages, "jobs": removed_jobs, "events": events,
            "suppression_entries": suppressed}


def erase_address(conn: sqlite3.Connection, address: str, rhash: str, now: float,
                  event: tuple[float, str, str | None, bytes]) -> dict[str, int]:
    """One address out of queued mail, events, stored answers and suppression entries; it
    stays suppressed on the global list as a keyed hash. `address` is lower-cased."""
    cancelled = [r[0] for r in conn.execute("SELECT id FROM recipients WHERE rhash = ? AND state = 0",
                                            (rhash,)).fetchall()]
    conn.executemany("DELETE FROM review WHERE recipient = ?", [(r,) for r in cancelled])
    conn.executemany("UPDATE recipients SET state = ?, email = NULL, vars = NULL WHERE id = ?",
                     [(int(State.CANCELLED), r) for r in cancelled])
    pattern = f"%{address}%"
    events = conn.execute("DELETE FROM events WHERE lower(CAST(body AS TEXT)) LIKE ?", (pattern,)).rowcount
    for job_row, answer in conn.execute("SELECT id, answer FROM jobs WHERE lower(CAST(answer AS TEXT)) LIKE ?",
                                        (pattern,)).fetchall():
        conn.execute("UPDATE jobs SET answer = ? WHERE id = ?", (_without_emails(bytes(answer), address), job_row))
    known = conn.execute("UPDATE suppression SET address = NULL WHERE hash = ?", (rhash,)).rowcount
    conn.execute("INSERT INTO suppression (account, hash, address, reason, time) VALUES ('*', ?, NULL, 'erased', ?) "
                 "ON CONFLICT (account, hash) DO NOTHING", (rhash, now))
    conn.execute("INSERT INTO events (time, type, account, body) VALUES (?, ?, ?, ?)", event)
    return {"queued_cancelled": len(cancelled), "events": events, "suppression_entries": known}
