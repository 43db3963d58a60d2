"""``celery breaker watch`` in-process: refreshes driven by a fake clock and a scripted ``sleep``, never by waiting."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from celery_breaker import CircuitOpenError, State
from celery_breaker.monitoring.status import BreakerStatus
from celery_breaker.ops import cli
from celery_breaker.ops.cli import EXIT_UNAVAILABLE, EXIT_USAGE
from celery_breaker.ops.watch import PAUSE_PER_READ, Watch, run_watch
from celery_breaker.storage import flush_stores
from celery_breaker.testing import FakeClock
from tests.servers import RedisServer

from . import cliproj
from .conftest import breaker, run, trip


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The clock ``watch`` reads."""
    fake = FakeClock()
    monkeypatch.setattr(cli, "_clock", fake)
    return fake


def script(monkeypatch: pytest.MonkeyPatch, clock: FakeClock, *steps: Callable[[], None]) -> None:
    """Each wait between two refreshes advances ``clock`` by what was asked and runs the next step."""
    pending = iter(steps)

    def sleep(seconds: float) -> None:
        clock.advance(seconds)
        next(pending, lambda: None)()
        flush_stores()  # what the steps counted locally reaches Redis, as the agent would send it

    monkeypatch.setattr(cli, "_sleep", sleep)


def frames(output: str) -> list[str]:
    return ["celery breaker watch" + part for part in output.split("celery breaker watch")[1:]]


def line_of(frame: str, name: str) -> list[str]:
    return next(line.split() for line in frame.splitlines() if line.startswith(name + " "))


