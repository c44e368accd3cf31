"""Ids (`resp_…`, `msg_…`, request ids): 32 hex digits, time-ordered, 80 random bits.

The first 12 digits are the millisecond of creation, so ids made one after the other sort
together: the store's indexes on ids (SQLite, PostgreSQL) then grow at their end instead of
dirtying a random page per save, which is most of what a commit and a checkpoint write. The
other 20 digits keep an id unguessable (with `ORP_AUTH_MODE=none` every client is the same
owner, and an id is all that names a stored response); they come from `os.urandom`, drawn
4 KiB at a time (one `getrandom` call and one `UUID` object per id cost more than the rest of
making a response object). A forked child (a gunicorn worker) starts with an empty pool, so no
two processes ever hand out the same bytes. An id tells when it was made, as `created_at` does.
"""

from __future__ import annotations

import os
import threading
import time

_POOL_BYTES = 4096
_ID_BYTES = 10  # random bytes per id, after the 6-byte time


class _Pool:
    __slots__ = ("data", "lock", "used")

    def __init__(self) -> None:
        self.data = b""
        self.used = 0
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.data = b""
        self.used = 0
        self.lock = threading.Lock()


_pool = _Pool()
os.register_at_fork(after_in_child=_pool.reset)


def random_hex() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits."""
    pool = _pool
    with pool.lock:
        start = pool.used
        if start + _ID_BYTES > len(pool.data):
            pool.data = os.urandom(_POOL_BYTES)
            start = 0
        pool.used = start + _ID_BYTES
        noise = pool.data[start:start + _ID_BYTES].hex()
    return f"{time.time_ns() // 1_000_000 & 0xFFFFFFFFFFFF:012x}{noise}"
