"""The Prometheus collector, its registration (Flower's ``flowerconfig.py``) and a worker's endpoint, on real Redis."""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celery_breaker import CircuitBreaker, ConfigurationError, State, TooManyRequests
from celery_breaker.clock import SYSTEM_CLOCK
from celery_breaker.core.pacing import PacingLaw
from celery_breaker.monitoring.flower import register_breakers, store_url
from celery_breaker.monitoring.prometheus import (
    _BROKER_GAUGES,
    _COUNTERS,
    _GAUGES,
    PREFIX,
    BreakerCollector,
    register,
    start_metrics_server,
    unregister,
)
from celery_breaker.storage.redis import RedisStore
from celery_breaker.testing import FakeClock, fresh_store

from ..servers import RedisServer, check_connection_guard, free_port
from ..unit.support import fail, ok
from .conftest import following, unique_prefix

POLICY = {"failure_threshold": 1, "reset_timeout": 10.0}
RATE_POLICY = {"failure_threshold": None, "failure_rate_threshold": 0.9, "minimum_calls": 10}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample ``registry`` exposes, by name and labels, read back through the text format."""
    text = generate_latest(registry).decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def series(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def throwaway_app(**settings: Any) -> Celery:
    app = Celery("prometheus-test", set_as_current=False, broker="memory://")
    app.conf.update(**settings)
    return app


def test_a_scrape_exposes_every_breaker_of_the_store(url: str) -> None:
    store = RedisStore.from_url(url)
    clock = FakeClock()
    crm = CircuitBreaker("crm", POLICY, storage=store, clock=clock)
    crm.call(ok)
    fail(crm)  # trips: OPEN for 10 s
    with pytest.raises(Exception, match="open"):
        crm.call(ok)
    crm.note_deferral()
    billing = CircuitBreaker("billing", RATE_POLICY, storage=store, clock=clock, key="acme")
    billing.call(ok)
    billing.call(ok)
    fail(billing)
    for n in range(2):
        store.parking.park("crm", None, f"task-{n}:1", float(n), "payload", None)
    store.flush()  # counts each process sends every second: sent now
    registry = CollectorRegistry()
    registry.register(BreakerCollector(url, clock=clock))  # by URL: another process's view

    samples = scrape(registry)

    def crm_(name: str) -> float | None:
        return series(samples, name, breaker="crm", key="")

    def acme(name: str) -> float | None:
        return series(samples, name, breaker="billing", key="acme")

    for state in State:
        assert series(samples, "celery_breaker_state", breaker="crm", key="", state=state.value) == (
            1.0 if state is State.OPEN else 0.0
        )
        assert series(samples, "celery_breaker_state", breaker="billing", key="acme", state=state.value) == (
            1.0 if state is State.CLOSED else 0.0
        )
    assert crm_("celery_breaker_open_until_timestamp_seconds") == pytest.approx(clock.time() + 10.0)
    assert crm_("celery_breaker_opened_at_timestamp_seconds") == pytest.approx(clock.time())
    assert acme("celery_breaker_open_until_timestamp_seconds") is None  # not open: no sample
    assert acme("celery_breaker_opened_at_timestamp_seconds") is None
    assert (crm_("celery_breaker_trips_total"), acme("celery_breaker_trips_total")) == (1.0, 0.0)
    assert (crm_("celery_breaker_successes_total"), acme("celery_breaker_successes_total")) == (1.0, 2.0)
    assert (crm_("celery_breaker_failures_total"), acme("celery_breaker_failures_total")) == (1.0, 1.0)
    assert (crm_("celery_breaker_rejections_total"), acme("celery_breaker_rejections_total")) == (1.0, 0.0)
    assert (crm_("celery_breaker_deferrals_total"), acme("celery_breaker_deferrals_total")) == (1.0, 0.0)
    assert (crm_("celery_breaker_parked_tasks"), acme("celery_breaker_parked_tasks")) == (2.0, 0.0)
    assert (crm_("celery_breaker_claimed_tasks"), acme("celery_breaker_claimed_tasks")) == (0.0, 0.0)
    assert acme("celery_breaker_window_calls") == 3.0
    assert acme("celery_breaker_window_failures") == 1.0
    assert acme("celery_breaker_window_failure_rate") == pytest.approx(1 / 3)
    assert crm_("celery_breaker_window_failure_rate") is None  # counts no rate window: no sample
    assert crm_("celery_breaker_last_failure_timestamp_seconds") == pytest.approx(clock.time())
    assert acme("celery_breaker_last_success_timestamp_seconds") == pytest.approx(clock.time())
    assert (crm_("celery_breaker_probes_in_flight"), acme("celery_breaker_probes_in_flight")) == (0.0, 0.0)
    assert series(samples, "celery_breaker_store_up") == 1.0
    assert all(name.startswith("celery_breaker_") for name in names(samples))


def test_the_release_pace_is_sampled_while_parked_tasks_are_released(url: str) -> None:
    store = RedisStore.from_url(url)
    clock = FakeClock()
    partner = CircuitBreaker("partner", POLICY, storage=store, clock=clock)
    partner.call(ok)
    store.flush()  # (its success counted before the release begins: none comes back with the refusal)
    tag = store.parking.tag("partner", None)
    for n in range(50):
        store.parking.park("partner", None, f"task-{n}:1", float(n), "payload", None)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(store, clock=clock))

    def pace(name: str) -> float | None:
        return series(scrape(registry), f"celery_breaker_release_{name}", breaker="partner", key="")

    assert (pace("rate_per_second"), pace("limit_per_second"), pace("held_seconds")) == (None, None, None)
    store.parking.release(tag, most=100, pace=0.0, ramp=0.0, lease=30.0, now=clock.monotonic(), law=PacingLaw())
    assert (pace("rate_per_second"), pace("limit_per_second"), pace("held_seconds")) == (10.0, None, None)
    run = partner.begin_run(lambda e: e)
    run.released = True
    with run:
        run.settle(TooManyRequests(2.0))  # a released task refused: the release cuts and waits 2 s
    clock.advance(0.5)
    store.parking.release(tag, most=100, pace=0.0, ramp=0.0, lease=30.0, now=clock.monotonic(), law=PacingLaw())
    # (nothing came back with the refusal: its limit is the rate refused, the cut 80 % of it)
    assert (pace("rate_per_second"), pace("limit_per_second")) == (8.0, 10.0)
    assert pace("held_seconds") == pytest.approx(1.5)
    assert pace("usual_bad_share") is None  # (not learnt: fewer than USUAL_LEAST outcomes)
    paced = store.parking.pace(tag)
    redis.Redis.from_url(url.partition("?")[0]).hset(tag + ":p", mapping={"ubd": 6, "usn": 60, "ugen": paced["a_gen"]})
    assert pace("usual_bad_share") == pytest.approx(0.1)


def test_every_metric_exposed_is_documented() -> None:
    """Each family the collector makes has its row in docs/metrics.md's table."""
    documented = set(re.findall(r"^\| `(celery_breaker_[a-z_]+)` \|", DOCS.read_text(), re.MULTILINE))
    made = {f"{PREFIX}_{name}_total" for name, _, _ in _COUNTERS} | {f"{PREFIX}_{name}" for name, _, _ in _GAUGES}
    made |= {f"{PREFIX}_state", f"{PREFIX}_store_up", f"{PREFIX}_store_unreached_servers"}
    made |= {f"{PREFIX}_store_unreadable_breakers", f"{PREFIX}_unreadable"}
    made |= {f"{PREFIX}_{name}" for name, _ in _BROKER_GAUGES}  # (an app deferring into RabbitMQ)
    assert made == documented


