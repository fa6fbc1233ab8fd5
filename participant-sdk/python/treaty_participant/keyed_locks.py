"""Per-key mutual exclusion between threads, so that concurrent duplicates of one
operation on one branch run one after the other (the second finds the first one's
record and answers from it).

Invariants: an entry exists only while some thread holds or waits for its lock, so the
map is bounded by the number of operations in flight; and at most
:data:`MAX_WAITING_PER_KEY` wait for one key's lock. A call whose user code does not end
holds its branch's lock, and each retry of it would otherwise take one more of the
server's threads for as long as it lasts (as in the Rust SDK's ``keyed_locks``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

#: How many may wait for one key's lock while another holds it; one more is refused.
MAX_WAITING_PER_KEY = 8
#: How often a waiter asks whether its caller still wants the lock.
WANTED_CHECK_S = 0.1
#: A wait's timeout of this long or more is taken as none.
DAY_S = 86_400.0


class Busy(Exception):
    """The lock was not taken: :data:`MAX_WAITING_PER_KEY` already wait for it, or the
    wait's timeout passed."""


class KeyedLocks:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._entries: dict[str, list] = {}  # key -> [lock, number of holders and waiters]

    @contextlib.contextmanager
    def hold(
        self,
        key: str,
        blocking: bool = True,
        timeout_s: float | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> Iterator[bool]:
        """Holds the lock of ``key`` for the ``with`` block; yields whether it was taken
        (always True when ``blocking``, which raises :class:`Busy` instead: when
        :data:`MAX_WAITING_PER_KEY` already wait, when ``timeout_s`` passes first (a day
        or more is no timeout), or when ``still_wanted``, asked every
        :data:`WANTED_CHECK_S` while waiting, says False). A free lock is always taken."""
        with self._mutex:
            entry = self._entries.setdefault(key, [threading.Lock(), 0])
            crowded = entry[1] > MAX_WAITING_PER_KEY
            if not crowded:
                entry[1] += 1
        if crowded:
            if blocking:
                raise Busy(
                    f"{MAX_WAITING_PER_KEY} operations on this branch already wait for one "
                    "that has not ended; retry later"
                )
            yield False
            return
        try:
            taken = entry[0].acquire(False) if not blocking else _wait(entry[0], timeout_s, still_wanted)
            try:
                yield taken
            finally:
                if taken:
                    entry[0].release()
        finally:
            with self._mutex:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[key]

    def users(self, key: str) -> int:
        """How many hold or wait for ``key``'s lock."""
        with self._mutex:
            entry = self._entries.get(key)
            return entry[1] if entry is not None else 0

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)


def _wait(lock: threading.Lock, timeout_s: float | None, still_wanted: Callable[[], bool] | None) -> bool:
    """Takes ``lock``, or raises :class:`Busy` once ``timeout_s`` passed or the caller is
    no longer there."""
    # grpc gives a call without a deadline a time remaining of centuries, which no lock
    # takes as a timeout: a day or more is no deadline.
    if lock.acquire(False):
        return True
    deadline = None if timeout_s is None or timeout_s >= DAY_S else time.monotonic() + max(timeout_s, 0.0)
    while True:
        slice_s = -1.0 if still_wanted is None else WANTED_CHECK_S
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Busy("the branch stayed busy with another operation until the caller's deadline")
            slice_s = left if slice_s < 0 else min(slice_s, left)
        if lock.acquire(True, slice_s):
            return True
        if still_wanted is not None and not still_wanted():
            raise Busy("the caller went away while the branch was busy with another operation")
