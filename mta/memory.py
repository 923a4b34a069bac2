"""Giving freed memory back to the system.

Decoding a 10,000-recipient job allocates and frees tens of megabytes in small pieces.
glibc's allocator keeps freed pages for reuse, so after a hundred such jobs the daemon's
resident size stays near the peak of the busiest moment, not what is live (measured:
450 MB resident for 1,000,000 queued recipients whose live data is ~100 MB). malloc_trim
returns the free pages; it costs about a millisecond, so it runs at most once a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

_INTERVAL = 1.0


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


_trim = _load_trim()
_last = 0.0


def trim_soon(clock: Callable[[], float] = time.monotonic) -> bool:
    """Give free pages back unless that was done less than a second ago; True if it ran."""
    global _last
    now = clock()
    if _trim is None or now - _last < _INTERVAL:
        return False
    _last = now
    _trim(0)
    return True
