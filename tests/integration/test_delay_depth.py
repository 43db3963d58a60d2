"""What waits in RabbitMQ's delay queues, counted for operators: ``celery breaker status`` and
``watch``, and the Prometheus gauges (the web page's count: ``tests/web/test_page.py``).

Against the session's real RabbitMQ, each test in a vhost of its own: broker-delay's
topology is one per vhost, shared by every app that defers there, so a count is exact
only where nothing else defers. Runs are deferred as a worker defers them
(``BrokerDelay.deliver``: the topology declared, the publish confirmed), by hand and for
far longer than a test lasts, so they wait in the delay queues while it reads them. No
worker process.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import types
from collections.abc import Callable, Iterator

import pytest
from amqp.exceptions import ChannelError  # type: ignore[import-untyped]
from celery import Celery
from celery.bin.celery import celery as celery_main
from click.testing import CliRunner, Result
from kombu.connection import Connection
from prometheus_client import CollectorRegistry, generate_latest

from celery_breaker import CircuitBreaker
from celery_breaker.integration.deferral.broker_delay import level_name
from celery_breaker.integration.deferral.confirms import timed_out
from celery_breaker.integration.deferral.defer import _deliver
from celery_breaker.integration.deferral.delay_depth import (
    DelayDepth,
    delay_depth,
    depth_connection,
    read_delay_depth,
    unroutable_count,
)
from celery_breaker.integration.deferral.selection import (
    deferral_strategies,
    delays_in_rabbitmq,
    falls_back_to_rabbitmq,
    uses_delay_queues,
)
from celery_breaker.monitoring import delay_gauge
from celery_breaker.monitoring.delay_gauge import RETRY_AFTER, DelayDepthReader
from celery_breaker.monitoring.prometheus import BreakerCollector, register
from celery_breaker.ops import cli
from celery_breaker.ops.cli import EXIT_UNAVAILABLE
from celery_breaker.storage import close_stores
from celery_breaker.testing import FakeClock
from tests.integration import depth_proj
from tests.integration.depth_proj import defer, strand
from tests.rabbitmq import RabbitMQServer, Vhost, own_vhost
from tests.servers import free_port

#: Delays (seconds) whose runs start in levels 6, 9, 11, 12 and 16 of the delay topology.
DELAYS = (100, 1000, 3600, 5000, 70000)
WHERE = "in RabbitMQ's delay queues (celery_breaker_delayed_*)"
PARKED = "PARKED counts tasks parked in the store;"
#: What the line adds for an app that parks in its store (breaker_park=True).
FALLBACK = "where this app defers the tasks it cannot park (its store down, say)"


@pytest.fixture
def vhost(rabbitmq: RabbitMQServer) -> Iterator[Vhost]:
    """A vhost of this test's own on the session's RabbitMQ, deleted after it with all it holds."""
    with own_vhost(rabbitmq, "depth") as own:
        yield own


@pytest.fixture
def store_url(redis_url: str) -> Iterator[str]:
    """A breaker store of this test's own (a key prefix), with ``partner-api`` forced open in it."""
    url = f"{redis_url}/0?key_prefix=depth{time.monotonic_ns()}"
    CircuitBreaker("partner-api", depth_proj.POLICY, storage=url).force_open()
    yield url
    depth_proj.use("memory://", "memory://")
    close_stores()


def status(*args: str) -> Result:
    """``celery -A depth_proj breaker status <args>``, in-process."""
    command = ["-A", "tests.integration.depth_proj:app", "breaker", "status", *args]
    return CliRunner().invoke(celery_main, command, catch_exceptions=False)


def last_line(result: Result) -> str:
    return result.stdout.splitlines()[-1]


