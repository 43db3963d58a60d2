"""The page's count of RabbitMQ's delay queues: ``celery breaker web`` on an app deferring there, in a real
headless Chromium, against a real Redis store and the session's real RabbitMQ (a vhost per test).

Runs are deferred into the vhost's delay queues by this process, as a worker defers them
(``depth_proj.defer``: broker-delay, the publish confirmed); the page's server, a
subprocess, counts them. Every wait polls the page's DOM; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from celery_breaker.storage import close_stores
from tests.integration import depth_proj
from tests.rabbitmq import RabbitMQServer, Vhost, own_vhost

from .conftest import WebProcess, breaker, request
from .test_page import INTERVAL, rows, shown, until
from .webproj import BROKER_ENV, PARK_ENV

pytestmark = pytest.mark.slow

WHERE = "in RabbitMQ's delay queues (celery_breaker_delayed_*)"
PARKED = "Parked counts tasks parked in the store;"
UNROUTABLE = (
    "and 1 in celery_breaker_delayed_unroutable: their queue was gone when they came due; move them back to it "
    "(a shovel, or the management UI) or purge that queue"
)


@pytest.fixture
def vhost(rabbitmq: RabbitMQServer) -> Iterator[Vhost]:
    """A vhost of this test's own, reached by the page's server as a user of its own whose password the
    page must never show; ``depth_proj``, which defers the runs, points at it as ``guest``."""
    with own_vhost(rabbitmq, "web", user=f"web-{secrets.token_hex(4)}", password=secrets.token_hex(12)) as own:
        depth_proj.use(f"amqp://guest:guest@127.0.0.1:{rabbitmq.port}/{own.name}", "memory://")
        try:
            yield own
        finally:
            depth_proj.use("memory://", "memory://")
            close_stores()


def delayed(browser: WebDriver) -> str:
    """The page's line about the delay queues ("" while hidden)."""
    return shown(browser, "delayed")


def test_the_page_counts_the_tasks_in_rabbitmqs_delay_queues_over_one_kept_connection(
    browser: WebDriver, store_url: str, vhost: Vhost, rabbitmq: RabbitMQServer
) -> None:
    # On RabbitMQ the Parked column reads 0 while the tasks wait in its delay queues: the
    # page said nothing of them (status did, and the metrics).
    password = vhost.url.split("@")[0].rsplit(":", 1)[1]
    user = vhost.url.split("//")[1].split(":")[0]
    breaker(store_url, "partner-api").force_open()
    depth_proj.defer((100, 1000))
    with WebProcess(store_url, "--interval", INTERVAL, env={BROKER_ENV: vhost.url}) as web:
        browser.get(web.url)
        until(browser, lambda: "partner-api" in rows(browser), "the breaker")
        two = f"{PARKED} 2 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}."
        until(browser, lambda: delayed(browser) == two, "the two tasks waiting in RabbitMQ")
        assert "alert" not in str(browser.find_element(By.ID, "delayed").get_attribute("class"))

        depth_proj.defer((3600,))
        depth_proj.strand(vhost.url, 1)
        three = f"{PARKED} 3 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}, {UNROUTABLE}."
        until(browser, lambda: delayed(browser) == three, "the count refreshed with the board, the unroutable one")
        assert "alert" in str(browser.find_element(By.ID, "delayed").get_attribute("class"))
        status, view = request(web.url + "api/breakers")
        assert status == 200
        assert view["delay_queues"] == {"delayed": 3, "unroutable": 1, "error": None, "fallback": False, "text": three}
        assert [row["label"] for row in view["breakers"]] == ["partner-api"]
        # Counted every 0.2 s over one connection, kept: the page's server holds one on the vhost.
        # (The runs were deferred as guest.)
        assert [found["user"] for found in rabbitmq.connections(vhost.name)].count(user) == 1

        # RabbitMQ closes it (a restart, say): the next count goes over a new one.
        rabbitmq.rabbitmqctl("close_all_connections", "--vhost", vhost.name, "closed by the test")
        depth_proj.defer((5000,))  # (a new connection of this process's own)
        four = three.replace("3 deferred tasks", "4 deferred tasks")
        until(browser, lambda: delayed(browser) == four, "the count again, over a new connection")

        # RabbitMQ frozen: the count gives up in its timeout and says so, the password masked;
        # the store is read all along (a thread of its own counts), and the page follows it.
        with rabbitmq.paused():
            masked = f"amqp://{user}:**@127.0.0.1:{rabbitmq.port}/{vhost.name}"
            not_counted = (
                f"{PARKED} this app's deferred tasks wait {WHERE}, not counted: {masked}: no answer (timed out); "
                "retrying."
            )
            breaker(store_url, "billing").force_open()
            until(browser, lambda: delayed(browser) == not_counted, "the count's failure", timeout=20)
            until(browser, lambda: rows(browser).get("billing", {}).get("state") == "forced_open", "the store's news")
            assert request(web.url + "api/breakers")[1]["delay_queues"]["error"] == f"{masked}: no answer (timed out)"
            assert password not in browser.page_source
    assert web.process.returncode == 0
    assert password not in web.stdout + web.stderr()
    assert (
        f"celery-breaker web: cannot count the deferred tasks in RabbitMQ's delay queues ({masked}: no answer "
        "(timed out)); the page says it is not counted, trying again in 30 s"
    ) in web.stderr()


def test_an_app_parking_in_its_store_shows_the_delay_queues_only_when_tasks_wait_there(
    browser: WebDriver, store_url: str, vhost: Vhost
) -> None:
    # breaker_park=True: parked in the store; in the delay queues only what parking did not
    # take (its store down). Nothing to say while none wait there.
    breaker(store_url, "partner-api").force_open()
    with WebProcess(store_url, "--interval", INTERVAL, env={BROKER_ENV: vhost.url, PARK_ENV: "true"}) as web:
        browser.get(web.url)
        until(browser, lambda: "partner-api" in rows(browser), "the breaker")
        assert request(web.url + "api/breakers")[1]["delay_queues"] is None
        assert delayed(browser) == ""
        depth_proj.defer((100, 1000))
        line = (
            f"{PARKED} 2 deferred tasks (all breakers, all apps on the vhost) wait {WHERE}, where this app defers "
            "the tasks it cannot park (its store down, say)."
        )
        until(browser, lambda: delayed(browser) == line, "the tasks its store could not take")
        assert request(web.url + "api/breakers")[1]["delay_queues"]["fallback"] is True


def test_an_app_deferring_by_countdown_says_where_its_tasks_wait(browser: WebDriver, store_url: str) -> None:
    # No count to show (countdown messages are held by the workers), but the Parked column
    # reads 0 for them: the page says where they are, as `status` and `watch` do.
    breaker(store_url, "partner-api").force_open()
    with WebProcess(store_url, "--interval", INTERVAL, env={BROKER_ENV: store_url, PARK_ENV: "false"}) as web:
        browser.get(web.url)
        until(browser, lambda: "partner-api" in rows(browser), "the breaker")
        line = (
            f"{PARKED} this app's deferred tasks wait as countdown messages in the broker, held by workers until "
            "they are due."
        )
        until(browser, lambda: delayed(browser) == line, "where the countdown app's tasks wait")
        assert "alert" not in str(browser.find_element(By.ID, "delayed").get_attribute("class"))
        assert request(web.url + "api/breakers")[1]["delay_queues"]["text"] == line
