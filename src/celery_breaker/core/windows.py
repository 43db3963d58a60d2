"""Sliding windows over call outcomes: exact failure times, counts of the last N calls, time buckets."""

from __future__ import annotations

import itertools
import math
from collections import deque
from typing import Protocol

from .counters import tally

__all__ = ["TIME_BUCKETS", "CountWindow", "FailureTimes", "RateWindow", "TimeWindow"]

#: A time window is this many equal buckets; an outcome leaves it between
#: ``window * (1 - 1/TIME_BUCKETS)`` and ``window`` seconds after it was recorded (it
#: counts while its bucket is one of the last TIME_BUCKETS, the current one included).
TIME_BUCKETS = 20


class FailureTimes:
    """The times of the last ``threshold`` failures: "N failures within T seconds", exactly.

    ``add`` is O(1) and memory is O(threshold). Unlike the seed (which compared only
    the last failure with the window), failures older than the window never count.
    """

    __slots__ = ("_times", "_threshold", "_window")

    def __init__(self, threshold: int, window: float) -> None:
        self._threshold = threshold
        self._window = window
        self._times: deque[float] = deque(maxlen=threshold)

    def add(self, now: float) -> bool:
        """Record a failure at ``now``; True when ``threshold`` fell within the window."""
        times = self._times
        times.append(now)
        return len(times) == self._threshold and now - times[0] <= self._window

    def count(self, now: float) -> int:
        """Failures recorded within the window that ends at ``now``."""
        return sum(1 for t in self._times if now - t <= self._window)

    def clear(self) -> None:
        """Forget every failure."""
        self._times.clear()


class RateWindow(Protocol):
    """Totals of calls, failures and slow calls over a sliding window."""

    def add(self, now: float, failed: bool, slow: bool) -> None:
        """Count one call that ended at ``now``, failed or not, slow or not."""
        ...

    def totals(self, now: float) -> tuple[int, int, int]:
        """``(calls, failures, slow_calls)`` in the window ending at ``now``."""
        ...

    def add_success_unlocked(self, now: float) -> bool:
        """Count a fast success that ended at ``now`` without the owner's lock, if that
        can be done now; False: nothing was counted (``add`` it under the lock)."""
        ...

    def clear(self) -> None:
        """Forget every call."""
        ...


class CountWindow:
    """The last ``size`` outcomes in a ring; totals are kept by subtract-on-evict, O(1).

    Fast successes may be counted without the owner's lock (``add_success_unlocked``:
    one ``next()`` on an ``itertools.count``); the next locked operation puts them into
    the ring first, so every outcome keeps its place in the order (successes that ran
    beside a failure land on either side of it, as they may). O(1) amortised.
    """

    __slots__ = ("_size", "_ring", "_next", "_filled", "_calls", "_failures", "_slow", "_pending", "_taken")

    def __init__(self, size: int) -> None:
        self._size = size
        self._ring = bytearray(size)  # bit 0: failed, bit 1: slow
        self.clear()

    def clear(self) -> None:
        self._next = 0
        self._filled = 0
        self._calls = self._failures = self._slow = 0
        self._ring[:] = bytes(self._size)
        # A fresh counter: a success counted into the old one meanwhile is forgotten with the rest.
        self._pending = itertools.count()
        self._taken = 0

    def add_success_unlocked(self, now: float) -> bool:
        next(self._pending)
        return True

    def _take_pending(self) -> None:
        # Under the owner's lock: the successes counted without it go into the ring.
        counted = tally(self._pending)
        new = counted - self._taken
        if not new:
            return
        self._taken = counted
        if new >= self._size:  # the ring now holds nothing but those successes
            self._ring[:] = bytes(self._size)
            self._next = 0
            self._filled = self._calls = self._size
            self._failures = self._slow = 0
            return
        for _ in range(new):
            self._push(False, False)

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self._take_pending()
        self._push(failed, slow)

    def _push(self, failed: bool, slow: bool) -> None:
        i = self._next
        if self._filled == self._size:  # evict the oldest outcome, which sits at i
            old = self._ring[i]
            self._failures -= old & 1
            self._slow -= old >> 1
        else:
            self._filled += 1
            self._calls += 1
        self._ring[i] = failed | (slow << 1)
        self._failures += failed
        self._slow += slow
        self._next = (i + 1) % self._size

    def totals(self, now: float) -> tuple[int, int, int]:
        self._take_pending()
        return self._calls, self._failures, self._slow


