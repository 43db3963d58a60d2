"""The one rule for breaker names and keys, and labels that read back as the breaker they name (Hypothesis)."""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
import uuid

import pytest
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_breaker import BreakerTask, CircuitBreaker, ConfigurationError
from celery_breaker.errors import BreakerKeyError
from celery_breaker.integration.inventory import check_app
from celery_breaker.integration.settings import build_settings
from celery_breaker.labels import LABEL_MARKS, breaker_label, read_visible, shown_label, split_label, visible
from celery_breaker.names import MAX_KEY_LENGTH, MAX_NAME_LENGTH, check_key, check_name, kept_key, key_text
from celery_breaker.testing import fresh_store


def valid(name: str) -> bool:
    try:
        check_name(name)
    except ConfigurationError:
        return False
    return True


#: Any Unicode text the rule accepts as a name.
NAMES = st.text(min_size=1, max_size=MAX_NAME_LENGTH).filter(valid)
#: Any key at all: a task computes its keys from its arguments.
KEYS = st.none() | st.text(max_size=300)


@settings(max_examples=500, deadline=None)
@given(NAMES, KEYS)
def test_every_label_reads_back_as_the_breaker_it_names(name: str, key: str | None) -> None:
    assert split_label(breaker_label(name, key)) == (name, key)


@settings(max_examples=300, deadline=None)
@given(NAMES, KEYS, NAMES, KEYS)
def test_two_breakers_never_share_a_label(name: str, key: str | None, other: str, other_key: str | None) -> None:
    if (name, key) != (other, other_key):
        assert breaker_label(name, key) != breaker_label(other, other_key)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1), st.sampled_from(LABEL_MARKS), st.text())
def test_a_name_holding_a_bracket_is_refused(before: str, mark: str, after: str) -> None:
    with pytest.raises(ConfigurationError):
        check_name(before + mark + after)


def test_the_ambiguous_labels_of_before_cannot_be_made() -> None:
    """Breaker ``v[2]`` with key ``k`` read back as breaker ``v`` with key ``2][k``; and
    ``L[K]`` (a name) and ``L`` with key ``K`` were both ``L[K]``."""
    with pytest.raises(ConfigurationError, match=r"'v\[2\]' holds '\['.*e\.g\. 'v\(2\)'"):
        CircuitBreaker("v[2]", storage=fresh_store(), key="k")
    with pytest.raises(ConfigurationError, match="brackets"):
        check_name("L[K]", "breaker_policies key 'L[K]'")
    assert split_label("L[K]") == ("L", "K")


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "non-empty"),
        (" crm", "whitespace"),
        ("crm\n", "whitespace"),
        ("c\x00rm", "control character"),
        ("c\u2028rm", "control character"),
        ("x" * (MAX_NAME_LENGTH + 1), f"at most {MAX_NAME_LENGTH}"),
        ("crm]", "brackets"),
        ("crm\udcff", "not UTF-8"),  # (a byte that is not UTF-8 in a command line, decoded with surrogateescape)
    ],
)
def test_a_bad_name_is_refused_naming_where_it_came_from(name: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as info:
        check_name(name, "breaker_routes['tasks.*']")
    assert str(info.value).startswith("breaker_routes['tasks.*']")


def test_the_rule_holds_for_tasks_settings_and_the_api_alike() -> None:
    app = Celery("names", set_as_current=False)
    app.conf.update(breaker_storage_url="memory://names")

    @app.task(base=BreakerTask, shared=False, name="names.bracketed", breaker="crm[eu]")
    def bracketed() -> None: ...

    with pytest.raises(ConfigurationError, match=r"task 'names\.bracketed': the breaker option"):
        check_app(app)
    app.conf.update(breaker_routes={"names.*": "bad\nname"})
    with pytest.raises(ConfigurationError, match=r"breaker_routes\['names\.\*'\]"):
        build_settings(app.conf)
    with pytest.raises(ConfigurationError, match="CircuitBreaker name"):
        CircuitBreaker("a" * (MAX_NAME_LENGTH + 1), storage=fresh_store())


@pytest.mark.parametrize("key", ["", " tenant", "tenant\t", "a\x7fb"])
def test_an_operators_key_must_be_printable_text(key: str) -> None:
    with pytest.raises(BreakerKeyError):
        check_key(key)


@settings(max_examples=500, deadline=None)
@given(
    st.text(max_size=60)
    | st.from_regex(r"\A[ \\n\"x]{0,6}\Z")
    | st.from_regex("\\A[a\u034f\u3164\ufe0f\U000e0101\\\\u]{0,6}\\Z")
)
def test_what_visible_shows_is_printable_and_reads_back_as_the_text(text: str) -> None:
    # What `status` shows of a key is what an operator types to name it: any key, control
    # characters, backslashes, surrounding spaces and the empty key included, and no two
    # keys look alike.
    shown = visible(text)
    assert shown.isprintable()
    assert not any(char in shown for char in "\u034f\u3164\ufe0f\U000e0101")  # (each printable, showing nothing)
    assert shown == shown.strip()
    read = read_visible(shown)
    assert (shown if read is None else read) == text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("a\nb", "a\\nb"),  # a newline
        ("a\\nb", "a\\\\nb"),  # a backslash and an n: shown unlike the newline
        ("t\x1b]0;owned\x07", "t\\x1b]0;owned\\x07"),
        ("C:\\tmp", "C:\\\\tmp"),
        ("tenant-7", "tenant-7"),
        (" x ", "\\x20x\\x20"),  # spaces at its ends, which a terminal hides
        ("", '""'),
        ('""', "\\x22\\x22"),  # (not the empty key)
        # Printable, but showing nothing: "tenant-7" and these read alike on the page,
        # in `status` and in a metric's label.
        ("tenant-7\ufe0f", "tenant-7\\ufe0f"),  # a variation selector
        ("tenant-7\u034f", "tenant-7\\u034f"),  # the combining grapheme joiner
        ("tenant-7\U000e0101", "tenant-7\\U000e0101"),  # a variation selector beyond the BMP
        ("x\u3164", "x\\u3164"),  # a Hangul filler
        ("te\u0301", "te\u0301"),  # a combining accent shows: kept
    ],
)
def test_visible_escapes_control_characters_and_doubles_backslashes(text: str, shown: str) -> None:
    assert visible(text) == shown
    assert read_visible(shown) == (None if shown == text else text)


