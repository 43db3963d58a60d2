"""The releaser's watch over the parking: a store that may evict or lose parked tasks, or lost some, is said.

Every ``WATCH_EVERY`` seconds (``release.py``) a releaser counts the parked tasks and
reads the parking's epoch (``Parking.epoch``); an epoch that changed or vanished while tasks were
parked is logged at ERROR, naming the breakers that held the most at the last count, and
how many. Of all the workers sharing the store, one releaser at a time does (it holds
the store's lookout, ``Parking.lookout``): with 2,000 breakers holding parked tasks, a
count costs Redis ~5 ms of CPU, and every worker counting every second made that cost
grow with the workers (1.0 % of a Redis core for one worker, 8.7 % for 16:
``bench/idle_releasers.py``). The others only ask for the lookout; once it has been
free for ``LOOKOUT_GRACE`` seconds one takes it. Its last holder takes it back at once:
a store restarted empty also lost the lookout, and only that holder remembers the count
before, which tells what was lost. A releaser that stops gives it up, and the next to ask
takes it at once.
"""

from __future__ import annotations

import logging

from ...labels import shown_label
from ...storage import Parking
from ...storage.contract import KEPT_LIFE

__all__ = ["LOOKOUT_GRACE", "LOOKOUT_LEASE", "NAMED_IN_LOG", "ParkingWatch"]

logger = logging.getLogger("celery_breaker")


#: Seconds the lookout (the turn to count them, one releaser's at a time) lasts unless its
#: holder renews it: how long a worker that died with it leaves the parking unwatched.
LOOKOUT_LEASE = 10.0
#: Seconds a releaser that saw another hold the lookout waits, once it finds it free, before
#: taking it: its last holder, which asks every ``WATCH_EVERY`` unless a pass of its loop
#: takes longer (a health check, a RabbitMQ confirm: up to 10 s each), takes it back first.
LOOKOUT_GRACE = 10.0
#: Breakers a log line about parked tasks names, those with the most first (an outage that
#: tripped 20,000 per-key breakers made one INFO line of 390,000 characters).
NAMED_IN_LOG = 10