def test_status_counts_every_task_waiting_in_the_delay_queues(
    rabbitmq: RabbitMQServer, vhost: Vhost, store_url: str
) -> None:
    # On RabbitMQ, PARKED read 0 while every deferred task waited in the delay queues:
    # status said where they wait, not how many.
    depth_proj.use(vhost.url, store_url)
    nothing = status()
    assert nothing.exit_code == 0, nothing.output
    assert last_line(nothing) == f"{PARKED} 0 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}."
    assert rabbitmq.queues("name", vhost=vhost.name) == []  # (nothing deferred yet: no queue, none made by counting)

    defer(DELAYS[:1])
    one = f"{PARKED} 1 deferred task (all breakers, all apps on the vhost) waits {WHERE}."
    assert last_line(status()) == one
    defer(DELAYS[1:])  # (levels 6 to 16: the count is the sum of the levels)
    counted = status()
    assert counted.exit_code == 0, counted.output
    assert counted.stderr == ""
    assert last_line(counted) == f"{PARKED} 5 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}."

    strand(vhost.url, 2)
    assert last_line(status()) == (
        f"{PARKED} 5 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}, and 2 in "
        "celery_breaker_delayed_unroutable: their queue was gone when they came due; move them back to it (a "
        "shovel, or the management UI) or purge that queue."
    )
    # --json stays the list of breakers it was (one object per breaker).
    assert [row["name"] for row in json.loads(status("--json").stdout)] == ["partner-api"]


def test_a_broker_that_cannot_be_counted_is_said_in_the_line_and_changes_no_exit_code(store_url: str) -> None:
    refused = free_port()
    depth_proj.use(f"amqp://guest:secret@127.0.0.1:{refused}//", store_url)
    result = status()
    assert result.exit_code == 0, result.output
    assert last_line(result) == (
        f"{PARKED} this app's deferred tasks wait {WHERE}, not counted "
        f"(amqp://guest:**@127.0.0.1:{refused}//: [Errno 111] Connection refused)."
    )
    assert "secret" not in result.output

    # A broker that takes the connection and never answers: given up in the app's own
    # broker_connection_timeout, not waited on.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        depth_proj.use(f"amqp://guest:secret@127.0.0.1:{port}//", store_url, connect_timeout=0.5)
        result = status()
    assert result.exit_code == 0, result.output
    assert last_line(result).endswith(f", not counted (amqp://guest:**@127.0.0.1:{port}//: no answer (timed out)).")

    # The store's own failure keeps its exit code; the broker is not asked.
    depth_proj.use(f"amqp://guest:secret@127.0.0.1:{refused}//", f"redis://127.0.0.1:{free_port()}/0")
    unreachable = status()
    assert unreachable.exit_code == EXIT_UNAVAILABLE
    assert "cannot reach the breaker store" in unreachable.stderr


def test_a_queue_that_does_not_exist_counts_zero_and_is_not_created(rabbitmq: RabbitMQServer, vhost: Vhost) -> None:
    # Only level 5 exists, with 2 messages: the levels asked before it and UNROUTABLE after
    # it answer 404, which closes the channel that asked.
    with Connection(vhost.url, transport_options={"confirm_publish": True}) as connection:  # type: ignore[no-untyped-call]
        channel = connection.channel()
        channel.queue_declare(level_name(5), durable=True, auto_delete=False)
        producer = connection.Producer(channel)
        for n in range(2):
            producer.publish({"n": n}, exchange="", routing_key=level_name(5))
        channel.close()
        assert delay_depth(connection) == DelayDepth(delayed=2, unroutable=0)
        assert unroutable_count(connection) == 0
        assert list(connection.connection.channels) == [0]  # (the connection's own: none left open)
    assert [row["name"] for row in rabbitmq.queues("name", vhost=vhost.name)] == [level_name(5)]
    # The same through an app's settings, on a connection of its own.
    app = Celery("depth.settings", broker=vhost.url, set_as_current=False)
    assert read_delay_depth(app) == DelayDepth(2, 0)
    # Any other answer is no count of 0: a level held exclusively by another connection is
    # RESOURCE_LOCKED (405) to the count's, which fails.
    with Connection(vhost.url) as holder:  # type: ignore[no-untyped-call]
        holder.channel().queue_declare(level_name(3), exclusive=True)
        with pytest.raises(ChannelError, match="RESOURCE_LOCKED"):
            read_delay_depth(app)


def broker_samples(collector: BreakerCollector) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in collector.collect()
        for sample in family.samples
        if sample.name.startswith("celery_breaker_broker_")
    }


