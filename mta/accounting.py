"""The accounting log (issue 9): one JSON line per message whose delivery is final, for billing.

`<state_dir>/accounting/acct-YYYY-MM-DD.jsonl`, a new file each UTC day (rotation by name,
so no signal or copy is needed; old days can be shipped and removed by any log tool).
Lines carry the account, campaign, job, sending domain, result and the recipient's
domain and keyed hash: never the address (SPEC §12). Written from the results batch,
off the per-message path, and flushed with each batch.

The lines are encoded on the event loop and written by a thread of their own, in order:
a file write blocks, and taking the GIL back after it can cost the loop a whole switch
interval while the spool thread holds it (~6 % of the loop's time at full delivery speed).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec

log = logging.getLogger("mta.accounting")


class AccountingLog:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o750)
        self._day = ""
        self._file: IO[bytes] | None = None
        self._encode = msgspec.json.Encoder()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accounting")  # one: lines in order

    def _open(self, when: float) -> IO[bytes]:
        day = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d")
        if day != self._day or self._file is None:
            if self._file is not None:
                self._file.close()
            self._file = open(self.dir / f"acct-{day}.jsonl", "ab")  # noqa: SIM115 - kept open across batches
            self._day = day
        return self._file

    def write(self, records: list[dict[str, object]]) -> None:
        if not records:
            return
        blob = b"".join(self._encode.encode(r) + b"\n" for r in records)
        self._writer.submit(self._append, float(records[-1]["time"]), blob)  # type: ignore[arg-type]

    def _append(self, when: float, blob: bytes) -> None:
        try:
            f = self._open(when)
            f.write(blob)
            f.flush()
        except OSError as exc:  # a full disk must not stop deliveries; the spool has the outcomes
            log.error("accounting log write failed: %s", exc)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._file is not None:
            self._file.close()
            self._file = None
