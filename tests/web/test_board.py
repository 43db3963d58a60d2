"""The page's data (``Board``) and the checks every request meets, in-process: a fake clock, scripted readings."""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery

from celery_breaker import CircuitBreaker
from celery_breaker.core import BreakerSnapshot, State
from celery_breaker.errors import ConfigurationError, StorageError
from celery_breaker.integration.deferral.delay_depth import DelayDepth
from celery_breaker.monitoring.status import BreakerStatus, collect_metrics
from celery_breaker.ops.board import Board
from celery_breaker.ops.delayed import DelayCount, elsewhere_view
from celery_breaker.ops.watch import PAUSE_PER_READ
from celery_breaker.ops.web import (
    TOKEN_ENV,
    host_allowed,
    host_name,
    load_token,
    loopback,
    loopback_hosts,
    same_origin,
    tls_context,
)
from celery_breaker.storage import ReleasePace
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock
from tests.tls import Certificates


def status(
    name: str,
    state: State = State.CLOSED,
    *,
    key: str | None = None,
    generation: int = 0,
    successes: int = 0,
    rejections: int = 0,
    deferrals: int = 0,
    trips: int = 0,
    parked: int = 0,
    claimed: int = 0,
    opened_at: float | None = None,
    retry_after: float | None = None,
    release: ReleasePace | None = None,
) -> BreakerStatus:
    snapshot = BreakerSnapshot(
        name=name,
        key=key,
        state=state,
        generation=generation,
        failures=trips,
        successes=successes,
        rejections=rejections,
        deferrals=deferrals,
        trips=trips,
        last_failure=None,
        last_success=None,
        opened_at=opened_at,
        open_until=None,
        retry_after=retry_after,
        window_calls=4,
        window_failures=1,
        window_slow_calls=0,
        probes_in_flight=0,
    )
    return BreakerStatus(snapshot, parked, claimed, release)


def scripted(*readings: list[BreakerStatus] | Exception) -> Callable[[], list[BreakerStatus]]:
    """A store reader that answers ``readings`` in turn (an exception is raised)."""
    pending = iter(readings)

    def read() -> list[BreakerStatus]:
        reading = next(pending)
        if isinstance(reading, Exception):
            raise reading
        return reading

    return read


def test_rates_come_from_the_change_between_two_readings_and_the_backlog_drains_with_progress() -> None:
    clock = FakeClock()
    board = Board(
        scripted(
            [status("crm", key="t-3", successes=10), status("partner-api", trips=0, parked=0)],
            [
                status("crm", key="t-3", successes=30),
                status(
                    "partner-api",
                    State.OPEN,
                    generation=1,
                    trips=1,
                    rejections=8,
                    deferrals=8,
                    parked=8,
                    opened_at=clock.time() + 1,
                    retry_after=28.0,
                ),
            ],
            [
                status("crm", key="t-3", successes=40),
                status(
                    "partner-api",
                    generation=2,
                    trips=1,
                    rejections=8,
                    deferrals=8,
                    parked=2,
                    claimed=2,
                    release=ReleasePace(2, 28.0, 40.0, 1.25),
                ),
            ],
        ),
        store="redis://127.0.0.1/0",
        interval=1.0,
        clock=clock,
    )
    board.refresh()
    first = board.view()
    assert [row["label"] for row in first["breakers"]] == ["crm[t-3]", "partner-api"]
    assert first["breakers"][0]["calls_per_s"] is None  # one reading: no rate yet
    assert first["breakers"][0]["in_state"] == "-"  # in its state since before the first reading

    clock.advance(2.0)
    board.refresh()
    crm, partner = board.view()["breakers"]
    assert crm["calls_per_s"] == 10.0
    assert (partner["state"], partner["rejections_per_s"], partner["deferrals_per_s"]) == ("open", 4.0, 4.0)
    assert (partner["open_until"], partner["parked"], partner["released_per_s"]) == ("in 28.0 s", 8, 0.0)
    assert board.view()["summary"] == [{"state": "open", "count": 1}, {"state": "closed", "count": 1}]
    [change] = board.view()["changes"]
    assert (change["label"], change["source"], change["target"], change["reason"]) == (
        "partner-api",
        "closed",
        "open",
        "trip",
    )

    clock.advance(1.0)
    board.refresh()
    partner = board.view()["breakers"][1]
    # 8 parked, then 2 parked and 2 claimed: 4 left the parking in 1 s, of a peak of 8.
    assert (partner["released_per_s"], partner["backlog_peak"], partner["claimed"]) == (4.0, 8, 2)
    assert partner["release"] == "held 1.2 s, then 28/s (limit 40/s)"  # the pace, as the CLI shows it
    assert [c["target"] for c in board.view()["changes"]] == ["open", "closed"]


