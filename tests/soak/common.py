"""What the soaks share: the process's resident memory and the kit allocator's accounting, and the bound
they must stay within once warm."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import pytest

from spark_lab.memory import get_allocator

psutil = pytest.importorskip("psutil")

# After warm-up, resident memory may not rise more than this above its post-warm-up level: room for
# malloc's arenas and Python's free lists settling, far below a leak of even 10 kB a turn over 2,000 turns.
RSS_BOUND = 24 << 20
ALLOC_BOUND = 0             # the kit allocator's bytes in use: back to exactly the baseline, tag by tag


@dataclass
class Mark:
    rss: int                # bytes resident
    in_use: int             # bytes the kit allocator has handed out and not freed
    by_tag: dict            # tag -> bytes in use


def mark() -> Mark:
    gc.collect()
    s = get_allocator().stats()
    return Mark(psutil.Process().memory_info().rss, s.in_use, dict(s.by_tag))


def env_count(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def check(what: str, n: int, base: Mark, peak_rss: int, end: Mark) -> str:
    grown = peak_rss - base.rss
    line = (f"{what}: {n} in one process; RSS {base.rss / 2**20:.1f} MB after warm-up, peak {peak_rss / 2**20:.1f} MB "
            f"({grown / 2**20:+.1f} MB, bound {RSS_BOUND >> 20} MB), end {end.rss / 2**20:.1f} MB; allocator "
            f"{base.in_use} B -> {end.in_use} B")
    print(line)
    assert end.by_tag == base.by_tag, f"allocator tags {base.by_tag} -> {end.by_tag}"
    assert end.in_use - base.in_use <= ALLOC_BOUND, line
    assert grown <= RSS_BOUND, line
    return line
