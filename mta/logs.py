"""structlog JSON lines on stdout (journald keeps them), for our loggers and the stdlib's.

Addresses never appear in logs: callers log `rcpt_hash` (a keyed hash) and the domain
(SPEC §12).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

_configured = False


def setup(level: int = logging.INFO) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _timestamp,
    ]
    # msgspec renders a line ~5x faster than the stdlib's json: there is a line per delivery
    encoder = msgspec.json.Encoder(enc_hook=str)
    binary = getattr(sys.stdout, "buffer", None)
    render = encoder.encode if binary is not None else lambda event: encoder.encode(event).decode()
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(serializer=lambda event, **_: render(event))],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=(structlog.BytesLoggerFactory(binary) if binary is not None
                        else structlog.WriteLoggerFactory(sys.stdout)),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()],
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.processors.format_exc_info],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("mail.log", "aiosmtplib", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_second: tuple[int, str] = (0, "")


def _timestamp(logger: object, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """ISO 8601 UTC with microseconds, as structlog's TimeStamper writes it, with the
    date-and-second part formatted once per second (a line per delivery at full speed)."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    event["timestamp"] = f"{_second[1]}.{int((now - whole) * 1e6):06d}Z"
    return event


def redact(text: str, address: str) -> str:
    """A remote reply without the recipient's address in it (receivers often quote it:
    "550 5.1.1 <ann@example.test>: Recipient address rejected")."""
    if "@" not in text or not address:
        return text
    return re.sub(re.escape(address), "<rcpt>", text, flags=re.IGNORECASE)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
