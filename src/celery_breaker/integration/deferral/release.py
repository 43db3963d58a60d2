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

The releaser also watches for a store that lost its parked tasks: ``release_watch.py``. It
publishes what it claimed as ``release_publish.py`` does.
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
from ...storage.masking import MaskedText
from ..broker import AMQP, broker_kind
from ..throttle import Throttle
from .confirms import ConfirmingPublisher
from .health_gate import HealthGate
from .release_publish import Republishing
from .release_watch import LOOKOUT_GRACE, LOOKOUT_LEASE, NAMED_IN_LOG, ParkingWatch

__all__ = [
    "LEASE", "LIST_EVERY", "LOOKOUT_GRACE", "LOOKOUT_LEASE", "MOST_PER_TICK", "NAMED_IN_LOG", "QUIET_AT_MOST",
    "QUIET_HEARD_AT_MOST", "TAG_COMPLAINT_EVERY", "TICK", "WATCH_EVERY", "Releaser",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

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
#: Seconds between two warnings about one breaker whose parked tasks cannot be released.
TAG_COMPLAINT_EVERY = 60.0
#: A breaker whose parking could not be reached (its Cluster node down) is asked again
#: after this many seconds, doubled at each failure up to ``UNREACHABLE_MOST``: a node
#: that does not answer costs a socket timeout per breaker, and held every other
#: breaker's release to a crawl. A pass also stops asking others this many seconds
#: after one could not be reached (the rest are asked in the next passes).
UNREACHABLE_FIRST = 0.5
UNREACHABLE_MOST = 5.0


class Releaser(ParkingWatch, Republishing, threading.Thread):
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
                    logger.debug("celery-breaker releaser: could not give up the lookout: %s", MaskedText(exc))
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
                    logger.warning("celery-breaker releaser: %s; parked tasks wait until it answers", MaskedText(exc))
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
                    "released as usual meanwhile", MaskedText(exc),
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
            logger.debug("celery-breaker releaser: could not read the worker's own backlog (%s)", MaskedText(exc))
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

    def _tag_failed(self, tag: str, exc: Exception) -> None:
        if self._tag_failures.due(tag) is not None:
            logger.warning(
                "celery-breaker releaser: cannot release the tasks parked behind %s (%s); the other breakers' "
                "are released as usual, and it is tried again (every tick, or after up to 5 s while its store "
                "cannot be reached)",
                shown_label(self.parking.label(tag)), MaskedText(exc),
            )  # fmt: skip