def test_the_metrics_count_the_delay_queues_of_an_app_deferring_there(vhost: Vhost, store_url: str) -> None:
    depth_proj.use(vhost.url, store_url)
    defer(DELAYS[:3])
    strand(vhost.url, 1)
    registry = CollectorRegistry()
    collector = register(depth_proj.app, registry)
    try:
        exposed = generate_latest(registry).decode()
        assert "\ncelery_breaker_broker_delayed_tasks 3.0\n" in exposed
        assert "\ncelery_breaker_broker_unroutable_tasks 1.0\n" in exposed
        assert "\ncelery_breaker_broker_delay_up 1.0\n" in exposed
        assert 'celery_breaker_state{breaker="partner-api",key="",state="forced_open"} 1.0' in exposed
        defer(DELAYS[3:])
        assert broker_samples(collector)["celery_breaker_broker_delayed_tasks"] == 5.0
    finally:
        collector.close()
    # Nothing of the broker for a store alone: which broker, and whether it defers there, is the app's.
    assert broker_samples(BreakerCollector(store_url)) == {}


def test_a_scrape_while_the_broker_is_down_says_so_and_still_exports_the_breakers(store_url: str) -> None:
    depth_proj.use(f"amqp://guest:guest@127.0.0.1:{free_port()}//", store_url)
    collector = BreakerCollector(depth_proj.app, clock=FakeClock())
    samples = [
        (sample.name, sample.labels, sample.value) for family in collector.collect() for sample in family.samples
    ]
    assert ("celery_breaker_broker_delay_up", {}, 0.0) in samples
    assert not [name for name, _, _ in samples if name.endswith("_tasks") and "broker" in name]  # (no 0 for "none")
    assert ("celery_breaker_store_up", {}, 1.0) in samples
    assert ("celery_breaker_state", {"breaker": "partner-api", "key": "", "state": "forced_open"}, 1.0) in samples