def test_watch_shows_rates_time_in_state_and_the_transitions_between_refreshes(
    store_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    partner = breaker(store_url, "partner-api")
    partner.call(lambda: None)
    other = breaker(store_url, "billing")
    other.call(lambda: None)

    def traffic_then_trip() -> None:
        for _ in range(5):
            partner.call(lambda: None)
        trip(partner)  # 6 calls, then OPEN

    def deferrals_and_rejections() -> None:
        for _ in range(4):
            partner.note_deferral()
        for _ in range(2):
            with pytest.raises(CircuitOpenError):
                partner.call(lambda: None)

    flush_stores()
    script(monkeypatch, clock, traffic_then_trip, deferrals_and_rejections)
    result = run("watch", "--iterations", "3", "--interval", "2")
    assert result.exit_code == 0, result.output
    shown = frames(result.stdout)
    assert len(shown) == 3
    assert "every 2 s" in shown[0]
    assert "No changes since" in shown[0]
    first = line_of(shown[0], "partner-api")
    assert first[:4] == ["partner-api", "closed", "-", "-"]  # no age or rates before a second refresh

    second = line_of(shown[1], "partner-api")
    assert second[1] == "open"
    assert second[-7:-3] == ["1", "3.0", "0.0", "0.0"]  # trips; 6 calls in 2 s; no deferrals or rejections yet
    assert "Recent changes (newest last)" in shown[1]
    assert "partner-api  closed -> open  (trip; open for 30.0 s)" in shown[1]
    assert "2 breakers: 1 open, 1 closed" in shown[1]

    third = line_of(shown[2], "partner-api")
    assert third[-6:] == ["0.0", "2.0", "1.0", "4", "0", "-"]  # calls/s, 4 deferrals and 2 rejections in 2 s
    assert line_of(shown[2], "billing")[2:4] == [">=", "4.0"]  # closed since before the watch began
    assert "\x1b[" not in result.stdout  # not a terminal: frames follow each other, no escape codes


def test_once_and_colour(store_url: str, clock: FakeClock) -> None:
    trip(breaker(store_url, "partner-api"))
    result = run("watch", "--once", "--color")
    assert result.exit_code == 0, result.output
    assert len(frames(result.stdout)) == 1
    assert "\x1b[31m\x1b[1mopen\x1b[0m" in result.stdout
    assert "\x1b[H" not in result.stdout  # colour, but no cursor moves when stdout is not a terminal


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf", "1e9", "0.05"])
def test_an_interval_that_is_not_a_sane_number_of_seconds_is_a_usage_error(
    store_url: str, clock: FakeClock, interval: str
) -> None:
    """``nan`` passes click.FloatRange (it compares false with any bound): a watch that
    never sleeps; ``inf`` made the wait raise OverflowError after the first frame."""
    result = run("watch", "--interval", interval, "--once")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Invalid value for '--interval' / '-i'" in result.stderr
    assert not result.stdout  # refused before any frame


@pytest.mark.parametrize("interval", ["5s", "abc", "1,5", ""])
def test_an_interval_that_is_no_number_says_what_it_must_be(store_url: str, clock: FakeClock, interval: str) -> None:
    """``-i 5s`` was refused as "'5s' is not a valid float range" (click's name for the
    type): it now says what the option takes, as for ``nan``."""
    result = run("watch", "--interval", interval, "--once")
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"{interval!r} is not a number of seconds from 0.1 to 3600" in result.stderr
    assert "float range" not in result.stderr
    assert not result.stdout


def test_globs_narrow_the_view(store_url: str, clock: FakeClock) -> None:
    breaker(store_url, "partner-api").call(lambda: None)
    breaker(store_url, "billing").call(lambda: None)
    result = run("watch", "--once", "part*")
    assert "1 breaker: 1 closed" in result.stdout
    assert "billing" not in result.stdout


def test_ctrl_c_ends_the_watch_cleanly(store_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    breaker(store_url, "partner-api").call(lambda: None)

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sleep", interrupted)
    result = run("watch")  # no --iterations: until Ctrl-C
    assert result.exit_code == 0
    assert len(frames(result.stdout)) == 1
    assert result.stderr == ""
    assert "Traceback" not in result.output
    assert "Aborted" not in result.output


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server this test may stop."""
    with RedisServer() as server:
        server.start()
        yield server


def test_a_store_outage_during_the_watch_is_shown_and_survived(
    own_redis: RedisServer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{own_redis.url}/0?key_prefix=outage"
    cliproj.use_store(url)
    try:
        breaker(url, "partner-api").call(lambda: None)
        flush_stores()

        def restart() -> None:
            own_redis.start()

        script(monkeypatch, clock, own_redis.stop, restart)
        result = run("watch", "-n", "3")
        assert result.exit_code == 0, result.output
        shown = frames(result.stdout)
        assert "store unreachable" not in shown[0]
        assert f"store unreachable at {shown[1].split()[4]}: " in shown[1]  # the frame's own time
        assert "showing the last view, retrying" in shown[1]
        assert "partner-api" in shown[1]
        assert "store unreachable" not in shown[2]
        # Redis came back empty: the breaker is gone from the store, and the view says so.
        assert "partner-api  closed -> (gone)  (left the store)" in shown[2]  # (one label: no padding)

        own_redis.stop()  # unreachable from the start: one line, exit 69
        result = run("watch", "--once")
        assert result.exit_code == EXIT_UNAVAILABLE
        assert result.stderr.startswith(f"Error: cannot reach the breaker store {own_redis.url}/0?key_prefix=outage: ")
    finally:
        cliproj.use_store("memory://")


def test_a_fetch_that_takes_long_is_followed_by_a_pause_four_times_as_long() -> None:
    # Fetched back to back, 40,000 per-key breakers in Redis (~6 s a fetch) took half of
    # the Redis server's time for as long as `watch` ran.
    clock = FakeClock()
    took = [6.0, 0.1, 6.0]
    slept: list[float] = []
    drawn: list[str] = []

    def fetch() -> list[BreakerStatus]:
        clock.advance(took.pop(0))
        return []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    run_watch(fetch, drawn.append, Watch(clock), store="redis://h/0", interval=1.0, iterations=3, sleep=sleep,
              errors=())  # fmt: skip
    assert slept == [pytest.approx(PAUSE_PER_READ * 6.0), pytest.approx(1.0 - 0.1)]
    assert "every 24 s" in drawn[0]
    assert "every 1 s" in drawn[1]


def test_the_time_a_forced_open_breaker_has_been_held_open_is_exact() -> None:
    # The store records when a breaker was forced open, as when it tripped: FOR read
    # ">= 0.0 s" (in that state before the watch began) for an operator's hold of hours.
    from celery_breaker import CircuitBreaker
    from celery_breaker.monitoring import collect_metrics
    from celery_breaker.testing import fresh_store

    clock = FakeClock()
    store = fresh_store()
    held = CircuitBreaker("partner-api", storage=store, clock=clock)
    held.force_open()
    forced_at = clock.time()
    clock.advance(3600)
    (row,) = Watch(clock).observe(collect_metrics(store, clock=clock))
    assert row.since == pytest.approx(forced_at)


def test_a_partial_reading_keeps_only_the_breakers_stored_on_the_servers_it_missed() -> None:
    # A Redis Cluster with a primary down: a breaker deleted meanwhile from a primary that
    # answers was kept on screen as "last view", under a line blaming the one down, and
    # its "left the store" came only when that primary was back.
    from celery_breaker import CircuitBreaker
    from celery_breaker.monitoring import collect_metrics
    from celery_breaker.storage import Listing
    from celery_breaker.testing import fresh_store

    clock = FakeClock()
    store = fresh_store()
    for name in ("on-the-down-one", "deleted", "served"):
        CircuitBreaker(name, storage=store, clock=clock).call(lambda: None)
    watch = Watch(clock)
    whole = collect_metrics(store, clock=clock)
    watch.observe(whole)
    served = [row for row in whole if row.snapshot.name == "served"]
    partial = Listing(served, ("10.0.0.3:6379",), lambda name, key: name == "on-the-down-one")
    rows = watch.observe(partial)
    assert [row.status.snapshot.name for row in rows] == ["on-the-down-one", "served"]
    assert [(change.label, change.reason) for change in watch.changes] == [("deleted", "left the store")]


def test_a_breaker_read_again_after_it_was_unreadable_is_no_new_breaker() -> None:
    # A breaker whose state a listing could not read has not left the store (decision
    # 107); once a call repaired it, the watch and the page's changes called it a "new
    # breaker", though it had been there all along.
    from celery_breaker import CircuitBreaker
    from celery_breaker.monitoring import collect_metrics
    from celery_breaker.storage import Listing, UnreadableBreaker
    from celery_breaker.testing import fresh_store

    clock = FakeClock()
    store = fresh_store()
    for name in ("crm", "other"):
        CircuitBreaker(name, storage=store, clock=clock).call(lambda: None)
    watch = Watch(clock)
    whole = collect_metrics(store, clock=clock)
    watch.observe(whole)
    others = [row for row in whole if row.snapshot.name == "other"]
    watch.observe(Listing(others, unreadable=[UnreadableBreaker("crm", None, "unreadable gen='nan' in k")]))
    watch.observe(whole)  # (repaired by a call: read whole again)
    assert [(change.label, change.source, change.target, change.reason) for change in watch.changes] == [
        ("crm", State.CLOSED, None, "unreadable"),
        ("crm", None, State.CLOSED, "readable again (repaired)"),
    ]
