"""Per-key mutual exclusion between threads, so that concurrent duplicates of one
operation on one branch run one after the other (the second finds the first one's
record and answers from it).

Invariant: an entry exists only while some thread holds or waits for its lock, so the
map is bounded by the number of operations in flight.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class KeyedLocks:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._entries: dict[str, list] = {}  # key -> [lock, number of holders and waiters]

    @contextlib.contextmanager
    def hold(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """Holds the lock of ``key`` for the ``with`` block; yields whether it was taken
        (always True when ``blocking``)."""
        with self._mutex:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        taken = entry[0].acquire(blocking)
        try:
            yield taken
        finally:
            if taken:
                entry[0].release()
            with self._mutex:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)
