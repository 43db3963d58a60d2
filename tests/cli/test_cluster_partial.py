"""A Redis Cluster with one primary down (``cluster-require-full-coverage no``): every
operator surface shows the breakers the other primaries hold, and says what it left out.

Before, ``celery breaker status``, ``watch``, the web page and the metrics scrape failed
whole (exit 69, ``store_up 0``) when any one primary was down: at the moment an operator
most needs to see the breakers the healthy nodes serve.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from celery_breaker import CircuitBreaker
from celery_breaker.errors import StorageError
from celery_breaker.monitoring import collect_metrics
from celery_breaker.monitoring.prometheus import BreakerCollector
from celery_breaker.ops import control
from celery_breaker.ops.board import Board
from celery_breaker.ops.cli import EXIT_UNAVAILABLE
from celery_breaker.ops.watch import Watch, watch_frame
from celery_breaker.storage import Listing, flush_stores
from celery_breaker.storage.redis import RedisStore
from celery_breaker.storage.redis import listing as listing_module
from celery_breaker.testing import FakeClock
from tests.servers import RedisCluster

from ..storage.conftest import unique_prefix
from . import cliproj
from .conftest import run

pytestmark = pytest.mark.slow


@dataclass
class Partial:
    url: str
    victim: str
    """host:port of the primary that is down."""
    served: list[str]
    """The breakers the other primaries hold."""
    lost: list[str]
    """The breakers stored on the victim."""
    parked: str
    """A breaker on a live primary with two tasks parked behind it."""
    ghost: str
    """A breaker with nothing but three parked tasks left, on a live primary."""
    label_key: str
    """A key of per-key breaker ``crm`` stored on a live primary whose label, read as a
    key-less breaker's name (``crm[KEY]``), hashes to the victim."""
    watch: Watch
    """A watch that read the whole cluster before the primary went down."""

    @property
    def shown(self) -> list[str]:
        """The names a listing shows: the other primaries' breakers, ``crm`` (its key's),
        and the ghost, as a new breaker with its parked tasks."""
        return sorted([*self.served, "crm", self.ghost])


@pytest.fixture(scope="module")
def partial() -> Iterator[Partial]:
    with RedisCluster() as cluster:
        cluster.start()
        for node in cluster.nodes:
            node.admin().config_set("cluster-require-full-coverage", "no")
        url = f"{cluster.url}?key_prefix={unique_prefix()}"
        store = RedisStore.from_url(url)
        client: Any = store.client()
        parking = store.parking

        def home(name: str, key: str | None = None) -> str:
            return str(client.get_node_from_key(store.keys_for(name, key)[0]).name)

        # (the victim holds no key of the parking's own: its index answers)
        index_home = client.get_node_from_key(parking.index).name
        victim = next(node.name for node in client.get_primaries() if node.name != index_home)
        homes: dict[str, str] = {}
        n = 0
        while n < 9 or len(set(homes.values())) < len(cluster.nodes):  # (some on every primary)
            name = f"crm{n}"
            CircuitBreaker(name, storage=store).call(lambda: None)
            homes[name] = home(name)
            n += 1
        served = sorted(name for name, where in homes.items() if where != victim)
        parked = served[0]
        CircuitBreaker(parked, storage=store).force_open()
        for task in range(2):
            parking.park(parked, None, f"t-{task}:1", float(task), "payload", None)
        ghost = next(f"ghost{n}" for n in itertools.count() if home(f"ghost{n}") != victim)
        for task in range(3):
            parking.park(ghost, None, f"g-{task}:1", float(task), "payload", None)
        label_key = next(
            f"t{n}" for n in itertools.count() if home(f"crm[t{n}]") == victim and home("crm", f"t{n}") != victim
        )
        CircuitBreaker("crm", storage=store, key=label_key).call(lambda: None)
        flush_stores()
        watch = Watch(FakeClock())
        assert len(watch.observe(collect_metrics(store))) == len(homes) + 2  # (and crm[KEY], ghost)
        store.close()
        next(node for node in cluster.nodes if victim.endswith(f":{node.port}")).kill()
        lost = sorted(set(homes) - set(served))
        yield Partial(url, victim, served, lost, parked, ghost, label_key, watch)


@pytest.fixture
def app_store(partial: Partial) -> Iterator[str]:
    cliproj.use_store(partial.url)
    yield partial.url
    cliproj.use_store("memory://")