def test_an_unreadable_breaker_is_a_series_of_its_own_and_is_left_as_it_is(url: str, redis_url: str) -> None:
    """A scrape finding an operator's forced-open breaker unreadable reset it (deleted its
    keys): it came back closed. Now it is ``celery_breaker_unreadable`` with the state its
    hash still names, counted in ``celery_breaker_store_unreadable_breakers``, with no
    series of its state (nothing of it was read) but its parking's, and its keys are as
    they were."""
    store = RedisStore.from_url(url)
    clock = FakeClock()
    CircuitBreaker("crm", POLICY, storage=store, clock=clock).force_open()
    CircuitBreaker("billing", POLICY, storage=store, clock=clock, key="acme").call(ok)
    store.flush()
    server = redis.Redis.from_url(redis_url)
    state_key = store.keys_for("crm", None)[0]
    server.hset(state_key, "gen", "-3")
    before = server.dump(state_key)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(url, clock=clock))

    samples = scrape(registry)

    assert series(samples, f"{PREFIX}_unreadable", breaker="crm", key="", stored_state="forced_open") == 1.0
    assert series(samples, f"{PREFIX}_store_unreadable_breakers") == 1.0
    parking = {f"{PREFIX}_unreadable", f"{PREFIX}_parked_tasks", f"{PREFIX}_claimed_tasks"}
    assert not [labels for name, labels in samples if ("breaker", "crm") in labels and name not in parking]
    assert series(samples, f"{PREFIX}_parked_tasks", breaker="crm", key="") == 0.0
    assert series(samples, f"{PREFIX}_state", breaker="billing", key="acme", state="closed") == 1.0
    assert server.dump(state_key) == before
    assert server.ttl(state_key) == -1  # (forced open: no TTL, none given)
    server.close()


