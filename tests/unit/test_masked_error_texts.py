"""A broker's or store's error quoted as its text (a log line's ``%s``, an error's f-string):
never its password. redis-py and kombu errors may quote the URL they connect to."""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from kombu.exceptions import OperationalError

import celery_breaker
from celery_breaker.errors import StorageError
from celery_breaker.integration.deferral.delay_depth import failure_text
from celery_breaker.integration.deferral.release import Releaser
from celery_breaker.integration.throttle import Throttle
from celery_breaker.monitoring.prometheus import BreakerCollector
from celery_breaker.storage import FallbackStore, MemoryStore
from celery_breaker.storage.masking import MaskedRepr, MaskedText
from celery_breaker.storage.redis import damage
from celery_breaker.storage.redis.store import RedisStore
from celery_breaker.testing import FakeClock

REDIS_LEAK = "Error connecting to redis://:hunter2@broker.example:6379/0"
AMQP_LEAK = "[Errno 111] Connection refused: amqp://user:hunter2@host//"


def leaky_errors() -> list[BaseException]:
    """What redis-py and kombu raise, quoting the URL with its password."""
    return [ConnectionError(REDIS_LEAK), OperationalError(AMQP_LEAK)]


class Shown:
    """Every record the ``celery_breaker`` logger emits at DEBUG, as two handlers format
    it: one on the root (propagation: caplog's) and one attached to the logger itself."""

    def __init__(self, caplog: pytest.LogCaptureFixture, direct: logging.Handler, lines: list[str]) -> None:
        self.caplog = caplog
        self.direct = direct
        self.lines = lines

    def text(self) -> str:
        propagated = "\n".join(self.caplog.handler.format(record) for record in self.caplog.records)
        return propagated + "\n" + "\n".join(self.lines)


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def shown(caplog: pytest.LogCaptureFixture) -> Iterator[Shown]:
    lines: list[str] = []
    direct = _Lines(lines)
    logger = logging.getLogger("celery_breaker")
    logger.addHandler(direct)
    caplog.set_level(logging.DEBUG, logger="celery_breaker")
    try:
        yield Shown(caplog, direct, lines)
    finally:
        logger.removeHandler(direct)


def no_password(shown: Shown, *, expect: str) -> None:
    text = shown.text()
    assert expect in text, text  # (the line was emitted: the check is not vacuous)
    assert shown.lines, "the handler attached to the logger saw nothing"
    assert "hunter2" not in text


def test_masked_text_is_the_errors_text_masked_and_its_repr_masked_too() -> None:
    redis_error, amqp_error = leaky_errors()
    assert str(MaskedText(redis_error)) == "Error connecting to redis://:***@broker.example:6379/0"
    assert f"{MaskedText(amqp_error)}" == "[Errno 111] Connection refused: amqp://user:***@host//"
    assert repr(MaskedText(redis_error)) == repr(MaskedRepr(redis_error))
    assert str(MaskedText(OSError("[Errno 111] Connection refused"))) == "[Errno 111] Connection refused"


def test_masked_text_costs_nothing_on_a_line_not_emitted(caplog: pytest.LogCaptureFixture) -> None:
    class Counted:
        shown = 0

        def __str__(self) -> str:
            Counted.shown += 1
            return REDIS_LEAK

    caplog.set_level(logging.INFO, logger="celery_breaker")
    logging.getLogger("celery_breaker").debug("not emitted: %s", MaskedText(Counted()))
    assert Counted.shown == 0
    logging.getLogger("celery_breaker").info("emitted: %s", MaskedText(Counted()))
    assert Counted.shown >= 1  # (once for each handler that formats it)
    assert "emitted: Error connecting to redis://:***@broker.example" in caplog.text


def test_masked_text_of_an_error_whose_str_fails_names_its_type() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert str(MaskedText(Broken())) == "<Broken: str() failed>"


@pytest.mark.parametrize("exc", leaky_errors(), ids=["redis", "amqp"])
def test_a_store_outage_is_logged_without_the_password(exc: BaseException, shown: Shown) -> None:
    store = FallbackStore(MemoryStore("memory://down"), "local")
    store.store_failed(StorageError(f"redis store redis://:***@broker.example:6379/0: acquire failed: {exc}"), 0.0)
    no_password(shown, expect="unreachable (redis store")


