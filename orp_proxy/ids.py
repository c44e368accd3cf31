"""Random ids (`resp_…`, `msg_…`, request ids) from the kernel's CSPRNG, fetched in bulk.

Ids must not be guessable (with `ORP_AUTH_MODE=none` every client is the same owner, and an id
is all that names a stored response), so they come from `os.urandom`; but one `getrandom` call
and one `UUID` object per id cost more than the rest of making a response object. 4 KiB are
drawn at once and handed out 16 bytes at a time; a forked child (a gunicorn worker) starts
with an empty pool, so no two processes ever hand out the same bytes.
"""

from __future__ import annotations

import os
import threading

_POOL_BYTES = 4096
_ID_BYTES = 16


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
    """32 random hex digits (128 bits)."""
    pool = _pool
    with pool.lock:
        start = pool.used
        if start + _ID_BYTES > len(pool.data):
            pool.data = os.urandom(_POOL_BYTES)
            start = 0
        pool.used = start + _ID_BYTES
        return pool.data[start:start + _ID_BYTES].hex()