def test_the_tasks_parked_behind_an_unreadable_breaker_are_still_counted(url: str, redis_url: str) -> None:
    """Its parking is read apart from its state: a backlog held behind an operator's
    forced-open breaker whose state hash went unreadable vanished from
    ``celery_breaker_parked_tasks`` (and a backlog alert resolved) while it still waited."""
    store = RedisStore.from_url(url)
    clock = FakeClock()
    CircuitBreaker("crm", POLICY, storage=store, clock=clock).force_open()
    for n in range(3):
        store.parking.park("crm", None, f"task-{n}:1", float(n), "payload", None)
    store.flush()
    following(store)  # (else its agent, subscribing, may read the view again after the damage: a mend)
    server = redis.Redis.from_url(redis_url)
    server.hset(store.keys_for("crm", None)[0], "ok", "nan")
    registry = CollectorRegistry()
    registry.register(BreakerCollector(url, clock=clock))

    samples = scrape(registry)

    assert series(samples, f"{PREFIX}_unreadable", breaker="crm", key="", stored_state="forced_open") == 1.0
    assert series(samples, f"{PREFIX}_parked_tasks", breaker="crm", key="") == 3.0
    assert series(samples, f"{PREFIX}_claimed_tasks", breaker="crm", key="") == 0.0
    assert series(samples, f"{PREFIX}_state", breaker="crm", key="", state="closed") is None  # (not read: no state)
    server.close()


def test_the_state_follows_the_breaker_between_scrapes(url: str) -> None:
    clock = FakeClock()
    crm = CircuitBreaker("crm", {**POLICY, "half_open_max_calls": 1, "success_threshold": 1}, storage=url, clock=clock)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(url, clock=clock))

    def current() -> list[str]:
        samples = scrape(registry)
        return [s.value for s in State if series(samples, "celery_breaker_state", breaker="crm", key="", state=s.value)]

    crm.call(ok)
    assert current() == ["closed"]
    fail(crm)
    assert current() == ["open"]
    clock.advance(10.0)
    crm.call(ok)  # the probe closes it
    assert current() == ["closed"]
    assert series(scrape(registry), "celery_breaker_open_until_timestamp_seconds", breaker="crm", key="") is None
    crm.force_open()
    assert current() == ["forced_open"]