@pytest.mark.parametrize("exc", leaky_errors(), ids=["redis", "amqp"])
def test_a_storage_error_made_of_a_redis_error_holds_no_password(exc: BaseException) -> None:
    text = damage.failure("redis://:***@broker.example:6379/0", "acquire", exc)
    assert text.startswith("redis store redis://:***@broker.example:6379/0: acquire failed: ")
    assert ":***@" in text.partition("failed: ")[2]
    assert "hunter2" not in text


@pytest.mark.parametrize("exc", leaky_errors(), ids=["redis", "amqp"])
def test_a_lost_transitions_channel_is_logged_without_the_password(exc: BaseException, shown: Shown) -> None:
    store = RedisStore.from_url("redis://broker.example:6379/0")  # (no connection is made)
    store.live = True
    store.go_dark(exc)
    no_password(shown, expect="lost the breaker transitions channel (")


@pytest.mark.parametrize("exc", leaky_errors(), ids=["redis", "amqp"])
def test_a_scrape_that_cannot_read_the_store_is_logged_without_the_password(exc: BaseException, shown: Shown) -> None:
    collector = BreakerCollector(MemoryStore("memory://metrics"), clock=FakeClock())
    collector._failed(exc)  # type: ignore[arg-type]
    no_password(shown, expect="cannot read breakers from memory://metrics: ")


@pytest.mark.parametrize("exc", leaky_errors(), ids=["redis", "amqp"])
def test_a_release_that_fails_for_one_breaker_is_logged_without_the_password(exc: BaseException, shown: Shown) -> None:
    # (the releaser's own method, on what it reads: a whole Releaser is a worker's thread)
    parking = SimpleNamespace(label=lambda tag: f"{tag}[7]")
    releaser = SimpleNamespace(_tag_failures=Throttle(60.0, FakeClock().monotonic), parking=parking)
    Releaser._tag_failed(releaser, "crm", exc)  # type: ignore[arg-type]
    no_password(shown, expect="cannot release the tasks parked behind crm[7] (")


@pytest.mark.parametrize("exc", leaky_errors(), ids=["redis", "amqp"])
def test_a_delay_count_that_fails_says_why_without_the_password(exc: BaseException) -> None:
    app = SimpleNamespace(
        connection_for_read=lambda: SimpleNamespace(as_uri=lambda: "amqp://user:**@host:5672//"),
    )
    text = failure_text(app, exc)
    assert text.startswith("amqp://user:**@host:5672//: ")
    assert ":***@" in text
    assert "hunter2" not in text


def test_a_traceback_logged_with_exc_info_is_masked_for_every_handler(shown: Shown) -> None:
    # (as the Redis agent logs an unexpected error: exc_info=True, the error's repr as an argument)
    try:
        raise OperationalError(AMQP_LEAK)
    except OperationalError as exc:
        logging.getLogger("celery_breaker").warning(
            "redis store agent: unexpected %r; resubscribing", MaskedRepr(exc), exc_info=True
        )
    no_password(shown, expect="Traceback (most recent call last):")
    assert "OperationalError: [Errno 111] Connection refused: amqp://user:***@host//" in shown.text()


def test_the_package_logs_on_the_logger_that_masks_tracebacks_and_no_child_of_it() -> None:
    """``MaskedTracebacks`` is a filter on the ``celery_breaker`` logger, and a logger's
    filters do not see the records its children propagate: a module logging on
    ``celery_breaker.x`` would print its tracebacks unmasked. Every logger this package
    takes is ``celery_breaker`` itself (or another library's, named)."""
    root = Path(celery_breaker.__file__).parent
    named: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger":
                where = f"{path.relative_to(root)}:{node.lineno}"
                arg = node.args[0] if node.args else None
                name = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
                named.setdefault(repr(name), []).append(where)
    ours = {name: where for name, where in named.items() if name != "None" and "celery_breaker" in name}
    assert set(ours) == {"'celery_breaker'"}, ours
    assert "None" not in named, named["None"]  # (getLogger(__name__) would make a child)
    assert len(ours["'celery_breaker'"]) > 20  # (the scan found the loggers)
    filters = logging.getLogger("celery_breaker").filters
    assert any(type(found).__name__ == "MaskedTracebacks" for found in filters)
