"""structlog JSON lines on stdout (journald keeps them), for our loggers and the stdlib's.

Addresses never appear in logs: callers log `rcpt_hash` (a keyed hash) and the domain
(SPEC §12).
"""

from __future__ import annotations

import logging
import re
import sys

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
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
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


def redact(text: str, address: str) -> str:
    """A remote reply without the recipient's address in it (receivers often quote it:
    "550 5.1.1 <ann@example.test>: Recipient address rejected")."""
    if "@" not in text or not address:
        return text
    return re.sub(re.escape(address), "<rcpt>", text, flags=re.IGNORECASE)


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