@pytest.mark.parametrize("typed", ["plain", "a\\", "a\\x4", "a\\q", "a\\x41", "tab\there"])
def test_a_text_visible_never_shows_reads_as_nothing(typed: str) -> None:
    # (a lone or unknown escape, an escape of a printable character, a raw control character)
    assert read_visible(typed) is None


def test_no_log_line_carries_a_raw_control_character_from_a_key(caplog: pytest.LogCaptureFixture) -> None:
    # A key from a task's arguments reaches the transition line, and any other line that
    # names the breaker: a newline there could forge the next line, an escape drive the
    # terminal tailing the log.
    key = "t\x1b[2J\n7"
    breaker = CircuitBreaker("crm", {"failure_threshold": 1}, storage=fresh_store(), key=key)
    with caplog.at_level(logging.INFO, logger="celery_breaker"):
        with contextlib.suppress(ConnectionError):
            breaker.call(_down)
        logging.getLogger("celery_breaker").warning("any line: %s", f"crm[{key}]")
        logging.getLogger("celery_breaker").warning("a block of our own:\n%s", ConfigurationError("one\ntwo"))
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("breaker crm[t\\x1b[2J\\n7] closed -> open") for line in lines), lines
    assert "any line: crm[t\\x1b[2J\\n7]" in lines
    assert lines[-1] == "a block of our own:\none\ntwo"  # (its own line breaks are kept)
    assert all(line.isprintable() for line in lines[:-1])
    transition = next(record for record in caplog.records if "closed -> open" in record.getMessage())
    assert transition.__dict__["breaker_key"] == key  # (structured fields keep the key as it is)


def _down() -> None:
    raise ConnectionError("down")


