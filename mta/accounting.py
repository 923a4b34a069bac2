"""The accounting log (issue 9): one JSON line per message whose delivery is final, for billing.

`<state_dir>/accounting/acct-YYYY-MM-DD.jsonl`, a new file each UTC day (rotation by name,
so no signal or copy is needed; old days can be shipped and removed by any log tool).
Lines carry the account, campaign, job, sending domain, result and the recipient's
domain and keyed hash: never the address (SPEC §12). Written from the results batch,
off the per-message path, and flushed with each batch.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec


class AccountingLog:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o750)
        self._day = ""
        self._file: IO[bytes] | None = None
        self._encode = msgspec.json.Encoder()

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
        f = self._open(float(records[-1]["time"]))  # type: ignore[arg-type]
        f.write(b"".join(self._encode.encode(r) + b"\n" for r in records))
        f.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
