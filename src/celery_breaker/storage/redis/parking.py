"""Parked tasks: deferred messages kept in Redis, per breaker, until the breaker lets them run.

A deferred task held by a worker as a countdown (ETA) message costs ~8.8 KB of worker
RAM and is redelivered if held past the broker's ``visibility_timeout``; a parked one is
a hash field and a sorted-set member next to its breaker's keys (same hash tag), held by
nobody. Entries keep the order of their first deferral; each is claimed under a lease
before it is published again, and deleted only once published, so a releaser that dies
midway loses nothing (the entry is released again: a duplicate, never a loss).

What Redis holds is never trusted: a parking key of another type is replaced (its
entries that the messages hash still holds stay parked), values no script wrote are
repaired (``storage/lua/parked.lua``), and the index's members that name no breaker of
this store are dropped, each with one WARNING naming the breaker, the key and what was
wrong. So one bad breaker fails no call made for another.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis

from ...core.pacing import PacingLaw
from ...errors import StorageError
from ...labels import breaker_label, shown_label
from ..contract import KEPT_LIFE, Claimed, EvictionCheck, ReleasePace
from ..masking import MaskedText
from .client import CLIENT_ERRORS, is_cluster, node_of
from .damage import CHECK_TYPES, classify, failure, text
from .eviction import check_eviction
from .keys import breaker_of, breaker_tag, glob_escape

if TYPE_CHECKING:
    from .store import RedisStore

__all__ = ["LIFE_SUFFIX", "PARKING_SUFFIXES", "PURGE_CHUNK", "RedisParking"]

logger = logging.getLogger("celery_breaker")

#: queue (zset), messages (hash), claims (zset), deadlines (zset), pacing (hash)
PARKING_SUFFIXES = (":q", ":m", ":c", ":d", ":p")

#: One breaker's parking life (a string, next to its entries, in their slot): written with
#: its first entry, kept while entries are parked, given the idle TTL once it holds none.
#: A releaser that saw one life with entries parked and then sees another, or none, knows
#: the breaker's entries were lost with it (a Cluster node restarted empty, say, which the
#: parking's own epoch, on another node, cannot tell). park.lua writes it with the entry, in
#: one step; one written while the breaker already held entries ends in ``KEPT_LIFE``: the
#: old one went alone (deleted, evicted), its entries did not, and that is no loss.
LIFE_SUFFIX = ":e"

#: Entries one purge script call discards: bounded, so Redis is never blocked for long.
PURGE_CHUNK = 1000

#: The law ``pace.lua`` reads a stored pace under, as a release would (``pacing.lua``
#: ``read_pace``): every worker's is ``PacingLaw(ceiling=breaker_release_rate)``, and no
#: bound a pace is read within depends on the ceiling (``beyond_the_law``).
SHOWN_LAW = PacingLaw().text()

#: A member of the index that names no breaker, added when the index is built from the
#: parked entries and never removed: an index without it was deleted or evicted (or
#: predates it), and may miss breakers whose tasks are still parked.
WHOLE = b"~whole"


class RedisParking:
    """The parked tasks of every breaker in one Redis store (this process's view).

    Every method that takes a tag raises ``StorageError`` for that tag only when Redis
    cannot be reached or fails (or the tag names no breaker of this store); what a
    breaker's keys hold is repaired on the way.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.index = f"{store.quoted_prefix}:parked"
        """A set of the hash tags of breakers that may hold parked entries."""
        self.marker = f"{store.quoted_prefix}:parking"
        """A hash whose ``epoch`` names this parking's life: written with the first entry
        parked, gone when the store loses its data (restarted empty, flushed)."""
        self.lookout_key = f"{store.quoted_prefix}:parking:lookout"
        """Which releaser watches this parking for lost tasks now (``lookout``)."""

    def label(self, tag: str) -> str:
        """The breaker a tag belongs to, as people write it (``crm[tenant-7]``)."""
        found = breaker_of(tag, self.store.quoted_prefix)
        return tag if found is None else breaker_label(*found)

    def breaker(self, tag: str) -> tuple[str, str | None] | None:
        """The ``(name, key)`` of the breaker a tag belongs to (``None``: no breaker of this store)."""
        return breaker_of(tag, self.store.quoted_prefix)

    def tag(self, name: str, key: str | None) -> str:
        """The hash-tagged key stem of a breaker, ``{prefix:name[:key]}``, that its parking keys share."""
        return breaker_tag(self.store.quoted_prefix, name, key)

    # -- one breaker's entries -------------------------------------------------

    def park(self, name: str, key: str | None, entry: str, order: float, payload: str, deadline: float | None) -> int:
        """Keep ``payload`` (a task message) until released; return how many are parked."""
        tag = self.tag(name, key)
        doing = f"parking {entry}"

        life = tag + LIFE_SUFFIX

        def indexed(pipe: Any) -> tuple[Any, ...]:
            # A fresh epoch each time (HSETNX keeps the first): one kept by the process would
            # write the lost parking's epoch back after Redis restarted empty, and every
            # releaser that had read it would find nothing lost. The breaker's life must not
            # expire while it holds entries (``forget`` let it).
            return (
                pipe.sadd(self.index, tag), pipe.hsetnx(self.marker, "epoch", uuid.uuid4().hex), pipe.persist(life),
            )  # fmt: skip

        # Indexed before the entry is written (a park whose second round trip failed left
        # an entry no releaser looked for), and again after it (a releaser's ``forget``
        # may have dropped the tag in between, finding nothing parked yet).
        self._own_keys(doing, indexed)
        # (the breaker's life is written by park.lua, with the entry: see LIFE_SUFFIX)
        arguments = [entry, repr(order), payload, _opt(deadline), uuid.uuid4().hex, KEPT_LIFE]
        try:
            (count,) = self._script("park", tag, arguments, doing=doing, life=True)
        except StorageError as exc:
            if not isinstance(exc.__cause__, redis.TimeoutError):
                raise
            # The reply did not come in time: Redis may have parked it all the same. Asked
            # again (an entry is kept once), so that a park that took is not reported failed:
            # the caller would defer the task another way too, and it would run twice.
            (count,) = self._script("park", tag, arguments, doing=doing, life=True)
        # From here the entry is parked: raising would have the caller defer it another
        # way as well (a second copy). The index was written before it, and ``forget``
        # puts back a tag it dropped while the entry arrived; this is one more guard.
        try:
            self._own_keys(doing, indexed)
        except StorageError as exc:
            logger.warning("redis store %s: parked %s, then %s", self.store.label, entry, MaskedText(exc))
        return int(count)

    def release(
        self,
        tag: str,
        *,
        most: int,
        pace: float,
        ramp: float,
        lease: float,
        now: float | None = None,
        law: PacingLaw | None = None,
        paced: int | None = None,
    ) -> Claimed:
        """Claim what the breaker of ``tag`` lets run now (see release.lua): once it has
        closed, at the fixed ``pace`` reached after ``ramp``, or with ``law`` at the
        adaptive pace (``core/pacing.py``, shared by every caller; ``pace`` and ``ramp``
        are then unused), at most ``paced`` of them (``None``: ``most`` alone bounds
        them; probes and entries past their deadline are bounded by ``most`` only). The
        pace is kept the store's ``idle_ttl`` past the last release. ``now`` is for
        stores on the ``time=client`` test seam (the breaker's times are the caller's).

        Raises ``StorageError`` only for this tag: Redis failing (or ``tag`` naming no
        breaker of this store). A key of another type is replaced, unreadable values are
        repaired, an unreadable breaker state is reset (its entries then go at the
        closed breaker's pace, and every process hears of the reset), each with a
        WARNING; the next call works."""
        reply = self._script(
            "release", self._checked_tag(tag),
            [most, repr(pace), repr(ramp), repr(lease), "" if law is None else law.text(), self.store.channel,
             self.store.ttl_ms, "" if paced is None else max(0, paced)],
            doing=f"releasing {tag}", state=True, leases=True, now=now,
        )  # fmt: skip
        claimed = Claimed((text(reply[i]), text(reply[i + 1])) for i in range(1, len(reply) - 1, 2))
        quiet = text(reply[0]) if reply else "0"
        claimed.quiet = None if quiet == "" else max(0.0, float(quiet))
        return claimed

    def watch(self, watcher: Callable[[str], object]) -> Callable[[], None] | None:
        """Tell ``watcher`` the tag of each breaker whose transition this process hears
        (the store's transitions channel: a breaker's state hash is its tag + ``:s``);
        return what stops it."""

        def tell(state_key: str) -> None:
            if state_key.endswith(":s"):
                watcher(state_key[:-2])

        store = self.store
        store.watch(tell)
        return lambda: store.unwatch(tell)

    def hearing(self) -> int | None:
        """The store's ``epoch`` while this process hears every transition, else ``None``."""
        store = self.store
        epoch = store.epoch
        return epoch if store.live and store.settled else None

    def pace(self, tag: str) -> dict[str, str]:
        """The pacing hash of breaker ``tag`` as stored (field -> value): the adaptive
        release's ``rate``, ``thr``eshold and the rest (``storage/lua/pacing.lua``), or
        the fixed ramp's. For operators and tests; nothing decides on it."""
        (found,) = self._commands(tag, "reading the release pace", lambda pipe: (pipe.hgetall(tag + ":p"),))
        return {text(field): text(value) for field, value in found.items()}

    def release_paces(self, tags: list[str], now: float | None = None) -> dict[str, ReleasePace]:
        """The adaptive pace under way for each of ``tags`` (``pace.lua``, read only: one
        pipelined round trip, one by one on a Cluster): begun under its breaker's generation now
        and used by a release within the last few seconds. A breaker without one is left
        out; so is one whose pace the next release restarts (a field unreadable, or beyond
        what the law writes: read as ``release`` reads it, ``SHOWN_LAW``), silently, and one
        whose keys hold another type, with a WARNING (``release`` repairs them). Raises
        ``StorageError`` only when Redis cannot be reached or fails. ``now`` is for stores
        on the ``time=client`` test seam, as in ``release``."""
        if not tags:
            return {}
        now_arg = _opt(now) if self.store.client_time else ""
        args = [now_arg, SHOWN_LAW]
        replies = self.store.run_many("pace", [([tag + ":p", tag + ":s"], args) for tag in tags])
        found: dict[str, ReleasePace] = {}
        for tag, reply in zip(tags, replies, strict=True):
            if isinstance(reply, StorageError):
                logger.warning("redis store %s: left %s's release pace out: %s", self.store.label,
                               shown_label(self.label(tag)), reply.__cause__ or reply)  # fmt: skip
            elif len(reply) == 5:  # (else { '' }: no pace under way)
                generation, rate, limit, held, usual = (text(value) for value in reply)
                found[tag] = ReleasePace(
                    generation=int(generation), rate=float(rate), limit=float(limit) if limit else None,
                    held_for=float(held) if held else None, usual_bad_share=float(usual) if usual else None,
                )  # fmt: skip
        return found

    def done(self, tag: str, entries: list[str]) -> None:
        """Forget entries that were published again; one parked again since it was
        claimed keeps its new message (``done.lua``)."""
        if not entries:
            return
        self._script("done", tag, entries, doing="forgetting released entries")

    def purge(self, tag: str) -> int:
        """Discard as many entries of breaker ``tag`` as were parked when the call began,
        oldest first, in chunks of ``PURGE_CHUNK``; return how many. Claimed entries
        (being published) are kept."""
        wanted = self.count(tag)[0]
        discarded = 0
        while discarded < wanted:
            (removed,) = self._script("purge", tag, [min(PURGE_CHUNK, wanted - discarded)], doing=f"purging {tag}")
            if not int(removed):
                break
            discarded += int(removed)
        return discarded

    def count(self, tag: str) -> tuple[int, int]:
        """(parked, claimed and not yet published) entries of one breaker."""
        parked, claimed = self._commands(
            tag, "counting parked entries", lambda pipe: (pipe.zcard(tag + ":q"), pipe.zcard(tag + ":c"))
        )
        return int(parked), int(claimed)

    def forget(self, tag: str) -> None:
        """Drop ``tag`` from the index if it holds nothing (re-adding it if an entry arrived
        meanwhile); its life (``LIFE_SUFFIX``) then lives the idle TTL."""
        client = self.store.client()
        held = (tag + ":q", tag + ":c", tag + ":m")  # (messages alone: the next release queues them again)
        life, idle_ms = tag + LIFE_SUFFIX, int(self.store.ttl_ms)
        try:
            if client.exists(*held):
                return
            self._own_keys(
                "updating the parked index", lambda pipe: (pipe.srem(self.index, tag), pipe.pexpire(life, idle_ms))
            )
            if client.exists(*held):  # parked between the check and the SREM
                self._own_keys(
                    "updating the parked index", lambda pipe: (pipe.sadd(self.index, tag), pipe.persist(life))
                )
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(self.store.label, "updating the parked index", exc)) from exc

    # -- every breaker ------------------------------------------------------------

    def tags(self) -> list[str]:
        """Hash tags of breakers that may hold parked entries. Members of the index that
        name no breaker of this store are dropped from it, with a WARNING, and since a
        foreign writer may have dropped ours too, the index is rebuilt from the parked
        entries (a SCAN). So is an index that lost its ``WHOLE`` member: deleted or
        evicted while entries stayed parked, it would name only breakers parked since,
        and leave the others' tasks parked for good (a WARNING names those it missed)."""
        doing = "listing parked breakers"
        (members,) = self._own_keys(doing, lambda pipe: (pipe.smembers(self.index),))
        tags, strays = set(), []
        for member in members:
            tag = text(member)
            if member == WHOLE:
                continue
            if breaker_of(tag, self.store.quoted_prefix) is None:
                strays.append(member)
            else:
                tags.add(tag)
        rebuilt: set[str] | None = None
        if WHOLE not in members:
            rebuilt, named = self._rebuild_index(doing)
            # (named: the index as the scan ended; a tag dropped by ``forget`` while its
            # first entry arrived is back in it by then, and was not lost)
            missed = sorted(rebuilt - tags - named)
            if missed:
                logger.warning(
                    "redis store %s: %s did not name %d breaker(s) with parked tasks (%s): it was deleted, evicted "
                    "or lost with its server's data; rebuilt it from the parked entries (run Redis with "
                    "maxmemory-policy noeviction)",
                    self.store.label, self.index, len(missed),
                    ", ".join(shown_label(self.label(tag)) for tag in missed[:5]),
                )  # fmt: skip
        if strays:
            logger.warning(
                "redis store %s: dropped %d member(s) of %s that name no breaker of this store (%s); rebuilt it "
                "from the parked entries",
                self.store.label, len(strays), self.index, ", ".join(repr(text(s))[:80] for s in strays[:5]),
            )  # fmt: skip
            self._own_keys("updating the parked index", lambda pipe: (pipe.srem(self.index, *strays),))
            if rebuilt is None:
                rebuilt, _ = self._rebuild_index(doing)
        return sorted(tags if rebuilt is None else tags | rebuilt)

    def index_size(self) -> int:
        """How many members the index has (one ``SCARD``): a change says what ``tags``
        lists changed; the same size may hide one breaker added and another dropped."""
        (found,) = self._own_keys("sizing the parked index", lambda pipe: (pipe.scard(self.index),))
        return int(found)

    def counts(self, tags: list[str]) -> dict[str, tuple[int, int]]:
        """``count`` for many breakers, in one round trip (a Cluster splits it per node).
        A breaker whose keys hold another type is repaired (``count``); one that still
        cannot be counted is left out, with a WARNING. On a Cluster, so are the breakers
        of a node that refuses while others answer (for about two seconds after it
        restarts empty, it answers SCAN but refuses its keys with CLUSTERDOWN: it failed
        every breaker's count, and with it every listing); if none answers, the error is
        raised, as it is on one server."""
        if not tags:
            return {}
        client = self.store.client()
        apart = is_cluster(client)
        try:
            pipe = client.pipeline(transaction=False)
            for tag in tags:
                pipe.zcard(tag + ":q")
                pipe.zcard(tag + ":c")
            found: list[Any] = pipe.execute(raise_on_error=False)
        except CLIENT_ERRORS as exc:
            if not apart:
                raise StorageError(failure(self.store.label, "counting parked entries", exc)) from exc
            found = [exc, exc] * len(tags)  # (each counted on its own below)
        counted: dict[str, tuple[int, int]] = {}
        refused: list[tuple[str, StorageError]] = []
        # A Cluster node that refused one breaker's count refuses the rest of its own: they
        # are left out without asking it again (each ask of a node that hangs waits out the
        # client's timeout, so a listing of many breakers took seconds per node to fail).
        refusing: dict[str | None, StorageError] = {}  # (None: a slot no node serves)
        for i, tag in enumerate(tags):
            parked, claimed = found[2 * i], found[2 * i + 1]
            if not isinstance(parked, Exception) and not isinstance(claimed, Exception):
                counted[tag] = (int(parked), int(claimed))
                continue
            node = node_of(client, tag + ":q") if apart else None
            if node in refusing:
                refused.append((tag, refusing[node]))
                continue
            try:
                counted[tag] = self.count(tag)  # (repairs it)
            except StorageError as exc:
                if classify(exc.__cause__) == "store":
                    if not apart:
                        raise
                    refused.append((tag, exc))
                    refusing[node] = exc
                    continue
                logger.warning("redis store %s: left %s out of the parked counts: %s", self.store.label,
                               shown_label(self.label(tag)), MaskedText(exc))  # fmt: skip
        if refused and not counted:
            raise refused[0][1]
        if refused:
            logger.warning(
                "redis store %s: could not count the tasks parked behind %d breaker(s) (%s): their cluster node "
                "refuses (%s); the others are counted",
                self.store.label, len(refused), ", ".join(shown_label(self.label(tag)) for tag, _ in refused[:5]),
                refused[0][1].__cause__ or refused[0][1],
            )  # fmt: skip
        return counted

    def lives(self, tags: list[str]) -> dict[str, str | None]:
        """Each breaker's parking life (``LIFE_SUFFIX``; ``None``: it has none), in one
        round trip (a Cluster splits it per node). A breaker whose life cannot be read (a
        key of another type) is left out. Raises ``StorageError`` only when Redis cannot
        be reached or fails."""
        if not tags:
            return {}
        try:
            pipe = self.store.client().pipeline(transaction=False)
            for tag in tags:
                pipe.get(tag + LIFE_SUFFIX)
            found = pipe.execute(raise_on_error=False)
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(self.store.label, "reading parked breakers' lives", exc)) from exc
        return {
            tag: None if life is None else text(life)
            for tag, life in zip(tags, found, strict=True)
            if not isinstance(life, Exception)
        }

    def epoch(self) -> str | None:
        """The current life of this parking (``None``: nothing was parked since the store
        started empty). A releaser that saw one epoch with entries parked and then sees
        another, or none, knows the store lost them."""
        (found,) = self._own_keys("reading the parking's epoch", lambda pipe: (pipe.hget(self.marker, "epoch"),))
        return None if found is None else text(found)

    def lookout(self, holder: str, lease: float, *, take_free: bool = True) -> bool | None:
        """Take or keep the turn to watch this parking for lost tasks, for ``lease``
        seconds (``lookout.lua``): True when ``holder`` has it, False when another has
        it, ``None`` when nobody has it and ``take_free`` is false. One releaser of all
        the workers sharing the store counts the parked tasks at a time."""
        found = int(self._lookout(holder, lease, "take" if take_free else "keep", "taking the lookout"))
        return None if found < 0 else bool(found)

    def stand_down(self, holder: str, lease: float) -> None:
        """Give up the lookout if ``holder`` has it: marked given up for ``lease`` seconds,
        in which the next releaser to ask takes it at once (``lookout.lua``)."""
        self._lookout(holder, lease, "give", "giving up the lookout")

    def _lookout(self, holder: str, lease: float, mode: str, doing: str) -> Any:
        if not lease > 0:
            raise ValueError(f"lookout lease must be a positive number of seconds, got {lease!r}")
        return self.store.eval("lookout", [self.lookout_key], [holder, max(1, round(lease * 1000)), mode], doing=doing)

    def eviction(self) -> EvictionCheck:
        """Whether a full Redis may evict parked tasks or breakers' state (``eviction.py``);
        ``unknown`` when it refuses ``CONFIG GET``. Raises ``StorageError`` only when the
        store cannot be reached."""
        try:
            return check_eviction(self.store.client(), self.store.label)
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(self.store.label, "reading maxmemory-policy", exc)) from exc

    # -- reading and repairing ------------------------------------------------------

    def _checked_tag(self, tag: str) -> str:
        if breaker_of(tag, self.store.quoted_prefix) is None:
            raise StorageError(f"redis store {self.store.label}: {tag!r} is no breaker of this store's parking")
        return tag

    def _script(
        self,
        script: str,
        tag: str,
        args: list[Any],
        *,
        doing: str,
        state: bool = False,
        leases: bool = False,
        life: bool = False,
        now: float | None = None,
        check: str = "",
    ) -> list[Any]:
        """Run a parking script (``parked.lua``) on ``tag``'s keys (and its breaker's state
        hash) and return its reply after what it repaired, which is logged. After a
        failure on the keys' data (a WRONGTYPE) it is run once more, checking them
        (``check``: at once)."""
        keys = [tag + suffix for suffix in PARKING_SUFFIXES] + ([tag + ":s"] if state else [])
        keys += [tag + ":l"] if leases else []  # (the breaker's probe leases, after its state)
        keys += [tag + LIFE_SUFFIX] if life else []
        now_arg = _opt(now) if self.store.client_time else ""
        while True:
            try:
                reply = self.store.eval(script, keys, [check, now_arg, *args], doing=doing)
            except StorageError as exc:
                if not check and classify(exc.__cause__) in ("types", "data"):
                    check = CHECK_TYPES
                    continue
                raise
            break
        if not isinstance(reply, list) or not reply:
            raise StorageError(f"redis store {self.store.label}: {doing}: {script} answered {reply!r}")
        repairs = text(reply[0])
        if repairs:
            logger.warning(
                "breaker %s: repaired what no script writes in Redis, while handling its parked tasks (%s)",
                shown_label(self.label(tag)), repairs,
                extra={"breaker_label": self.label(tag)},
            )  # fmt: skip
        return reply[1:]

    def _commands(self, tag: str, doing: str, queue: Callable[[Any], tuple[Any, ...]]) -> list[Any]:
        """Run ``queue``'s commands on ``tag``'s parking keys in one round trip; a key of
        another type among them is repaired (the ``tidy`` script) and they run again."""
        for attempt in (1, 2):
            replies = self._pipeline(doing, queue)
            failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
            if failed is None:
                return replies
            if attempt == 1 and classify(failed) == "types":
                self._script("tidy", tag, [], doing=doing, check=CHECK_TYPES)
                continue
            error = StorageError(failure(self.store.label, f"{doing} of {self.label(tag)}", failed))
            raise error from failed
        raise AssertionError("unreachable")

    def _own_keys(self, doing: str, queue: Callable[[Any], tuple[Any, ...]]) -> list[Any]:
        """Run ``queue``'s commands on this parking's own keys (the index, the marker); one
        of them holding another type is replaced, with a WARNING, and they run again."""
        for attempt in (1, 2):
            replies = self._pipeline(doing, queue)
            failed = next((reply for reply in replies if isinstance(reply, Exception)), None)
            if failed is None:
                return replies
            if attempt == 1 and classify(failed) == "types":
                self._replace(self.marker, "hash")
                if self._replace(self.index, "set"):
                    self._rebuild_index(doing)
                continue
            raise StorageError(failure(self.store.label, doing, failed)) from failed
        raise AssertionError("unreachable")

    def _pipeline(self, doing: str, queue: Callable[[Any], tuple[Any, ...]]) -> list[Any]:
        try:
            pipe = self.store.client().pipeline(transaction=False)
            queue(pipe)
            replies: list[Any] = pipe.execute(raise_on_error=False)
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(self.store.label, doing, exc)) from exc
        return replies

    def _replace(self, key: str, kind: str) -> bool:
        """Replace ``key`` if it holds another type than ``kind``; True if it did."""
        found = text(self.store.eval("retype", [key], [kind], doing=f"checking {key}"))
        if found:
            consequence = {
                self.marker: "the releasers will report the tasks parked until now as lost, once",
                self.index: "rebuilt from the parked entries",
            }[key]
            logger.warning(
                "redis store %s: %s held a %s, expected a %s; replaced it (%s)",
                self.store.label, key, found, kind, consequence,
            )  # fmt: skip
        return bool(found)

    def _rebuild_index(self, doing: str) -> tuple[set[str], set[str]]:
        """Every breaker with queued, claimed or only stored entries back in the index (a
        SCAN), which is then whole (``WHOLE``); returns their tags, and the tags the index
        named as the scan ended (read just before they are added)."""
        stem = "{" + glob_escape(self.store.quoted_prefix) + ":*}"
        tags: set[str] = set()
        try:
            client = self.store.client()
            for suffix in (":q", ":c", ":m"):
                for key in client.scan_iter(match=stem + suffix, count=500):
                    tag = text(key)[: -len(suffix)]
                    if breaker_of(tag, self.store.quoted_prefix) is not None:
                        tags.add(tag)
            pipe = client.pipeline(transaction=False)
            pipe.smembers(self.index)
            pipe.sadd(self.index, *tags, WHOLE)
            named, _ = pipe.execute()
        except CLIENT_ERRORS as exc:
            raise StorageError(failure(self.store.label, f"{doing}", exc)) from exc
        return tags, {text(member) for member in named}


def _opt(value: float | None) -> str:
    return "" if value is None else repr(value)
