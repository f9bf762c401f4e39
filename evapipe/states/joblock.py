"""One job per store entry at a time: a file lock per store key, taken by rank 0 before it looks for a cache hit
and held until the job is done.

Two jobs with the same key would otherwise share one checkpoint folder (each pruning or deleting the other's) and
interleave their state/sidecar renames. With the lock, the second job says that the same job is running, waits,
and then finds the first one's state: a cache hit. The lock is an OS file lock (`filelock`), released by the
kernel when its holder dies, so a killed job never leaves a stale lock behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("evapipe")

POLL_S = 5.0  # while waiting: how often `waiting` is called (it keeps the other ranks' collective alive)


def acquire(path: Path, what: str, waiting: Callable[[], None] = lambda: None, poll_s: float = POLL_S) -> FileLock:
    """Take the lock at `path`; while another process holds it, say so once and call `waiting` every poll_s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
        return lock
    except Timeout:
        log.info("the same job (%s) is running in another process (lock %s is held); waiting for it to finish",
                 what, path)
    while True:
        waiting()
        try:
            lock.acquire(timeout=poll_s)
            log.info("the other job finished; going on")
            return lock
        except Timeout:
            continue