def test_a_store_that_cannot_be_read_is_store_up_0_and_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    dead = f"redis://127.0.0.1:{free_port()}?key_prefix={unique_prefix()}&socket_connect_timeout=0.2"
    clock = FakeClock()
    registry = CollectorRegistry()
    registry.register(BreakerCollector(dead, clock=clock))

    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        logged = []
        for step in (0.0, 30.0, 29.0, 2.0, 30.0):  # t = 0, 30, 59, 61, 91
            clock.advance(step)
            samples = scrape(registry)  # never raises into the exporter
            assert series(samples, "celery_breaker_store_up") == 0.0
            assert names(samples) == {"celery_breaker_store_up"}
            logged.append(len(caplog.records))
    assert logged == [1, 1, 1, 2, 2]
    assert "cannot read breakers from redis://127.0.0.1" in caplog.records[0].getMessage()
    assert "celery_breaker_store_up 0" in caplog.records[0].getMessage()
    assert "failing for 61 s" in caplog.records[1].getMessage()


def test_series_come_back_when_the_store_answers_again(caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer() as server:
        server.start()
        url = f"{server.url}?time=client&socket_timeout=0.2&socket_connect_timeout=0.2"
        clock = FakeClock()
        fail(CircuitBreaker("crm", POLICY, storage=url, clock=clock))
        registry = CollectorRegistry()
        registry.register(BreakerCollector(url, clock=clock))
        open_series = ("celery_breaker_state", frozenset({("breaker", "crm"), ("key", ""), ("state", "open")}))
        assert scrape(registry)[open_series] == 1.0

        server.stop()
        with caplog.at_level(logging.INFO, logger="celery_breaker"):
            down = scrape(registry)
            server.start()  # empty again: a fresh server
            clock.advance(5.0)
            fail(CircuitBreaker("crm", POLICY, storage=url, clock=clock))
            back = scrape(registry)
    assert (series(down, "celery_breaker_store_up"), open_series in down) == (0.0, False)
    assert (series(back, "celery_breaker_store_up"), back[open_series]) == (1.0, 1.0)
    messages = [r.getMessage() for r in caplog.records if "celery-breaker metrics" in r.getMessage()]
    assert len(messages) == 2
    assert "answers again after 5 s" in messages[1]


def test_registering_reads_nothing_from_the_store(caplog: pytest.LogCaptureFixture) -> None:
    # prometheus_client's REGISTRY asks a collector for its names when it is registered:
    # describe() answers without a round trip (Flower must start while Redis is down).
    dead = f"redis://127.0.0.1:{free_port()}?key_prefix={unique_prefix()}"
    registry = CollectorRegistry(auto_describe=True)
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        register(dead, registry)
    assert caplog.records == []


def test_register_is_idempotent_per_store_and_refuses_a_second_store(url: str, redis_url: str) -> None:
    registry = CollectorRegistry(auto_describe=True)
    app = throwaway_app(breaker_storage_url=url)
    collector = register(app, registry)
    assert register(url, registry) is collector
    assert register(collector.store, registry) is collector
    assert register(RedisStore.from_url(url), registry) is collector  # another object, the same store
    # (The system clock: under time=client, what the reader below goes by. A fake clock's
    # times could read as far ahead of a machine booted minutes ago, and be reset.)
    fail(CircuitBreaker("crm", POLICY, storage=url, clock=SYSTEM_CLOCK))
    samples = scrape(registry)  # one collector: one sample per series
    assert series(samples, "celery_breaker_trips_total", breaker="crm", key="") == 1.0

    other = f"{redis_url}?key_prefix={unique_prefix()}"
    with pytest.raises(ConfigurationError, match="already exports celery_breaker_\\* metrics"):
        register(other, registry)
    assert unregister(url, registry) is True
    assert unregister(url, registry) is False
    assert scrape(registry) == {}
    assert register(other, registry) is not collector  # the registry is free again


def test_a_bad_source_fails_where_the_collector_is_made() -> None:
    with pytest.raises(ConfigurationError, match="unknown scheme 'amqp'"):
        BreakerCollector("amqp://guest@localhost//")
    with pytest.raises(ConfigurationError, match="breaker_key_prefix"):
        BreakerCollector(throwaway_app(breaker_key_prefix="{x}"))


def test_a_memory_store_is_collected_in_its_own_process() -> None:
    store = fresh_store()
    fail(CircuitBreaker("local", POLICY, storage=store, clock=FakeClock()))
    registry = CollectorRegistry()
    registry.register(BreakerCollector(store))
    samples = scrape(registry)
    assert series(samples, "celery_breaker_state", breaker="local", key="", state="open") == 1.0
    assert series(samples, "celery_breaker_parked_tasks", breaker="local", key="") == 0.0


# -- Flower: the flowerconfig.py lines of docs/metrics.md ----------------------------


def flowerconfig_from_docs() -> str:
    found = re.search(r"```python\n(# flowerconfig\.py\n.*?)```", DOCS.read_text(), re.DOTALL)
    assert found is not None, "docs/metrics.md must show a flowerconfig.py block"
    return found.group(1)


def test_the_documented_flowerconfig_lines_export_the_breakers_to_the_default_registry(redis_url: str) -> None:
    prefix = unique_prefix()
    code = flowerconfig_from_docs()
    assert len([line for line in code.splitlines() if line and not line.startswith("#")]) <= 2
    assert '"redis://localhost:6379/0"' in code
    url = f"{redis_url}/0"
    fail(CircuitBreaker("crm", POLICY, storage=f"{url}?key_prefix={prefix}", clock=FakeClock()))
    # Flower runs the file with exec (tornado's parse_config_file); ours points at the test's Redis.
    code = code.replace('"redis://localhost:6379/0"', repr(f"{url}?key_prefix={prefix}"))
    exec(compile(code, "flowerconfig.py", "exec"), {})
    try:
        exec(compile(code, "flowerconfig.py", "exec"), {})  # run twice: still one collector
        samples = scrape(REGISTRY)
        assert series(samples, "celery_breaker_state", breaker="crm", key="", state="open") == 1.0
        assert series(samples, "celery_breaker_store_up") == 1.0
    finally:
        assert unregister(f"{url}?key_prefix={prefix}", REGISTRY)
    assert series(scrape(REGISTRY), "celery_breaker_store_up") is None


def test_register_breakers_takes_a_broker_url_and_the_workers_key_prefix(redis_url: str) -> None:
    prefix = unique_prefix()
    fail(CircuitBreaker("crm", POLICY, storage=f"{redis_url}?key_prefix={prefix}", clock=FakeClock()))
    registry = CollectorRegistry()
    collector = register_breakers(redis_url, key_prefix=prefix, registry=registry)
    assert collector.store.url == f"{redis_url}?key_prefix={prefix}"
    assert series(scrape(registry), "celery_breaker_trips_total", breaker="crm", key="") == 1.0
    app = throwaway_app(broker_url=redis_url, breaker_key_prefix=prefix)
    assert register_breakers(app, registry=registry) is collector  # the app's own store: the same


def test_store_url_derives_the_store_a_worker_uses_from_its_broker_url() -> None:
    assert store_url("redis://:pw@cache:6379/2") == "redis://:pw@cache:6379/2"
    assert store_url("redis+socket:///run/redis.sock") == "redis+unix:///run/redis.sock"
    assert (
        store_url("sentinel://h1:26379;sentinel://h2:26380", transport_options={"master_name": "mymaster"})
        == "redis+sentinel://h1:26379,h2:26380/mymaster"
    )
    assert store_url("redis+cluster://n1:7000,n2:7001", key_prefix="proj") == (
        "redis+cluster://n1:7000,n2:7001?key_prefix=proj"
    )
    assert store_url("redis://cache/0?key_prefix=proj", key_prefix="proj") == "redis://cache/0?key_prefix=proj"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://", "Flower runs in a process of its own"),
        ("amqp://guest@rabbit//", "unknown scheme 'amqp'"),
        ("localhost:6379", "expected a Redis store or broker URL, got 'localhost:6379'"),
    ],
)
def test_register_breakers_rejects_what_flower_cannot_read(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        register_breakers(url, registry=CollectorRegistry())


def test_key_prefix_goes_with_a_url_not_an_app() -> None:
    with pytest.raises(ConfigurationError, match="key_prefix and transport_options apply to a URL"):
        register_breakers(throwaway_app(), key_prefix="proj", registry=CollectorRegistry())


# -- the worker's endpoint ------------------------------------------------------------


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


@pytest.fixture
def endpoint_app(url: str) -> Iterator[Celery]:
    app = throwaway_app(breaker_storage_url=url, breaker_metrics_port=free_port())
    yield app
    # Whatever a test left running in this process is stopped.
    from celery_breaker.monitoring import prometheus

    for server in list(prometheus._SERVERS.values()):
        server.stop()


def test_the_worker_endpoint_serves_the_breakers_on_loopback(endpoint_app: Celery, url: str) -> None:
    # (The system clock: under time=client, what the reader below goes by. A fake clock's
    # times could read as far ahead of a machine booted minutes ago, and be reset.)
    fail(CircuitBreaker("crm", POLICY, storage=url, clock=SYSTEM_CLOCK))
    registry = CollectorRegistry()
    server = start_metrics_server(endpoint_app, registry)
    assert server is not None
    port = endpoint_app.conf.breaker_metrics_port
    assert server.url == f"http://127.0.0.1:{port}/metrics"
    assert server._httpd.server_address[:2] == ("127.0.0.1", port)  # this host only, by default

    body = get(server.url)
    assert 'celery_breaker_state{breaker="crm",key="",state="open"} 1.0' in body
    assert 'celery_breaker_trips_total{breaker="crm",key=""} 1.0' in body
    assert "celery_breaker_store_up 1.0" in body
    assert start_metrics_server(endpoint_app, registry) is server  # once per process

    server.stop()
    with pytest.raises(urllib.error.URLError):
        get(server.url)
    again = start_metrics_server(endpoint_app, registry)  # the port was freed
    assert again is not None
    assert again is not server
    assert "celery_breaker_store_up 1.0" in get(again.url)
    again.stop()


def test_idle_connections_are_closed_and_never_pile_up(endpoint_app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    """prometheus_client's server started a thread per connection, without limit, and
    waited for a request forever, in the worker's main process: a flood of connections
    that send nothing took every file descriptor, accept() then failed in a loop at full
    CPU, and the worker stopped ("Unrecoverable error: ... Too many open files"). Now a
    silent connection is closed after the handler's timeout, one that trickles its
    request after ``REQUEST_WITHIN``, and one beyond ``Guarded.max_connections`` at once."""
    from celery_breaker.monitoring import prometheus
    from celery_breaker.monitoring.serving import QUIET_FOR, Guarded

    assert (prometheus._QuietHandler.timeout, Guarded.max_connections) == (QUIET_FOR, 16)
    monkeypatch.setattr(Guarded, "max_connections", 4)  # (fewer to hold: each connection costs the test time)
    server = start_metrics_server(endpoint_app, CollectorRegistry())
    assert server is not None
    try:
        quiet_for = partial(monkeypatch.setattr, prometheus._QuietHandler, "timeout")
        request_within = partial(monkeypatch.setattr, prometheus._QuietHandler, "request_within")
        check_connection_guard(("127.0.0.1", server.port), 4, quiet_for, request_within)
    finally:
        server.stop()


def test_no_endpoint_unless_a_port_is_set(url: str) -> None:
    registry = CollectorRegistry()
    assert start_metrics_server(throwaway_app(breaker_storage_url=url), registry) is None
    assert scrape(registry) == {}  # nothing registered either


def test_a_busy_port_is_logged_and_the_worker_runs_on(endpoint_app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    port = endpoint_app.conf.breaker_metrics_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with caplog.at_level(logging.ERROR, logger="celery_breaker"):
            assert start_metrics_server(endpoint_app, CollectorRegistry()) is None
    message = caplog.records[-1].getMessage()
    assert f"cannot serve Prometheus metrics on 127.0.0.1:{port}" in message
    assert "Set breaker_metrics_port to a free port" in message


@pytest.mark.parametrize("address", ["192.0.2.1", "metrics.invalid"])
def test_an_address_it_cannot_bind_is_logged_naming_the_address_setting(
    url: str, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    # (An address of no interface here, or a name that resolves to nothing: the log told
    # to change the port, which fails the same way.)
    app = throwaway_app(breaker_storage_url=url, breaker_metrics_port=free_port(), breaker_metrics_address=address)
    with caplog.at_level(logging.ERROR, logger="celery_breaker"):
        assert start_metrics_server(app, CollectorRegistry()) is None
    message = caplog.records[-1].getMessage()
    assert f"cannot serve Prometheus metrics on {address}:" in message
    assert "Set breaker_metrics_address to an address of this host" in message
    assert "breaker_metrics_port" not in message


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_process_does_not_hold_the_port(endpoint_app: Celery) -> None:
    server = start_metrics_server(endpoint_app, CollectorRegistry())
    assert server is not None
    release_child, child_waits = os.pipe()
    parent_waits, child_ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: like a prefork pool process, it lives on while its parent stops serving
        os.close(child_waits)
        os.close(parent_waits)
        os.write(child_ready, b"!")  # (its fork hooks have run: what it closes is closed)
        os.read(release_child, 1)
        os._exit(0)
    os.close(release_child)
    os.close(child_ready)
    try:
        # (not before the child is past its fork hooks: else the parent may bind the port
        # while a child not yet scheduled still holds its copy, as a run beside other
        # work once did on Python 3.10)
        assert os.read(parent_waits, 1) == b"!"
        os.close(parent_waits)
        server.stop()
        # Only a socket nobody listens on can be bound again: the child closed its copy.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", server.port))
    finally:
        os.close(child_waits)  # EOF: the child exits
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_prometheus_client_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "celery_breaker.monitoring.prometheus")
    with pytest.raises(ImportError, match=re.escape("pip install 'celery-breaker[prometheus]'")):
        importlib.import_module("celery_breaker.monitoring.prometheus")


def test_a_breaker_without_a_key_and_one_with_an_empty_key_are_two_series(url: str) -> None:
    """``crm`` and ``crm`` with key ``""`` (a task's ``breaker_key`` may answer it) were
    both ``key=""``: the same series twice, which Prometheus refuses."""
    store = RedisStore.from_url(url)
    clock = FakeClock()
    fail(CircuitBreaker("crm", POLICY, storage=store, clock=clock))
    CircuitBreaker("crm", POLICY, storage=store, clock=clock, key="").call(ok)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(url, clock=clock))
    samples = scrape(registry)
    assert series(samples, "celery_breaker_state", breaker="crm", key="", state="open") == 1.0
    assert series(samples, "celery_breaker_state", breaker="crm", key='""', state="closed") == 1.0


def test_a_name_holding_a_character_that_prints_nothing_is_labelled_as_status_shows_it(url: str) -> None:
    """A name may hold a variation selector (``check_name`` allows printable text): its
    ``breaker`` label read ``billing`` on a dashboard's legend, as the plain billing's did.
    It is labelled as ``status`` shows it, as a key is."""
    store = RedisStore.from_url(url)
    clock = FakeClock()
    fail(CircuitBreaker("billing\ufe0f", POLICY, storage=store, clock=clock))
    CircuitBreaker("billing", POLICY, storage=store, clock=clock).call(ok)
    registry = CollectorRegistry()
    registry.register(BreakerCollector(url, clock=clock))
    samples = scrape(registry)
    assert series(samples, "celery_breaker_state", breaker="billing\\ufe0f", key="", state="open") == 1.0
    assert series(samples, "celery_breaker_state", breaker="billing", key="", state="closed") == 1.0
