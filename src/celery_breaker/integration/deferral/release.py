"""Releasing parked tasks (``parking.py``) in order, at a pace, when their breakers let them run.

Each worker runs one ``Releaser`` thread (in its main process, after the pool has forked) that asks
the store, every ``TICK`` seconds and for every breaker with parked tasks, which may run
now (see ``storage/lua/release.lua``): the probes when the breaker may half-open (none for a
breaker with a health check, whose check runs here instead: ``health_gate.py``), then,
once it has closed, the rest oldest first, at the adaptive pace (``core/pacing.py``:
from a few per second, growing while the released tasks succeed, cut back on failures
and slow calls; decided in the store, so shared by every worker) or, with
``breaker_release_pace="fixed"``, at a ramp (``breaker_release_rate`` tasks per second
cluster-wide, reached after ``breaker_release_ramp`` seconds). Released
tasks are published again exactly as they were; one that meets an open breaker again
is parked again, keeping its place.

The releaser also watches for a store that lost its parked tasks (restarted without
persistence, or flushed): every ``WATCH_EVERY`` seconds it counts them and reads the
parking's epoch (``Parking.epoch``); an epoch that changed or vanished while tasks were
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

import bisect
import collections
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kombu.serialization import prepare_accept_content

from ...core.pacing import PacingLaw
from ...errors import StorageError
from ...health import CheckAbandoned, abandon_checks_on, abandon_pending_checks
from ...labels import shown_label
from ...storage import Parking
from ...storage.contract import KEPT_LIFE
from ..broker import AMQP, broker_kind
from ..throttle import Throttle
from . import confirms
from .confirms import Confirm, ConfirmingPublisher, Send
from .health_gate import HealthGate
from .parking import NeedsCode, NewerFormat, NotAcceptedHere, read_parked

__all__ = [
    "LEASE", "LIST_EVERY", "LOOKOUT_GRACE", "LOOKOUT_LEASE", "MOST_PER_TICK", "NAMED_IN_LOG", "QUIET_AT_MOST",
    "QUIET_HEARD_AT_MOST", "TAG_COMPLAINT_EVERY", "TICK", "WATCH_EVERY", "Releaser",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

#: Set while this thread publishes a parked task again (``Releaser._publish``).
_RELEASING = threading.local()


class _ExpiredOnPurpose(logging.Filter):
    """Drops Celery's WARNING that a task "has an expiration date in the past" when the
    releaser publishes it: a parked task is released at its expiry on purpose, so that
    the worker revokes it as Celery does any expired task (``task_revoked``, REVOKED)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(_RELEASING, "on", False) and "has an expiration date in the past" in str(record.msg))


_EXPIRED_ON_PURPOSE = _ExpiredOnPurpose()
logging.getLogger("celery.app.base").addFilter(_EXPIRED_ON_PURPOSE)  # (once: addFilter keeps one of each)

#: Seconds between two looks at the parked tasks.
TICK = 0.2
#: Seconds a claimed entry may take to be published before it is released again.
LEASE = 30.0
#: Most entries one breaker releases per tick (the pace decides, this only bounds a tick).
MOST_PER_TICK = 500
#: Most seconds a breaker whose tasks cannot come due (OPEN, FORCED_OPEN: ``Claimed.quiet``)
#: goes unasked: an operator who closes or resets it sees its tasks released within this.
QUIET_AT_MOST = 5.0
#: The same while this process hears the store's transitions (``Releaser.listen``): a
#: transition of a quiet breaker (a close by hand, a reset, a delete) wakes it at once.
QUIET_HEARD_AT_MOST = 60.0
#: Most seconds between two listings of the breakers with parked tasks (sooner when their
#: number changes): a breaker that parked its first task waits at most this for its release.
LIST_EVERY = 1.0
#: Seconds between two counts of the parked tasks (to notice, and report, a store that lost them).
WATCH_EVERY = 1.0
#: Seconds the lookout (the turn to count them, one releaser's at a time) lasts unless its
#: holder renews it: how long a worker that died with it leaves the parking unwatched.
LOOKOUT_LEASE = 10.0
#: Seconds a releaser that saw another hold the lookout waits, once it finds it free, before
#: taking it: its last holder, which asks every ``WATCH_EVERY`` unless a pass of its loop
#: takes longer (a health check, a RabbitMQ confirm: up to 10 s each), takes it back first.
LOOKOUT_GRACE = 10.0
#: Seconds between two warnings about one breaker whose parked tasks cannot be released.
TAG_COMPLAINT_EVERY = 60.0
#: A breaker whose parking could not be reached (its Cluster node down) is asked again
#: after this many seconds, doubled at each failure up to ``UNREACHABLE_MOST``: a node
#: that does not answer costs a socket timeout per breaker, and held every other
#: breaker's release to a crawl. A pass also stops asking others this many seconds
#: after one could not be reached (the rest are asked in the next passes).
UNREACHABLE_FIRST = 0.5
UNREACHABLE_MOST = 5.0
#: Breakers a log line about parked tasks names, those with the most first (an outage that
#: tripped 20,000 per-key breakers made one INFO line of 390,000 characters).
NAMED_IN_LOG = 10


