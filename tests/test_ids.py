"""Ids: time-ordered, 80 random bits each, never repeated, not shared with a forked child."""

from __future__ import annotations

import os
import re
import time

from orp_proxy.ids import random_hex
from orp_proxy.protocol.resource import new_id


def test_ids_are_32_hex_digits_and_unique_across_pool_refills() -> None:
    ids = [random_hex() for _ in range(5000)]  # about 20 refills of the pool
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert re.fullmatch(r"resp_[0-9a-f]{32}", new_id("resp"))


def test_a_forked_child_draws_its_own_bytes() -> None:
    random_hex()  # the parent's pool holds unused bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave without cleanup
        os.write(write, "".join(random_hex() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 1024).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = "".join(random_hex() for _ in range(4))
    assert len(child) == 128 and child != parent


def test_ids_sort_by_creation_time_and_start_with_it() -> None:
    first = random_hex()
    time.sleep(0.003)
    later = [random_hex() for _ in range(50)]
    assert all(first[:12] < i[:12] for i in later)
    assert abs(int(first[:12], 16) - time.time_ns() // 1_000_000) < 60_000
    assert len({i[12:] for i in later}) == 50  # the random part differs within a millisecond