def test_a_key_too_long_to_keep_is_kept_as_its_start_and_a_digest_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        first = kept_key("kept-key-test", "k" * 300)
        second = kept_key("kept-key-test", "k" * 301)
        assert kept_key("kept-key-test", "k" * 300) == first  # (stable: the same breaker every time)
    assert first is not None
    assert second is not None
    assert len(first) == len(second) == MAX_KEY_LENGTH
    assert first != second
    assert first.startswith("k" * 183 + "~")
    warnings = [r.getMessage() for r in caplog.records if "kept-key-test" in r.getMessage()]
    assert len(warnings) == 1  # once per breaker name
    assert "a key of 300 characters is kept as" in warnings[0]
    assert kept_key("kept-key-test", "k" * MAX_KEY_LENGTH) == "k" * MAX_KEY_LENGTH
    assert kept_key("kept-key-test", None) is None


@pytest.mark.parametrize(
    ("name", "key", "shown"),
    [
        ("crm", None, "crm"),
        ("crm", "tenant-7", "crm[tenant-7]"),
        ("crm", "", 'crm[""]'),
        ("crm", " sp ", "crm[\\x20sp\\x20]"),
        ('we"ird\\name', "a\nb", 'we"ird\\\\name[a\\nb]'),
    ],
)
def test_a_label_is_shown_with_its_name_and_key_as_status_shows_them(name: str, key: str | None, shown: str) -> None:
    assert shown_label(breaker_label(name, key)) == shown


@pytest.mark.parametrize("key", [123, b"tenant-7", 1.5, ("a",)])
def test_a_key_that_is_not_text_is_refused_naming_it(key: object) -> None:
    """``CircuitBreaker(..., key=tenant_id)`` with an int raised ``TypeError: object of type
    'int' has no len()``; a bytes key passed on the memory store and raised ``TypeError:
    can only concatenate str (not "bytes") to str`` on Redis. Now one error, naming the key
    and the fix, on every store."""
    with pytest.raises(ConfigurationError) as info:
        CircuitBreaker("crm", storage=fresh_store(), key=key)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("CircuitBreaker key of breaker 'crm' must be a str (or None: no key), got ")
    assert repr(key) in message
    assert "pass str(key)" in message
    # (the advice BreakerTask's rule gives, decision 108: it no longer str()s anything it is given)
    assert "for a whole number or a UUID" in message
    assert "as a BreakerTask does" not in message
    with pytest.raises(BreakerKeyError, match=r"is no text \("):
        check_key(key)  # type: ignore[arg-type]


class _Region(str, enum.Enum):
    EU = "eu"


class _Tier(enum.IntEnum):
    GOLD = 7


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("tenant-7", "tenant-7"),
        (_Region.EU, "eu"),  # (str() is 'Region.EU', its format() 'eu' or not by Python version)
        (7, "7"),
        (_Tier.GOLD, "7"),  # (str() is 'Tier.GOLD' on Python 3.10, '7' on 3.11)
        (-(10**30), "-1000000000000000000000000000000"),
        (uuid.UUID(int=7), "00000000-0000-0000-0000-000000000007"),
    ],
)
def test_a_key_functions_value_is_read_as_the_same_plain_text_everywhere(value: object, text: str) -> None:
    found = key_text(value, "task 'job': breaker_key")
    assert found == text
    assert type(found) is str


@pytest.mark.parametrize("value", [None, object(), ("a", 1), 7.0, True, b"tenant"])
def test_a_value_that_is_no_key_is_refused_naming_where_it_came_from(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"^task 'job': breaker_key returned .*; return the key as a str"):
        key_text(value, "task 'job': breaker_key")


def test_a_whole_number_too_long_to_write_as_text_is_refused_naming_where_it_came_from() -> None:
    """Python refuses to write an int of more than ``sys.get_int_max_str_digits()`` digits
    (4300 by default): ``ValueError: Exceeds the limit``, which failed the run naming
    neither the task nor ``breaker_key``."""
    if not hasattr(sys, "get_int_max_str_digits"):  # (Pythons before the limit write any)
        pytest.skip("no limit on int to str conversion")
    with pytest.raises(
        ConfigurationError, match=r"^task 'job': breaker_key returned a whole number of more digits than Python writes"
    ):
        key_text(10 ** (sys.get_int_max_str_digits() + 1), "task 'job': breaker_key")