def test_a_failed_reading_keeps_the_last_view_with_the_error_and_the_next_one_clears_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    board = Board(
        scripted(
            [status("crm")],
            StorageError("redis store redis://:***@h/0: listing breakers failed"),
            RuntimeError("a bug"),
            [status("crm"), status("billing")],
        ),
        store="redis://:***@h/0",
        interval=0.5,
        clock=clock,
    )
    board.refresh()
    board.refresh()
    view = board.view()
    assert [row["label"] for row in view["breakers"]] == ["crm"]
    assert view["error"].startswith("store unreachable at ")
    assert view["error"].endswith("listing breakers failed; showing the last reading, retrying")
    with caplog.at_level(logging.ERROR, logger="celery_breaker"):
        board.refresh()
    assert "reading the breakers failed" in board.view()["error"]
    assert "RuntimeError: a bug" in caplog.text
    board.refresh()
    assert board.view()["error"] is None
    assert [row["label"] for row in board.view()["breakers"]] == ["crm", "billing"]  # as read


def test_the_first_reading_raises_so_the_command_exits_as_watch_does() -> None:
    board = Board(scripted(StorageError("down")), store="redis://h/0", interval=1.0)
    with pytest.raises(StorageError):
        board.refresh(raising=True)


def test_the_reader_thread_reads_at_once_when_woken_and_stops_when_told() -> None:
    read = threading.Event()

    def reading() -> list[BreakerStatus]:
        read.set()
        return []

    board = Board(reading, store="redis://h/0", interval=60.0)
    reader = threading.Thread(target=board.run)
    reader.start()
    board.wake()  # an action was taken: read now, not in 60 s
    assert read.wait(timeout=5)
    board.stop()
    reader.join(timeout=5)
    assert not reader.is_alive()


def test_only_loopback_is_served_without_allow_remote_and_only_under_its_own_names() -> None:
    assert loopback("127.0.0.1")
    assert loopback("::1")
    assert loopback("localhost")
    assert loopback("127.0.0.2")
    assert not loopback("0.0.0.0")
    assert not loopback("192.168.1.4")
    assert not loopback("breakers.example")
    hosts = loopback_hosts("127.0.0.1", 8787)
    assert host_allowed("127.0.0.1:8787", hosts)
    assert host_allowed("localhost:8787", hosts)
    assert host_allowed("[::1]:8787", hosts)
    # DNS rebinding: another site's name resolving to 127.0.0.1 reaches the server with its own Host.
    assert not host_allowed("evil.example:8787", hosts)
    assert not host_allowed(None, hosts)
    assert host_allowed("breakers.internal:8787", None)  # --allow-remote: any name


def test_a_host_named_with_allow_host_is_answered_with_any_port_and_no_other_name() -> None:
    hosts = loopback_hosts("127.0.0.1", 8787) | {host_name("Breakers.Example.com"), host_name("fd00::5")}
    assert host_allowed("breakers.example.com", hosts)  # (a proxy's Host: no port)
    assert host_allowed("BREAKERS.example.com:8443", hosts)  # (a proxy on another port passing it on)
    assert host_allowed("[fd00::5]:8787", hosts)
    assert host_allowed("localhost:8787", hosts)
    assert not host_allowed("evil.example:8787", hosts)  # DNS rebinding
    assert not host_allowed("breakers.example.com.evil.example", hosts)
    assert not host_allowed("breakers.example.com:x", hosts)
    for value in ("https://breakers.example.com", "breakers.example.com:443", "a b", "", "user@host"):
        with pytest.raises(ValueError, match="is not a host name"):
            host_name(value)


def test_an_action_request_must_come_from_the_page_itself() -> None:
    assert same_origin("http://127.0.0.1:8787", "127.0.0.1:8787")
    assert same_origin("https://breakers.internal", "breakers.internal")  # behind a TLS proxy
    assert not same_origin("http://evil.example", "127.0.0.1:8787")
    assert not same_origin("null", "127.0.0.1:8787")  # a sandboxed frame, a file:// page
    assert not same_origin(None, "127.0.0.1:8787")