def test_a_listing_holds_the_other_primaries_breakers_and_names_the_one_down(
    partial: Partial, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listing_module, "_TOLD", {})  # (told once a minute: this store not yet)
    store = RedisStore.from_url(partial.url)
    with caplog.at_level(logging.DEBUG, logger="celery_breaker"):
        rows = collect_metrics(store)
        again = collect_metrics(store)
    store.close()
    assert isinstance(rows, Listing)
    assert rows.unreached == (partial.victim,)
    assert [row.snapshot.name for row in rows] == partial.shown
    counted = {row.snapshot.name: (row.snapshot.state.value, row.parked) for row in rows}
    assert counted[partial.parked] == ("forced_open", 2)  # (its parked tasks counted)
    assert counted[partial.ghost] == ("closed", 3)  # (parked tasks alone, on a primary that answers)
    assert rows.stranded is not None
    assert [rows.stranded(name, None) for name in (*partial.lost, *partial.served)] == [True] * len(partial.lost) + [
        False
    ] * len(partial.served)
    assert again.unreached == rows.unreached
    told = [r for r in caplog.records if "cluster primaries" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.WARNING, logging.DEBUG]  # (a watch lists every few seconds)
    assert f"listed the breakers of 2 of 3 cluster primaries; left out those stored on {partial.victim}" in (
        told[0].getMessage()
    )


def test_status_shows_what_it_read_warns_of_the_rest_and_exits_69(partial: Partial, app_store: str) -> None:
    result = run("status")
    assert result.exit_code == EXIT_UNAVAILABLE, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()[1:] if line and not line[0].isdigit()]
    assert names == partial.shown
    assert f"Warning: the breakers stored on {partial.victim} are not shown: it does not answer" in result.stderr
    as_json = run("status", "--json")
    assert as_json.exit_code == EXIT_UNAVAILABLE
    assert [row["name"] for row in json.loads(as_json.stdout)] == partial.shown  # (stdout stays JSON)
    assert partial.victim in as_json.stderr


def test_a_pattern_matching_none_of_what_status_read_says_so(partial: Partial, app_store: str) -> None:
    # `status b3` of a breaker on the primary down read "No breaker matches b3 (11 in ...)",
    # as if it were not there.
    result = run("status", partial.lost[0])
    assert result.exit_code == EXIT_UNAVAILABLE
    assert result.stdout.startswith(f"No breaker matches {partial.lost[0]} ({len(partial.shown)} read in ")
    assert f"the breakers stored on {partial.victim} are not shown" in result.stderr


def test_a_watch_keeps_the_last_view_of_the_breakers_it_cannot_reach(partial: Partial) -> None:
    store = RedisStore.from_url(partial.url)
    watch = partial.watch
    rows = watch.observe(collect_metrics(store))
    store.close()
    assert sorted(row.status.snapshot.name for row in rows) == sorted(partial.shown + partial.lost)
    assert [row.rates for row in rows if row.status.snapshot.name in partial.lost] == [None] * len(partial.lost)
    assert not [change for change in watch.changes if change.reason == "left the store"]
    frame = watch_frame(rows, watch, store="cluster", interval=1.0)
    assert "part of the store unreachable at" in frame
    assert f"the breakers stored on {partial.victim} keep their last view" in frame


def test_a_scrape_exports_the_breakers_it_read_and_counts_the_primary_down(partial: Partial) -> None:
    store = RedisStore.from_url(partial.url)
    families = {family.name: family for family in BreakerCollector(store).collect()}
    store.close()
    assert [sample.value for sample in families["celery_breaker_store_up"].samples] == [1.0]
    assert [sample.value for sample in families["celery_breaker_store_unreached_servers"].samples] == [1.0]
    exported = {sample.labels["breaker"] for sample in families["celery_breaker_state"].samples}
    assert exported == set(partial.shown)


def test_the_web_page_says_which_primary_it_could_not_read(partial: Partial) -> None:
    store = RedisStore.from_url(partial.url)
    board = Board(lambda: collect_metrics(store), store="cluster", interval=1.0, clock=FakeClock())
    board.refresh(raising=True)
    view = board.view()
    store.close()
    assert [row["name"] for row in view["breakers"]] == partial.shown
    assert view["error"].startswith("part of the store unreachable at ")
    assert f"the breakers stored on {partial.victim} keep their last view" in view["error"]