class Releaser(threading.Thread):
    """Publishes parked tasks again when their breakers let them run (one per worker)."""

    def __init__(
        self,
        app: Any,
        parking: Parking,
        *,
        rate: float | None,
        ramp: float,
        law: PacingLaw | None = None,
        tick: float = TICK,
        backlog: Callable[[], int | None] | None = None,
    ) -> None:
        super().__init__(name="celery-breaker releaser", daemon=True)
        self.app = app
        self.parking = parking
        #: The content types the app accepts: a parked pickle, msgpack or yaml task decodes
        #: only when the app accepts it (kombu refuses those by default).
        self.accept = prepare_accept_content(app.conf.accept_content)  # type: ignore[no-untyped-call]
        if law is None and rate is None:
            raise ValueError("Releaser: the fixed pace needs a rate (or give an adaptive law)")
        #: The fixed pace (tasks per second), or the adaptive pace's ceiling (``None``: none).
        self.rate = rate
        self.ramp = ramp
        #: The adaptive release's law; ``None``: the fixed pace.
        self.law = law
        self.tick = tick
        #: How many tasks this worker's pool will take this pass (``WorkerBacklog.room``;
        #: ``None``: no bound): the adaptive release publishes no more, which would only
        #: queue in the broker. ``None``: never asked (not in a worker).
        self.backlog = backlog
        #: Passes held back by the worker's backlog (``backlog``), and passes it bounded.
        self.held_back = 0
        self.bounded = 0
        self._holding = False
        #: The last breaker a bounded pass released at the pace: the next bounded pass
        #: starts with the one listed after it (``release_once``).
        self._last_paced: str | None = None
        self.released = 0
        self._stop_event = threading.Event()
        self._failing_since: float | None = None
        # What the last count saw: the parking's epoch, each breaker's parked and claimed
        # tasks, and when (monotonic seconds).
        self._epoch: str | None = None
        self._eviction_checked = False
        self._known: dict[str, int] = {}
        self._lives: dict[str, str | None] = {}  # by tag with tasks parked: its parking's life
        self._counted_at: float | None = None
        #: This releaser's name for the lookout (``keep_lookout``): unique per thread and process.
        self._lookout_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._had_lookout = False  # held at the last ask
        self._saw_holder = False  # another held it at some ask: a free one is taken only after the grace
        self._free_since: float | None = None  # when it was first found free since
        self._tag_failures = Throttle(TAG_COMPLAINT_EVERY)  # by tag: when it was last reported
        self._refusals = Throttle(TAG_COMPLAINT_EVERY)  # by tag: a message not accepted here
        #: Breakers with a health check release nothing (no real task is a probe) until it closes them.
        self.health_gate = HealthGate(app)
        #: On RabbitMQ, parked tasks are published with publisher confirms, over a
        #: connection of the releaser's own (``_publish_confirmed``).
        self._publisher = ConfirmingPublisher() if broker_kind(app.conf) == AMQP else None
        self._nacks = Throttle(TAG_COMPLAINT_EVERY)  # RabbitMQ's refusals: one WARNING a minute
        #: By tag: entries published whose ``done`` the store did not take (it failed
        #: meanwhile), forgotten before that breaker's next claim (``_release_tag``).
        self._undone: dict[str, list[str]] = {}
        #: By tag: the monotonic time before which its breaker is not asked again (nothing of
        #: it can come due before then: ``Claimed.quiet``, at most ``QUIET_AT_MOST`` ahead),
        #: and the store's hearing epoch it counts on (``QUIET_HEARD_AT_MOST`` ahead: honoured
        #: only while transitions are heard in that epoch; ``None``: the short wait, always).
        #: 2,000 per-key breakers held OPEN were asked every tick, 1.1 s a pass and ~0.4 s
        #: of Redis CPU per pass, per worker.
        self._quiet_until: dict[str, tuple[float, int | None]] = {}
        #: The last listing (``_listing``): when (monotonic seconds), the index's size then, the tags.
        self._listed: tuple[float, int, list[str]] | None = None
        #: By tag: when its parking may be asked again after it could not be reached, and
        #: the wait that set it (``UNREACHABLE_FIRST``, doubling).
        self._unreachable: dict[str, tuple[float, float]] = {}
        self._lookout_failures = Throttle(TAG_COMPLAINT_EVERY)  # (also the index's, and unreached breakers')
        #: Tags whose breaker moved, as heard from the store (``listen``): quiet no more.
        self._woken: collections.deque[str] = collections.deque()
        #: What stops hearing the store's transitions (``listen``); ``None``: not hearing them.
        self._unlisten: Callable[[], None] | None = None

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the releaser to stop and wait up to ``timeout`` seconds for it."""
        self._stop_event.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout)

    terminate = stop  # (the worker's bootstep calls either)

    def listen(self) -> None:
        """Hear the store's transitions (``Parking.watch``): a quiet breaker that moves (a
        close by hand, a reset, a delete) is asked again at the next tick, and quiet ones
        may then wait up to ``QUIET_HEARD_AT_MOST``. ``run`` starts with it."""
        if self._unlisten is None:
            self._unlisten = self.parking.watch(self._woken.append)

    def run(self) -> None:
        self.listen()
        try:
            with abandon_checks_on(self._stop_event):  # (a check running at shutdown frees its probe slot)
                self._loop()
        finally:
            # Checks this releaser stopped waiting for (``HealthGate``) give no verdict: their
            # probe slots are freed now, not when their leases run out after the worker left.
            abandon_pending_checks(self._stop_event)
            if self._unlisten is not None:  # (the store's agent need not run for this thread any more)
                self._unlisten()
                self._unlisten = None
            if self._had_lookout:  # (given up, another releaser takes it at once, not a lease and a grace later)
                try:
                    self.parking.stand_down(self._lookout_id, LOOKOUT_LEASE)
                except Exception as exc:  # (a store gone at shutdown: the lease runs out instead)
                    logger.debug("celery-breaker releaser: could not give up the lookout: %s", exc)
            if self._publisher is not None:  # (RabbitMQ's confirming connections: closed with the thread)
                self._publisher.close_all()

    def _loop(self) -> None:
        while not self._stop_event.wait(self.tick):
            try:
                if not self._eviction_checked:
                    self.check_eviction()
                now = time.monotonic()
                if self._counted_at is None or now - self._counted_at >= WATCH_EVERY:
                    self._keep_lookout_apart(now)
                self.release_once()
                if self._failing_since is not None:
                    logger.info("celery-breaker releaser: the store answers again")
                    self._failing_since = None
            except StorageError as exc:
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                    logger.warning("celery-breaker releaser: %s; parked tasks wait until it answers", exc)
            except Exception:  # the thread must outlive anything it meets
                logger.exception("celery-breaker releaser: unexpected error; trying again")

    def _keep_lookout_apart(self, now: float) -> None:
        """``keep_lookout``, whose failure stops no release: the lookout and the parking's
        epoch live on a slot each, and a Cluster node holding one of them down held back
        every breaker the other nodes serve. Tried again after ``WATCH_EVERY``."""
        try:
            self.keep_lookout(now)
        except StorageError as exc:
            self._counted_at = now
            if self._lookout_failures.due("lookout") is not None:
                logger.warning(
                    "celery-breaker releaser: cannot watch the parking for lost tasks (%s); parked tasks are "
                    "released as usual meanwhile", exc,
                )  # fmt: skip
        else:
            self._lookout_failures.forget("lookout")

    def release_once(self) -> int:
        """One pass over every breaker with parked tasks; return how many were published.

        One breaker whose parking cannot be read (a key the store could not repair, say),
        or that fails in any other way, is reported (``TAG_COMPLAINT_EVERY``) and
        skipped: the others are released as usual. A store that cannot even list them
        raises ``StorageError``."""
        published = 0
        most = MOST_PER_TICK if self.rate is None else max(1, min(MOST_PER_TICK, int(self.rate * self.tick * 4) + 1))
        now = time.monotonic()
        tags, unlisted = self._listing(now)
        tags += [tag for tag in self._undone if tag not in tags]  # (their published entries are still claimed)
        woken = set()
        while self._woken:
            woken.add(self._woken.popleft())
        hearing = self.parking.hearing() if self._unlisten is not None else None
        quiet_until, self._quiet_until = self._quiet_until, {}
        self.health_gate.begin_pass()
        room = self._room()
        if room is not None and self._last_paced is not None:
            # Shared by the breakers in turn: a pass starts after the last breaker that got
            # some (by name, not by place: with open breakers listed between them, or a
            # listing that changed, the same one took a small room on almost every pass).
            tags.sort()
            after = bisect.bisect_right(tags, self._last_paced)
            tags = tags[after:] + tags[:after]
        unreached: list[tuple[str, StorageError]] = []
        give_up_at = math.inf  # (set by the first unreachable one: UNREACHABLE_FIRST more of trying)
        for tag in tags:
            if self._stop_event.is_set():
                break
            if self._still_quiet(tag, quiet_until.get(tag), now, hearing, woken):
                self._quiet_until[tag] = quiet_until[tag]  # (nothing of it can come due yet: not asked)
                continue
            away = self._unreachable.get(tag)
            if (away is not None and now < away[0]) or (unreached and time.monotonic() >= give_up_at):
                continue  # (its node could not be reached, or another's costs this pass too much: later)
            try:
                # (room bounds what the pace lets go. Held back, room 0: probes and tasks
                # past their deadline still go, a breaker's health check still runs, and
                # what must be forgotten is; the paced tasks wait for room)
                sent = self._release_tag(tag, most, None if room is None else max(0, room))
                published += sent
                if room is not None:
                    room -= sent  # (probes and expired tasks too: they take slots as well)
                    if sent:
                        self._last_paced = tag
            except CheckAbandoned:
                break  # (stopping: the check's slot is freed, nothing of this breaker was claimed)
            except StorageError as exc:  # (its node cannot be reached: the others' are released)
                failed_at = time.monotonic()
                wait = UNREACHABLE_FIRST if away is None else min(UNREACHABLE_MOST, 2 * away[1])
                self._unreachable[tag] = (failed_at + wait, wait)
                if not unreached:
                    give_up_at = failed_at + UNREACHABLE_FIRST
                unreached.append((tag, exc))
            except Exception as exc:  # (one breaker's trouble, whatever it is, stops no other's)
                self._unreachable.pop(tag, None)
                self._tag_failed(tag, exc)
            else:
                self._unreachable.pop(tag, None)
                self._tag_failures.forget(tag)
        if unlisted is not None and all(tag in self._unreachable for tag in tags):
            raise unlisted  # (nothing answers: the store is down, said once by the loop)
        if self._unreachable and unlisted is None:  # (breakers no longer listed: forgotten)
            listed = set(tags)
            for tag in [tag for tag in self._unreachable if tag not in listed]:
                del self._unreachable[tag]
        self._unreached_now(unreached, unlisted)
        self.released += published
        return published

    def _unreached_now(self, unreached: list[tuple[str, StorageError]], unlisted: StorageError | None) -> None:
        """Say (once a ``TAG_COMPLAINT_EVERY``) that the store answers for some breakers
        only: its index, or some breakers' parkings, cannot be reached (a Cluster node
        down); one line for them all, however many."""
        if unlisted is not None and self._lookout_failures.due("index") is not None:
            logger.warning(
                "celery-breaker releaser: cannot read the parking's index (%s); the breakers it listed last are "
                "released meanwhile (tasks parked behind others wait for it)", unlisted,
            )  # fmt: skip
        if unreached and self._lookout_failures.due("unreached") is not None:
            names = self._held(dict.fromkeys((tag for tag, _ in unreached), 1)).replace(": 1", "")
            logger.warning(
                "celery-breaker releaser: cannot reach the tasks parked behind %d breaker(s) (%s): %s; the others "
                "are released as usual, and these are asked again after up to %g s",
                len(unreached), names, unreached[0][1], UNREACHABLE_MOST,
            )  # fmt: skip
        if unlisted is None:
            self._lookout_failures.forget("index")

    def _listing(self, now: float) -> tuple[list[str], StorageError | None]:
        """The breakers with parked tasks (``Parking.tags``): listed again every
        ``LIST_EVERY`` seconds, and at once when the index's size changed
        (``Parking.index_size``, one cheap command). Listing 2,000 breakers every tick
        cost Redis more than all else a releaser of quiet breakers did, per worker.

        While the index cannot be read (its Cluster node down), the last listing, with
        the error: the breakers the other nodes serve are released meanwhile (one parked
        since then waits for the index). Without a listing yet, the error is raised."""
        try:
            size = self.parking.index_size()
            if self._listed is None or size != self._listed[1] or now - self._listed[0] >= LIST_EVERY:
                self._listed = (now, size, self.parking.tags())
        except StorageError as exc:
            if self._listed is None:
                raise
            return list(self._listed[2]), exc
        return list(self._listed[2]), None

    def _still_quiet(
        self, tag: str, quiet: tuple[float, int | None] | None, now: float, hearing: int | None, woken: set[str]
    ) -> bool:
        """Whether ``tag``'s breaker need not be asked now: its quiet runs on, counted on a
        hearing epoch that still holds (if any), and nothing woke it."""
        if quiet is None or now >= quiet[0] or tag in woken or tag in self._undone:
            return False
        return quiet[1] is None or quiet[1] == hearing

    def _room(self) -> int | None:
        """The most this pass may publish at the pace (``None``: what the pace allows):
        for the adaptive release, what this worker's pool will take (``backlog``). At 0
        only probes and tasks past their deadline go (a breaker whose worker pools were
        all busy with other tasks got no probe, and never closed), health checks still
        run, and what must be forgotten is. Said at DEBUG when a hold starts and ends."""
        if self.law is None or self.backlog is None:
            return None
        try:
            room = self.backlog()
        except Exception as exc:  # (Celery's worker state read another way: release as before)
            logger.debug("celery-breaker releaser: could not read the worker's own backlog (%s)", exc)
            room = None
        held = room is not None and room <= 0
        if held != self._holding:
            self._holding = held
            logger.debug(
                "celery-breaker releaser: %s",
                "this worker's pool takes no more now (tasks wait in it, or its slots run long calls): "
                "only probes and tasks past their deadline are released until it has room"
                if held else "this worker's pool has room again: releasing at the pace",
            )  # fmt: skip
        if held:
            self.held_back += 1
        elif room is not None:
            self.bounded += 1
        return room

    def _release_tag(self, tag: str, most: int, paced: int | None = None) -> int:
        undone = self._undone.get(tag)
        if undone:
            # Published by an earlier tick whose ``done`` failed (the store went away just
            # then): forgotten first, before their lease runs out and a claim takes them
            # again, which published each a second time. Until the store takes it, this
            # breaker claims nothing more.
            self.parking.done(tag, undone)
            del self._undone[tag]
        if self.health_gate.holds(self.parking.label(tag)):
            return 0
        pace = 0.0 if self.rate is None else self.rate
        # (heard throughout the call, in one epoch: no transition of it can have been missed)
        heard = self.parking.hearing() if self._unlisten is not None else None
        claimed = self.parking.release(
            tag, most=most, pace=pace, ramp=self.ramp, lease=LEASE, law=self.law, paced=paced
        )
        quiet = claimed.quiet
        if quiet is None or quiet > 0:
            hearing = self.parking.hearing() if heard is not None else None
            if hearing != heard:
                hearing = None
            longest = QUIET_AT_MOST if hearing is None else QUIET_HEARD_AT_MOST
            self._quiet_until[tag] = (time.monotonic() + (longest if quiet is None else min(quiet, longest)), hearing)
        done = self._publish(tag, claimed)
        try:
            self.parking.done(tag, done)
        except Exception:
            if done:
                self._undone[tag] = done  # (published: forgotten at the next tick, not published again)
            raise
        if not claimed:
            self.parking.forget(tag)
        return len(done)

    def _unpublishable(self, tag: str, entry: str, exc: BaseException) -> bool:
        """Whether ``entry`` can never be published (``_never_publishable``): then it is
        dropped, with an ERROR naming it, its breaker and the reason. Left claimed, it was
        claimed again after every lease (30 s) for ever, a WARNING each time, and its
        breaker's parked count never went to 0."""
        if not _never_publishable(exc):
            return False
        logger.error(
            "celery-breaker releaser: dropped parked entry %s of %s: it can never be published (%s: %s); a writer "
            "of another app or release parked it with arguments or options Celery refuses",
            entry, shown_label(self.parking.label(tag)), type(exc).__name__, exc,
        )  # fmt: skip
        return True

    def _not_accepted(self, tag: str, entry: str, exc: NotAcceptedHere) -> None:
        if self._refusals.due(tag) is not None:
            if isinstance(exc, NewerFormat):
                advice = "Upgrade this worker: until then, workers of the newer release release it"
            else:
                who = (
                    "that has that code releases it: deploy it to every worker"
                    if isinstance(exc, NeedsCode)
                    else "whose accept_content takes it releases it"
                )
                advice = f"A worker {who}; a worker of another app sharing this store's key_prefix should use its own"
            logger.warning(
                "celery-breaker releaser: left %s of %s parked: %s. %s",
                entry, shown_label(self.parking.label(tag)), exc, advice,
            )  # fmt: skip

    def _tag_failed(self, tag: str, exc: Exception) -> None:
        if self._tag_failures.due(tag) is not None:
            logger.warning(
                "celery-breaker releaser: cannot release the tasks parked behind %s (%s); the other breakers' "
                "are released as usual, and it is tried again (every tick, or after up to 5 s while its store "
                "cannot be reached)",
                shown_label(self.parking.label(tag)), exc,
            )  # fmt: skip

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

    def _publish(self, tag: str, claimed: list[tuple[str, str]]) -> list[str]:
        """Publish the claimed entries again; return those to forget: published (on RabbitMQ:
        confirmed), or never publishable. The others stay claimed, and are released again
        after their lease."""
        done: list[str] = []
        ready: list[tuple[str, Any, dict[str, Any]]] = []  # (entry, signature, publish options)
        for entry, payload in claimed:
            try:
                signature, serializer = read_parked(payload, self.accept)
            except NotAcceptedHere as exc:
                # Another app or worker on this store parked it, in a serializer this one does
                # not accept: left claimed, its lease puts it back for a worker that does.
                self._not_accepted(tag, entry, exc)
                continue
            except ValueError as exc:
                # Never publishable: dropping it is the only way forward; say so loudly.
                logger.error("celery-breaker releaser: dropped parked entry %s of %s: %s", entry, tag, exc)
                done.append(entry)
                continue
            try:
                made = self.app.signature(signature)
            except Exception as exc:  # (left claimed, as a publish that failed: the others go on)
                if self._unpublishable(tag, entry, exc):
                    done.append(entry)
                else:
                    _not_published(entry, exc)
                continue
            # (in the serializer it was parked in: its arguments may take no other)
            ready.append((entry, made, {"serializer": serializer} if serializer else {}))
        _RELEASING.on = True
        try:
            if self._publisher is not None:
                done += self._publish_confirmed(tag, ready)
                return done
            for entry, signature, options in ready:
                try:
                    signature.apply_async(**options)
                except Exception as exc:
                    if self._unpublishable(tag, entry, exc):
                        done.append(entry)
                    else:  # (left claimed: the lease runs out and it is released again)
                        _not_published(entry, exc)
                else:
                    done.append(entry)
        finally:
            _RELEASING.on = False
        return done

    def _publish_confirmed(self, tag: str, ready: list[tuple[str, Any, dict[str, Any]]]) -> list[str]:
        """Publish on RabbitMQ with publisher confirms (``ConfirmingPublisher``); return the
        entries RabbitMQ took.

        Published as Celery publishes, without confirms, a message RabbitMQ refused (a full
        queue whose ``x-overflow`` is ``reject-publish``, a user who may not write to the
        exchange) raised nothing: the entry was forgotten and the task lost. A refusal now
        leaves it claimed (released again after the lease). A confirm that does not come
        within ``CONFIRM_TIMEOUT`` (RabbitMQ blocks publishers under a memory or disk
        alarm, or the peer is gone) leaves the unconfirmed ones claimed, and the rest of
        the claim waits: they may run twice (a copy is routed when the alarm clears),
        never not at all."""

        def send(signature: Any, options: dict[str, Any]) -> Send:
            return lambda producer: signature.apply_async(producer=producer, retry=False, **options)

        assert self._publisher is not None
        published = self._publisher.publish(self.app, [send(signature, options) for _, signature, options in ready])
        confirmed = []
        for index, exc in list(published.errors.items()):
            entry = ready[index][0]
            if published.results[index] is not Confirm.CONFIRMED and self._unpublishable(tag, entry, exc):
                confirmed.append(entry)  # (forgotten, as a task published is)
                del published.errors[index]
        refused = unconfirmed = 0
        for (entry, _, _), result in zip(ready, published.results, strict=True):
            if result is Confirm.CONFIRMED:
                confirmed.append(entry)
            elif result is Confirm.REFUSED:
                refused += 1
            elif result is Confirm.UNCONFIRMED:
                unconfirmed += 1
        for index, exc in published.errors.items():
            _not_published(ready[index][0], exc)
        if refused:
            quiet = self._nacks.due("")
            logger.log(
                logging.DEBUG if quiet is None else logging.WARNING,
                "celery-breaker releaser: RabbitMQ refused %d parked task(s) (a full queue that rejects publishes?); "
                "they stay parked, and are released again after their lease (logged at most once a minute; %d "
                "more refused since the last time, at DEBUG)",
                refused, quiet or 0,
            )  # fmt: skip
        if published.error is not None:
            if published.stopped_by_timeout:
                logger.warning(
                    "celery-breaker releaser: RabbitMQ did not confirm %d released task(s) within %g s%s; they stay "
                    "parked, and are released again after their lease (they may run twice)",
                    unconfirmed, confirms.CONFIRM_TIMEOUT, " (it blocks publishers)" if published.blocked else "",
                )  # fmt: skip
            else:
                logger.warning(
                    "celery-breaker releaser: could not publish to RabbitMQ (%r); %d task(s) stay parked, and are "
                    "released again after their lease",
                    published.error, len(ready) - len(confirmed),
                )  # fmt: skip
        return confirmed


def _never_publishable(exc: BaseException) -> bool:
    """Whether a publish failed on the task's own data, as no retry can mend: Celery
    raises ``TypeError`` for arguments that are no list, keyword arguments that are no
    mapping, options that are no mapping or a queue that is no name (an entry another
    writer parked). A broker or network failure is never one: those raise kombu's,
    redis-py's and the socket's own errors, and the entry is released again."""
    return isinstance(exc, TypeError)


def _not_published(entry: str, exc: BaseException) -> None:
    """Say that ``entry`` could not be published: left claimed, it is released again after its lease."""
    logger.warning("celery-breaker releaser: could not publish %s (%r); it stays parked", entry, exc)
