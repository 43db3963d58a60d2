"""A worker's own backlog: whether it already holds enough work that releasing more would queue it.

Once a downstream answers as fast as it is called, what bounds the adaptive release is the
workers themselves. The pace (``core/pacing.py``) sees that only through the outcomes that
come back: a latency late, and never as a queue. Against calls of 2.5 s on 2 x 50
threads, 3,000 parked tasks were released at up to 1,556/s while the workers ran 40/s,
and 2,629 of them waited in the broker, ahead of every other task of their queue.

A worker knows better, at once: the tasks it has taken from the broker (its prefetch)
and not yet started wait in its own process. When they are a whole pool's worth, and at
least two releaser ticks of what its pool starts, more released now could only wait in
the broker, so its releaser releases nothing this tick (``Releaser``'s ``backlog``). Its
pool cannot go idle meanwhile: what waits in the process covers the ticks held. Every
worker asks its own pool, so the release follows what the workers take, together: one
whose pool has room releases at the shared pace, one whose pool is full does not.

A worker that prefetches one task per slot (``worker_prefetch_multiplier = 1``, as
``acks_late`` advises) never has anything waiting in it. While its pool is at least
half busy, a pass of its releaser publishes no more than the pool will take by the
next: its free slots and what it started since the last pass (half that while its calls
last longer than two passes, so a queue the ramp left in the broker drains), rather than
a second's worth of the shared pace in one burst. (With a larger prefetch the waiting
tasks say more, and bounding by free slots too left slots idle: 86.8 s against 81.4 s.)
A pool with a free slot is never held: a tick held would leave it idle. The bound is the
pace's only: a releaser still sends probes and tasks past their deadline (``Releaser``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

__all__ = ["WorkerBacklog"]


class WorkerBacklog:
    """How much more this worker's pool will take (``room()``), asked once per releaser pass."""

    def __init__(self, slots: int, state: ModuleType | Any | None = None, *, prefetch: int = 4) -> None:
        if state is None:
            from celery.worker import state as worker_state

            state = worker_state
        #: Celery's worker state (``celery.worker.state``): its reserved and active requests.
        self.state = state
        #: The pool's slots (its concurrency; at least one).
        self.slots = max(1, slots)
        #: Whether the worker takes no more from the broker than its pool runs
        #: (``worker_prefetch_multiplier = 1``): nothing ever waits in it.
        self.takes_what_it_runs = prefetch == 1
        self._accepted: int = state.all_total_count[0]

    def waiting(self) -> int:
        """Tasks this worker took and has not started: reserved, not yet active."""
        reserved: int = len(self.state.reserved_requests)
        return max(0, reserved - len(self.state.active_requests))

    def room(self) -> int | None:
        """How many tasks the releaser may publish this pass (asked once per pass, a tick
        apart), from what this worker holds and what its pool started since the last ask:

        * ``0`` while the tasks waiting in this worker are a whole pool's worth and at
          least twice what its pool started (two ticks of work): more would only queue
          in the broker, and the pool has work for the ticks held;
        * for a worker that prefetches no more than it runs (``worker_prefetch_multiplier
          = 1``: nothing ever waits in it), while half its pool or more is busy, the
          slots free now and what its pool started: about what it takes by the next
          pass, not a second's worth of the shared pace at once (passes while pools of
          0.5 s calls filled published that: 1,810 tasks waited in the broker; and a pool
          of one slot, busy whenever its call runs, was never bounded). Half what it
          started while its calls last more than two ticks (more of its slots busy than
          twice what started: Little's law): slots that a queue in the broker refills are
          busy again by the next pass, so a queue the ramp left there drains; free ones
          are the sign it is empty;
        * ``None`` (no bound) otherwise: a pool with room to spare, or a larger prefetch
          whose waiting tasks show no queue.
        """
        accepted: int = self.state.all_total_count[0]
        started, self._accepted = max(0, accepted - self._accepted), accepted
        if self.waiting() >= max(self.slots, 2 * started):
            return 0
        active: int = len(self.state.active_requests)
        if self.takes_what_it_runs and 2 * active >= self.slots:
            return max(0, self.slots - active) + (started // 2 if active > 2 * started else started)
        return None