class ParkingWatch:
    """What a ``Releaser`` does to watch its parking (a part of that class: it keeps the
    state below, set in ``Releaser.__init__``)."""

    parking: Parking
    _eviction_checked: bool
    _lookout_id: str
    _had_lookout: bool
    _saw_holder: bool
    _free_since: float | None
    _epoch: str | None
    _known: dict[str, int]
    _lives: dict[str, str | None]
    _counted_at: float | None

    def check_eviction(self) -> None:
        """Say once, at a WARNING, when the store may evict parked tasks or breakers'
        state when full (``maxmemory-policy``), or lose parked tasks in a Sentinel
        failover (``min-replicas-to-write 0``), or at INFO that it would not say. Raises
        ``StorageError`` while the store cannot be reached (the loop tries again)."""
        found = self.parking.eviction()
        self._eviction_checked = True
        if found.risk is not None:
            logger.warning(
                "celery-breaker: %s. Set maxmemory-policy noeviction on it (a full Redis "
                "then refuses writes: tasks are deferred in the broker instead, nothing is lost), or give it "
                "memory enough never to fill",
                found.risk,
            )  # fmt: skip
        if found.failover is not None:
            logger.warning("celery-breaker: %s", found.failover)
        if found.risk is None and found.unknown is not None:
            logger.info(
                "celery-breaker: could not read the maxmemory-policy of the breaker store (%s); unless it is "
                "noeviction, a full Redis may evict parked tasks",
                found.unknown,
            )  # fmt: skip

    def keep_lookout(self, now: float) -> int:
        """Count the parked tasks (``watch_for_loss``) if this releaser holds the store's
        lookout, taking it if it is free (at once when this releaser held it last, saw
        nobody hold it, or its holder gave it up; else after ``LOOKOUT_GRACE``); otherwise
        forget its own last count, so that a turn taken later starts from a count of its
        own, never from a stale one. Returns what ``watch_for_loss`` does (0 without the
        lookout)."""
        take_free = self._had_lookout or not self._saw_holder
        if not take_free and self._free_since is not None and now - self._free_since >= LOOKOUT_GRACE:
            take_free = True
        held = self.parking.lookout(self._lookout_id, LOOKOUT_LEASE, take_free=take_free)
        if held is not None:
            self._free_since = None
        elif self._free_since is None:
            self._free_since = now
        if held is False:
            self._saw_holder = True
        self._had_lookout = bool(held)
        if held:
            return self.watch_for_loss(now)
        self._epoch, self._known, self._lives = None, {}, {}
        self._counted_at = now
        return 0

    def watch_for_loss(self, now: float) -> int:
        """Count the parked tasks and check the parking's epoch and each breaker's life; if
        the store lost tasks since the last count (the epoch, or the life of a breaker
        holding some, changed or vanished), log it at ERROR. Returns how many tasks the
        last count knew of and the store lost (0: none)."""
        epoch = self.parking.epoch()
        counts = self.parking.counts(self.parking.tags())
        known = {tag: parked + claimed for tag, (parked, claimed) in counts.items() if parked + claimed}
        # (the breakers known before too: a node restarted empty may have taken the index's
        # members with their entries)
        lives = self.parking.lives(sorted(set(known) | set(self._known)))
        lost = self._report_loss(now, known, lives, whole=epoch != self._epoch)
        self._epoch = epoch
        self._lives = {tag: lives.get(tag) for tag in known}
        if known and not self._known:
            logger.info("celery-breaker releaser: %d task(s) parked (%s)", sum(known.values()), self._held(known))
        elif self._known and not known and not lost:
            logger.info("celery-breaker releaser: no task parked any more")
        self._known = known
        self._counted_at = now
        return lost

    def _report_loss(self, now: float, known: dict[str, int], lives: dict[str, str | None], *, whole: bool) -> int:
        """Log at ERROR the tasks of the last count that the store lost; return how many.

        ``whole``: the parking's epoch moved (the store, or on a Cluster the marker's node,
        lost its data): every breaker is lost but one whose life is known and unchanged
        (it lived on another node). Otherwise only a breaker whose life changed or
        vanished is (a Cluster node restarted empty, its keys deleted or evicted); one
        whose life was not known (parked by an older release) is not judged, and a life
        gone alone, its breaker's tasks still counted (evicted), is no loss; nor is one
        written again over entries still parked (``KEPT_LIFE``: the next task parked
        behind it found them there)."""

        def lost_for(tag: str) -> bool | None:  # (None: cannot tell)
            remembered = self._lives.get(tag)
            if remembered is None or tag not in lives:
                return None
            life = lives[tag]
            if life is None:
                return tag not in known
            return life != remembered and not life.endswith(KEPT_LIFE)

        gone = {
            tag: count
            for tag, count in self._known.items()
            if (lost_for(tag) is not False if whole else lost_for(tag) is True)
        }
        lost = sum(gone.values())
        if not lost:
            return 0
        ago, held = now - (self._counted_at or now), self._held(gone)
        if len(gone) == len(self._known) and whole:
            logger.error(
                "celery-breaker releaser: the breaker store lost its parked tasks (restarted without its data, "
                "or flushed): %d task(s) were parked %.0f s before (%s); they will not run. Keep parking in a store "
                "at least as durable as the broker (docs/brokers.md)",
                lost, ago, held,
                extra={"breaker_parked_lost": lost},
            )  # fmt: skip
        else:
            logger.error(
                "celery-breaker releaser: the breaker store lost the tasks parked behind %d breaker(s) (their keys "
                "went: a Cluster node restarted without its data, a failover that lost writes, or deleted or evicted "
                "keys): %d task(s) were parked %.0f s before (%s); they will not run; the other breakers' are kept. "
                "Keep parking in a store at least as durable as the broker (docs/brokers.md)",
                len(gone), lost, ago, held,
                extra={"breaker_parked_lost": lost},
            )  # fmt: skip
        return lost

    def _held(self, known: dict[str, int]) -> str:
        """``crm[t-1]: 7, crm[t-2]: 3`` for a log line: at most ``NAMED_IN_LOG`` breakers,
        those with the most tasks first, then how many more."""
        labelled = sorted((-count, shown_label(self.parking.label(tag))) for tag, count in known.items())
        held = ", ".join(f"{label}: {-count}" for count, label in labelled[:NAMED_IN_LOG])
        more = len(labelled) - NAMED_IN_LOG
        return held + (f", and {more} more breakers" if more > 0 else "")