def test_an_operator_names_a_breaker_on_a_live_primary_by_its_label(partial: Partial, app_store: str) -> None:
    # `open 'crm[KEY]'` first asks whether a key-less breaker of that name exists: that
    # name hashes to the primary that is down, and the command failed with exit 69 while
    # `open crm --key KEY` worked on the same breaker.
    label = f"crm[{partial.label_key}]"
    opened = run("open", label)
    assert opened.exit_code == 0, opened.output
    assert opened.stdout.startswith(f"{label}: forced_open (was closed)")
    closed = run("close", label, "--yes")
    assert closed.exit_code == 0, closed.output


def test_inspect_breakers_says_what_it_left_out(partial: Partial, app_store: str) -> None:
    # The worker's reply was the list alone: a reader took the part for the whole.
    state = SimpleNamespace(consumer=SimpleNamespace(app=cliproj.app, controller=None))
    reply = control.breakers(state)
    assert isinstance(reply, dict)
    assert [row["name"] for row in reply["breakers"]] == partial.shown
    assert reply["unreached"] == [partial.victim]
    assert reply["warning"].startswith(f"the breakers stored on {partial.victim} are not shown")


def test_a_cluster_client_that_knows_no_primary_is_made_again(
    partial: Partial, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py 5.1 forgets every node once none answered (a blip of the whole cluster):
    # the listing looped over no primary and listed an empty store for good.
    store = RedisStore.from_url(partial.url)
    forgetful: Any = store.client()
    monkeypatch.setattr(forgetful, "get_primaries", list)
    with pytest.raises(StorageError, match="the cluster client knows no primary"):
        collect_metrics(store)
    assert store.client() is not forgetful
    assert [row.snapshot.name for row in collect_metrics(store)] == partial.shown
    store.close()


def test_a_node_that_refuses_its_keys_while_it_answers_scan_fails_only_its_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # For about two seconds after a primary restarts empty it answers SCAN but refuses
    # its keys (CLUSTERDOWN): the parking's count of its breakers failed every listing
    # whole (store_up 0, status exit 69). Made here as that node is then: empty, serving
    # no slot.
    with RedisCluster() as cluster:
        cluster.start()
        for node in cluster.nodes:
            node.admin().config_set("cluster-require-full-coverage", "no")
        store = RedisStore.from_url(f"{cluster.url}?key_prefix={unique_prefix()}")
        client: Any = store.client()
        parking = store.parking
        index_home = client.get_node_from_key(parking.index).name
        homes: dict[str, str] = {}
        for n in itertools.count():  # (tasks parked behind breakers on every primary)
            parking.park(f"g{n}", None, f"t{n}:1", 1.0, "payload", None)
            homes[f"g{n}"] = client.get_node_from_key(store.keys_for(f"g{n}", None)[0]).name
            if n >= 8 and len(set(homes.values())) == len(cluster.nodes):
                break
        victim = next(node for node in cluster.nodes if not index_home.endswith(f":{node.port}"))
        admin: Any = victim.admin()
        admin.flushall()
        admin.execute_command("CLUSTER", "FLUSHSLOTS")
        refusing = sorted(name for name, home in homes.items() if home.endswith(f":{victim.port}"))
        with caplog.at_level(logging.WARNING, logger="celery_breaker"):
            rows = collect_metrics(store)
        store.close()
    assert [(row.snapshot.name, row.parked) for row in rows] == [
        (name, 1) for name in sorted(set(homes) - set(refusing))
    ]
    (warning,) = [r.getMessage() for r in caplog.records if "could not count" in r.getMessage()]
    assert f"could not count the tasks parked behind {len(refusing)} breaker(s)" in warning


def test_a_node_that_refuses_is_asked_once_for_all_its_breakers_counts(
    partial: Partial, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When the counts' pipeline failed, each breaker was counted on its own, and a node
    # that hangs made each of its breakers wait out the client's timeout: a listing of
    # many breakers took seconds to fail. One refusal stands for the node's other breakers.
    store = RedisStore.from_url(partial.url)
    client: Any = store.client()
    parking = store.parking
    on_victim = [
        tag
        for tag in (parking.tag(f"v{n}", None) for n in range(200))
        if client.get_node_from_key(tag + ":q").name == partial.victim
    ][:5]
    served = [parking.tag(name, None) for name in partial.served]
    asked: list[str] = []
    count = parking.count

    def counting(tag: str) -> tuple[int, int]:
        asked.append(tag)
        return count(tag)

    monkeypatch.setattr(parking, "count", counting)
    counted = parking.counts([*on_victim, *served])
    store.close()
    assert len(on_victim) == 5
    assert sorted(counted) == sorted(served)
    assert len([tag for tag in asked if tag in on_victim]) == 1