def test_the_token_comes_from_a_file_or_the_environment_and_is_long_enough(tmp_path: Path) -> None:
    token = "x" * 32
    path = tmp_path / "token"
    path.write_text(token + "\n")
    assert load_token(str(path), {}) == token
    assert load_token(None, {TOKEN_ENV: f"  {token} "}) == token
    assert load_token(str(path), {TOKEN_ENV: "y" * 32}) == token  # the file wins
    with pytest.raises(ConfigurationError, match=f"needs a token: .*--token-file PATH.*{TOKEN_ENV}"):
        load_token(None, {})
    with pytest.raises(ConfigurationError, match="has 5 characters; use at least 16"):
        load_token(None, {TOKEN_ENV: "short"})
    with pytest.raises(ConfigurationError, match="cannot read the token in --token-file"):
        load_token(str(tmp_path / "missing"), {})


def test_the_https_certificate_and_key_are_checked_by_name_and_no_passphrase_is_asked(
    tls_certificates: Certificates, tmp_path: Path
) -> None:
    certs = tls_certificates
    assert tls_context(str(certs.server_cert), str(certs.server_key)).minimum_version is ssl.TLSVersion.TLSv1_2
    both = tmp_path / "both.pem"
    both.write_text(certs.server_cert.read_text() + certs.server_key.read_text())
    tls_context(str(both), None)  # the key in the certificate's file
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError, match=re.escape(f"cannot read --certfile {missing}: No such file")):
        tls_context(str(missing), None)
    with pytest.raises(ConfigurationError, match=r"not a PEM certificate and its matching private key .*KEY_VALUES"):
        tls_context(str(certs.server_cert), str(certs.client_key))  # another certificate's key
    with pytest.raises(ConfigurationError, match="not a PEM certificate"):
        tls_context(str(certs.server_cert), None)  # no key at all
    locked = tmp_path / "locked.key"
    subprocess.run(["openssl", "pkey", "-in", str(certs.server_key), "-aes256", "-passout", "pass:s3cret-phrase",
                    "-out", str(locked)], check=True, capture_output=True)  # fmt: skip
    encrypted = re.escape(f"--keyfile {locked}: the private key is encrypted")
    with pytest.raises(ConfigurationError, match=encrypted) as raised:
        tls_context(str(certs.server_cert), str(locked))
    assert "s3cret-phrase" not in str(raised.value)


def test_a_key_with_control_characters_is_shown_as_status_shows_it() -> None:
    # The page writes what it shows from these fields: a key from a task's arguments
    # may hold a newline or an escape sequence. The label stays as stored (it names
    # the breaker in an action).
    clock = FakeClock()
    key = "t\n3\x1b[2J"
    readings = [[status("crm", key=key)], [status("crm", State.OPEN, key=key, trips=1, opened_at=0.0)]]
    board = Board(lambda: readings.pop(0), store="redis://127.0.0.1/0", interval=1.0, clock=clock)
    board.refresh()
    clock.advance(1.0)
    board.refresh()
    [row] = board.view()["breakers"]
    assert (row["label"], row["key"]) == ("crm[t\n3\x1b[2J]", key)
    assert (row["shown"], row["key_shown"]) == ("crm[t\\n3\\x1b[2J]", "t\\n3\\x1b[2J")
    [change] = board.view()["changes"]
    assert change["label"] == "crm[t\\n3\\x1b[2J]"


def test_a_reading_that_takes_long_is_followed_by_a_pause_four_times_as_long() -> None:
    # Read back to back, 40,000 per-key breakers in Redis (~6 s a reading) took half of
    # the Redis server's time for as long as the page's command ran.
    clock = FakeClock()
    took = [0.1, 6.0, 0.2]

    def slow() -> list[BreakerStatus]:
        clock.advance(took.pop(0))
        return [status("crm", key="t-1")]

    board = Board(slow, store="redis://h/0", interval=1.0, clock=clock)
    board.refresh()
    assert board.pause == 1.0  # a quick reading: the interval
    board.refresh()
    assert board.pause == pytest.approx(PAUSE_PER_READ * 6.0)
    board.refresh()
    assert board.pause == 1.0