def test_a_reader_keeps_its_connection_never_hangs_and_tries_again_after_a_pause(
    rabbitmq: RabbitMQServer, vhost: Vhost, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    depth_proj.use(vhost.url, store_url)
    defer(DELAYS[:2])
    clock = FakeClock()
    connected: list[object] = []

    def connect(app: object, timeout: float) -> object:
        connected.append(depth_connection(app, timeout))
        return connected[-1]

    reader = DelayDepthReader(depth_proj.app, clock=clock, log_interval=60.0, timeout=0.5, connect=connect)
    caplog.set_level(logging.INFO, logger="celery_breaker")
    try:
        assert reader.read().depth == DelayDepth(2, 0)
        assert reader.read().depth == DelayDepth(2, 0)
        assert len(connected) == 1  # (kept between reads: no connection churn on RabbitMQ)

        # RabbitMQ closes the kept connection (as a restart does; it has sent its connection.close
        # when rabbitmqctl returns): the read goes on over a new connection at once.
        rabbitmq.rabbitmqctl("close_all_connections", "--vhost", vhost.name, "closed by the test")
        assert reader.read().depth == DelayDepth(2, 0)
        assert len(connected) == 2

        # RabbitMQ frozen: the answer does not come, the read gives up in its timeout, and
        # tries no new connection (a broker that does not answer would not answer it either).
        with rabbitmq.paused():
            failed = reader.read()
        assert failed.depth is None
        assert failed.error is not None
        assert timed_out(failed.error)
        assert len(connected) == 2
        # Until RETRY_AFTER has passed the failure is the answer, at once: RabbitMQ is not asked.
        clock.advance(RETRY_AFTER - 1)
        assert reader.read() is failed
        assert len(connected) == 2
        clock.advance(1)
        assert reader.read().depth == DelayDepth(2, 0)
        assert len(connected) == 3
    finally:
        reader.close()
    told = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert told == [
        ("WARNING", f"celery-breaker metrics: cannot count the deferred tasks in RabbitMQ's delay queues "
                    f"(amqp://guest:**@127.0.0.1:{rabbitmq.port}/{vhost.name}: no answer (timed out)); exporting "
                    f"celery_breaker_broker_delay_up 0, trying again in {RETRY_AFTER:g} s"),
        ("INFO", "celery-breaker metrics: RabbitMQ's delay queues are counted again"),
    ]  # fmt: skip


def deferred_while_the_store_is_down(n: int, delay: int) -> str:
    """Defer run ``n`` of ``depth_proj``'s task by the app's own strategies, in order, as a
    worker does, while its breaker's store is down; the name of the strategy that took it."""
    store = types.SimpleNamespace(parking=object(), down=True)  # (what ParkInStore reads of a store)
    breaker = types.SimpleNamespace(name="partner-api", key=None, store=store)
    rejected = types.SimpleNamespace(name="partner-api", key=None)  # (the task's own breaker rejected it)
    depth_proj.pushed(n)
    try:
        deferral = depth_proj.deferral(n, delay, breaker=breaker, rejected=rejected)
        strategy, delayed = _deliver(deferral, deferral_strategies(depth_proj.app))  # type: ignore[arg-type]
    finally:
        depth_proj.call_partner.pop_request()
    assert delayed == delay
    return strategy.name


def test_an_app_parking_in_its_store_counts_the_delay_queues_when_tasks_wait_there(
    vhost: Vhost, store_url: str
) -> None:
    # breaker_park=True on RabbitMQ parks in the store, and defers into the delay queues
    # what parking does not take: every run while the store is down. status said nothing
    # of those (no line at all for such an app).
    depth_proj.use(vhost.url, store_url, park=True)
    app = depth_proj.app
    assert falls_back_to_rabbitmq(app)
    assert not delays_in_rabbitmq(app)
    assert uses_delay_queues(app)
    assert [strategy.name for strategy in deferral_strategies(app)] == ["park", "broker-delay", "countdown"]
    nothing = status()
    assert nothing.exit_code == 0, nothing.output
    assert PARKED not in nothing.stdout  # (none wait there: nothing to say, as before)
    assert last_line(nothing) == "1 breaker: 1 forced_open"

    assert deferred_while_the_store_is_down(0, 1000) == "broker-delay"
    one = status()
    assert one.exit_code == 0, one.output
    waits = f"1 deferred task (all breakers, all apps on the vhost) waits {WHERE}, {FALLBACK}"
    assert last_line(one) == f"{PARKED} {waits}."
    strand(vhost.url, 2)
    unroutable = (
        ", and 2 in celery_breaker_delayed_unroutable: their queue was gone when they came due; move them back to "
        "it (a shovel, or the management UI) or purge that queue"
    )
    assert last_line(status()) == f"{PARKED} {waits}{unroutable}."
    assert [row["name"] for row in json.loads(status("--json").stdout)] == ["partner-api"]
    # The metrics count them too: an alert on the gauge is how such an outage is seen.
    collector = BreakerCollector(app)
    try:
        assert broker_samples(collector) == {
            "celery_breaker_broker_delayed_tasks": 1.0, "celery_breaker_broker_unroutable_tasks": 2.0,
            "celery_breaker_broker_delay_up": 1.0,
        }  # fmt: skip
    finally:
        collector.close()
    # A purge discards what is parked, and says what it does not reach (its exit code, 0, is
    # the purge's: all it was asked to discard, it did).
    command = ["-A", "tests.integration.depth_proj:app", "breaker", "purge", "partner-api", "--force"]
    purged = CliRunner().invoke(celery_main, command, catch_exceptions=False)
    assert purged.exit_code == 0, purged.output
    assert purged.stdout.startswith("partner-api: discarded 0 parked tasks in ")
    assert purged.stderr == (
        f"Note: {waits}{unroutable}. The purge does not reach those: they run once their delay is up (drop them in "
        "the broker if they must not run).\n"
    )

    # The store down, as when they went there: status exits 69 as it did, and says first
    # what waits in the delay queues (not in --json, whose stdout is a list or nothing).
    depth_proj.use(vhost.url, f"redis://127.0.0.1:{free_port()}/0", park=True)
    down = status()
    assert down.exit_code == EXIT_UNAVAILABLE
    assert (
        down.stdout == f"1 deferred task (all breakers, all apps on the vhost) waits {WHERE}, {FALLBACK}{unroutable}.\n"
    )
    assert "cannot reach the breaker store" in down.stderr
    as_json = status("--json")
    assert (as_json.exit_code, as_json.stdout) == (EXIT_UNAVAILABLE, "")


def test_an_app_parking_in_its_store_says_nothing_of_a_broker_that_cannot_be_counted(store_url: str) -> None:
    # Its backlog is PARKED: a broker that cannot be asked is no news about it (its workers log it).
    depth_proj.use(f"amqp://guest:secret@127.0.0.1:{free_port()}//", store_url, park=True)
    result = status()
    assert result.exit_code == 0, result.output
    assert last_line(result) == "1 breaker: 1 forced_open"
    assert (result.stderr, "not counted" in result.stdout, "secret" in result.stdout) == ("", False, False)
    command = ["-A", "tests.integration.depth_proj:app", "breaker", "purge", "partner-api", "--force"]
    purged = CliRunner().invoke(celery_main, command, catch_exceptions=False)
    assert (purged.exit_code, purged.stderr) == (0, "")  # (nothing of a broker it cannot ask)
    depth_proj.use(f"amqp://guest:secret@127.0.0.1:{free_port()}//", f"redis://127.0.0.1:{free_port()}/0", park=True)
    down = status()
    assert (down.exit_code, down.stdout) == (EXIT_UNAVAILABLE, "")


def watch(monkeypatch: pytest.MonkeyPatch, *steps: Callable[[], None]) -> list[str]:
    """``celery -A depth_proj breaker watch``, one frame more than ``steps``, each step run
    between two frames (a fake clock, no waiting); each frame's line under the table."""
    clock = FakeClock()
    pending = iter(steps)

    def sleep(seconds: float) -> None:
        clock.advance(seconds)
        next(pending)()

    monkeypatch.setattr(cli, "_clock", clock)
    monkeypatch.setattr(cli, "_sleep", sleep)
    command = ["-A", "tests.integration.depth_proj:app", "breaker", "watch", "-n", str(len(steps) + 1)]
    result = CliRunner().invoke(celery_main, command, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    frames = result.stdout.split("celery breaker watch")[1:]
    assert len(frames) == len(steps) + 1
    return [next((line for line in frame.splitlines() if line.startswith("PARKED")), "") for frame in frames]


def kept_connections(monkeypatch: pytest.MonkeyPatch) -> list[Connection]:
    """Every connection a ``DelayDepthReader`` opens from now on (unless given its own ``connect``)."""
    opened: list[Connection] = []

    def connect(app: object, timeout: float) -> Connection:
        opened.append(depth_connection(app, timeout))
        return opened[-1]

    monkeypatch.setattr(delay_gauge, "depth_connection", connect)
    return opened


def test_watch_counts_at_each_refresh_over_one_kept_connection(
    vhost: Vhost, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # watch did not count them: a connection to RabbitMQ each refresh. It keeps one now.
    depth_proj.use(vhost.url, store_url)
    defer(DELAYS[:2])
    opened = kept_connections(monkeypatch)
    lines = watch(monkeypatch, lambda: defer(DELAYS[2:4]), lambda: strand(vhost.url, 1))
    assert lines == [
        f"{PARKED} 2 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}.",
        f"{PARKED} 4 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}.",
        f"{PARKED} 4 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}, and 1 in "
        "celery_breaker_delayed_unroutable: their queue was gone when they came due; move them back to it (a "
        "shovel, or the management UI) or purge that queue.",
    ]
    assert len(opened) == 1  # (three counts, one connection)
    assert not opened[0].connected  # (closed when the watch ended)


def test_watch_says_why_a_count_failed_and_an_app_parking_in_its_store_only_what_waits(
    vhost: Vhost, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = free_port()
    depth_proj.use(f"amqp://guest:secret@127.0.0.1:{refused}//", store_url)
    assert watch(monkeypatch) == [
        f"{PARKED} this app's deferred tasks wait {WHERE}, not counted "
        f"(amqp://guest:**@127.0.0.1:{refused}//: [Errno 111] Connection refused)."
    ]
    # breaker_park=True: nothing while none wait there, the count once some do.
    depth_proj.use(vhost.url, store_url, park=True)

    def store_down() -> None:
        for n in range(3):
            assert deferred_while_the_store_is_down(n, 1000) == "broker-delay"

    lines = watch(monkeypatch, store_down)
    assert lines == ["", f"{PARKED} 3 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}, {FALLBACK}."]
    # Its store down at the first refresh: exit 69 as before, the count said first.
    depth_proj.use(vhost.url, f"redis://127.0.0.1:{free_port()}/0", park=True)
    command = ["-A", "tests.integration.depth_proj:app", "breaker", "watch", "--once"]
    down = CliRunner().invoke(celery_main, command, catch_exceptions=False)
    assert down.exit_code == EXIT_UNAVAILABLE
    assert down.stdout == f"3 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}, {FALLBACK}.\n"