class TimeWindow:
    """Outcomes of the last ``window`` seconds in ``TIME_BUCKETS`` buckets.

    Each bucket remembers which slice of time it holds; moving forward clears the
    buckets that fell out and subtracts them from the running totals, so ``add`` and
    ``totals`` cost O(1) amortised (at most ``TIME_BUCKETS`` steps after a long idle).

    A fast success whose time falls in the newest bucket (the head) can be counted
    without the owner's lock (``add_success_unlocked``): one ``next()`` on an
    ``itertools.count``, atomic in C. Those successes are folded into the head bucket
    under the lock, whenever the window moves or is read; only then can the head move,
    so each lands in the bucket of its own time. (A success that checked the head just
    before another thread moved it lands in the next bucket: it leaves the window one
    bucket later, never earlier.)
    """

    __slots__ = (
        "_width", "_epochs", "_calls", "_failures", "_slow", "_totals", "_head",
        "_fast_epoch", "_fast", "_folded",
    )  # fmt: skip

    def __init__(self, window: float) -> None:
        self._width = window / TIME_BUCKETS
        self._epochs = [-1] * TIME_BUCKETS
        self._calls = [0] * TIME_BUCKETS
        self._failures = [0] * TIME_BUCKETS
        self._slow = [0] * TIME_BUCKETS
        self._totals = [0, 0, 0]
        self._head = -1
        self._fast_epoch = -math.inf  # the head's epoch once it may take fast successes
        self._fast = itertools.count()  # fast successes counted since the window was made
        self._folded = 0  # ... of which this many are in the head bucket and the totals

    def clear(self) -> None:
        for i in range(TIME_BUCKETS):
            self._epochs[i] = -1
            self._calls[i] = self._failures[i] = self._slow[i] = 0
        self._totals = [0, 0, 0]
        self._head = -1
        self._fast_epoch = -math.inf
        # A fresh counter: a success counted into the old one meanwhile is forgotten with the rest.
        self._fast = itertools.count()
        self._folded = 0

    def add_success_unlocked(self, now: float) -> bool:
        if now / self._width // 1 == self._fast_epoch:  # (the epoch as _advance reads it)
            next(self._fast)
            return True
        return False

    def _fold(self) -> None:
        # Under the owner's lock: the fast successes go into the head bucket.
        counted = tally(self._fast)
        new = counted - self._folded
        if new:
            self._folded = counted
            self._calls[self._head % TIME_BUCKETS] += new
            self._totals[0] += new

    def _advance(self, now: float) -> int:
        # The quotient rounded, then floored: what the Redis scripts compute (Lua's
        # math.floor(now / width)). now // width floors the exact quotient, which for a
        # width not exact in binary (0.05) puts some outcomes in the next bucket there.
        epoch = int(now / self._width // 1)
        if epoch > self._head:
            if self._head >= 0:
                self._fold()  # (into the head they were counted in, before it moves)
            # Evict every bucket that no longer belongs to (epoch - TIME_BUCKETS, epoch].
            start = max(self._head + 1, epoch - TIME_BUCKETS + 1)
            totals = self._totals
            for e in range(start, epoch + 1):
                i = e % TIME_BUCKETS
                if self._epochs[i] != e:
                    totals[0] -= self._calls[i]
                    totals[1] -= self._failures[i]
                    totals[2] -= self._slow[i]
                    self._calls[i] = self._failures[i] = self._slow[i] = 0
                    self._epochs[i] = e
            self._head = epoch
            self._fast_epoch = float(epoch)
        return epoch

    def add(self, now: float, failed: bool, slow: bool) -> None:
        epoch = int(now / self._width // 1)  # (as _advance)
        if epoch != self._head:
            self._advance(now)
            if epoch < self._head - TIME_BUCKETS + 1:
                return  # older than the window (a clock reading from before the head)
        i = epoch % TIME_BUCKETS
        totals = self._totals
        self._calls[i] += 1
        totals[0] += 1
        # (Most calls are fast successes: skip the two counts they leave as they are.)
        if failed:
            self._failures[i] += 1
            totals[1] += 1
        if slow:
            self._slow[i] += 1
            totals[2] += 1

    def totals(self, now: float) -> tuple[int, int, int]:
        self._advance(now)
        self._fold()
        calls, failures, slow = self._totals
        return calls, failures, slow