def test_a_view_is_encoded_once_and_a_new_reading_gets_a_new_etag(monkeypatch: pytest.MonkeyPatch) -> None:
    # (What lets the page's server answer "304 Not Modified", and every page share one encoding.)
    board = Board(scripted([status("crm", key="t-1")], [status("crm", key="t-1", successes=5)]),
                  store="redis://h/0", interval=1.0)  # fmt: skip
    board.refresh()
    encodings: list[object] = []
    dumps = json.dumps

    def counted(value: object) -> str:
        encodings.append(value)
        return dumps(value)

    monkeypatch.setattr(json, "dumps", counted)
    tag, body = board.encoded()
    assert board.encoded() == (tag, body)
    assert len(encodings) == 1
    assert json.loads(body) == board.view()
    board.refresh()
    assert board.encoded()[0] != tag
    assert len(encodings) == 2


def counts(*found: DelayCount) -> Callable[[], DelayCount]:
    """A delay-queue counter that answers ``found`` in turn."""
    pending = iter(found)
    return lambda: next(pending)


def test_the_delay_queues_count_is_in_the_view_and_an_unchanged_one_keeps_its_etag() -> None:
    refused = "amqp://guest:**@rabbit:5672//: [Errno 111] Connection refused"
    board = Board(
        scripted([status("crm")], [status("crm")]),
        store="redis://h/0",
        interval=1.0,
        delays=counts(
            DelayCount(DelayDepth(3, 0), None, fallback=False),
            DelayCount(DelayDepth(3, 0), None, fallback=False),
            DelayCount(DelayDepth(3, 2), None, fallback=False),
            DelayCount(None, refused, fallback=False),
        ),
    )
    assert board.counts_delays
    board.refresh()
    assert board.view()["delay_queues"] is None  # (not counted yet)
    board.count_delays()
    where = "in RabbitMQ's delay queues (celery_breaker_delayed_*)"
    text = (
        f"Parked counts tasks parked in the store; 3 deferred tasks (all breakers, all apps on the vhost) wait {where}"
    )
    assert board.view()["delay_queues"] == {
        "delayed": 3, "unroutable": 0, "error": None, "fallback": False, "text": f"{text}.",
    }  # fmt: skip
    tag = board.encoded()[0]
    board.count_delays()  # the same count: the same view, not encoded again (304 for every page)
    assert board.encoded()[0] == tag
    board.refresh()  # a reading of the store keeps the count
    assert board.view()["delay_queues"]["delayed"] == 3
    board.count_delays()
    assert board.view()["delay_queues"]["text"] == (
        f"{text}, and 2 in celery_breaker_delayed_unroutable: their queue was gone when they came due; move them "
        "back to it (a shovel, or the management UI) or purge that queue."
    )
    board.count_delays()
    assert board.view()["delay_queues"] == {
        "delayed": None, "unroutable": None, "error": refused, "fallback": False,
        "text": f"Parked counts tasks parked in the store; this app's deferred tasks wait {where}, not counted: "
                f"{refused}; retrying.",
    }  # fmt: skip
    assert [row["label"] for row in board.view()["breakers"]] == ["crm"]


def test_an_app_parking_in_its_store_shows_only_a_count_that_is_not_zero() -> None:
    board = Board(
        scripted([status("crm")]),
        store="redis://h/0",
        interval=1.0,
        delays=counts(
            DelayCount(DelayDepth(0, 0), None, fallback=True),
            DelayCount(DelayDepth(4, 0), None, fallback=True),
            DelayCount(None, "amqp://guest:**@rabbit:5672//: [Errno 111] Connection refused", fallback=True),
            DelayCount(DelayDepth(0, 1), None, fallback=True),
        ),
    )
    board.count_delays()
    assert board.view()["delay_queues"] is None
    board.count_delays()
    assert board.view()["delay_queues"]["text"].endswith(
        "4 deferred tasks (all breakers, all apps on the vhost) wait in RabbitMQ's delay queues "
        "(celery_breaker_delayed_*), where this app defers the tasks it cannot park (its store down, say)."
    )
    board.count_delays()  # not counted: nothing said (its backlog is in the store)
    assert board.view()["delay_queues"] is None
    board.count_delays()
    assert board.view()["delay_queues"]["unroutable"] == 1  # (one that needs an operator: said)


def test_a_count_that_hangs_holds_up_no_reading_of_the_store() -> None:
    # A RabbitMQ that does not answer holds a count for seconds (its timeout): the store is
    # read all along, by the other thread.
    asked, answer, answered = threading.Event(), threading.Event(), threading.Event()

    def hanging() -> DelayCount:
        asked.set()
        assert answer.wait(timeout=10)
        answered.set()
        return DelayCount(DelayDepth(5, 0), None, fallback=False)

    board = Board(scripted([status("crm")], [status("crm"), status("billing")]), store="redis://h/0",
                  interval=60.0, delays=hanging)  # fmt: skip
    board.refresh()
    counting = threading.Thread(target=board.run_delay_counts)
    counting.start()
    try:
        assert asked.wait(timeout=5)
        board.refresh()  # while the count hangs
        assert [row["label"] for row in board.view()["breakers"]] == ["crm", "billing"]
        assert board.view()["delay_queues"] is None
    finally:
        answer.set()
    assert answered.wait(timeout=5)
    board.stop()
    counting.join(timeout=5)
    assert not counting.is_alive()
    assert board.view()["delay_queues"]["delayed"] == 5
    assert [row["label"] for row in board.view()["breakers"]] == ["crm", "billing"]


@pytest.mark.parametrize(
    ("broker", "park", "said"),
    [
        ("redis://h:6379/0", False, "as countdown messages in the broker, held by workers until they are due"),
        ("sqs://", "auto", "as countdown messages in the broker, held by workers until they are due"),
        ("redis://h:6379/0", "auto", None),  # (parked in the store: the Parked column)
        ("amqp://guest:guest@rabbit//", "auto", None),  # (counted: DelayCounter)
        ("amqp://guest:guest@rabbit//", True, None),  # (counted when it falls back there)
        ("memory://", False, None),  # (in-process: tests)
    ],
)
def test_an_app_deferring_by_countdown_says_on_the_page_where_its_tasks_wait(
    broker: str, park: bool | str, said: str | None
) -> None:
    # `status` and `watch` say where a countdown app's deferred tasks wait (the Parked column
    # cannot count them); the page said nothing.
    app = Celery("page", broker=broker, set_as_current=False)
    app.conf.update(breaker_storage_url="redis://h:6379/1", breaker_park=park)
    shown = elsewhere_view(app)
    if said is None:
        assert shown is None
        return
    text = f"Parked counts tasks parked in the store; this app's deferred tasks wait {said}."
    assert shown == {"delayed": None, "unroutable": None, "error": None, "fallback": False, "text": text}
    board = Board(scripted([status("crm")], [status("crm")]), store="redis://h/1", interval=1.0, elsewhere=shown)
    assert not board.counts_delays
    board.refresh()
    board.refresh()  # (kept by every reading)
    assert board.view()["delay_queues"] == shown


def test_an_unreadable_breaker_is_named_with_its_fix_and_has_not_left_the_store(redis_url: str) -> None:
    """A breaker whose stored state turned unreadable between two readings is in the
    view's ``unreadable`` (the line ``status`` prints, the repair command) and its
    summary, and has not "left the store": the page's reading changes nothing in Redis."""
    store = RedisStore.from_url(f"{redis_url}?key_prefix=board-{os.getpid()}-unreadable")
    CircuitBreaker("crm", {"failure_threshold": 1}, storage=store).force_open()
    CircuitBreaker("billing", {"failure_threshold": 1}, storage=store).call(lambda: None)
    store.flush()
    clock = FakeClock()
    board = Board(lambda: collect_metrics(store), store="redis://127.0.0.1/0", interval=1.0, clock=clock)
    board.refresh(raising=True)
    server = redis.Redis.from_url(redis_url)
    state_key = store.keys_for("crm", None)[0]
    server.hset(state_key, "st", "ajar")
    before = server.dump(state_key)
    clock.advance(1.0)
    board.refresh(raising=True)
    view = board.view()
    assert server.dump(state_key) == before
    server.close()
    assert [row["name"] for row in view["breakers"]] == ["billing"]
    (unreadable,) = view["unreadable"]
    assert (unreadable["name"], unreadable["stored_state"]) == ("crm", None)
    assert unreadable["repair"] == "celery breaker reset crm"
    assert f"unreadable st='ajar' in {state_key}" in unreadable["line"]
    assert view["summary"] == [{"state": "unreadable", "count": 1}, {"state": "closed", "count": 1}]
    assert [(c["label"], c["source"], c["target"], c["reason"]) for c in view["changes"]] == [
        ("crm", "forced_open", None, "unreadable")
    ]
    store.close()
