"""Secrets in free text masked by their shape (``storage.masking.masked_in_text``), and
what is left as it is. How a breaker's logs use it: ``test_health_checks.py``."""

from __future__ import annotations

import pytest

from celery_breaker.storage.masking import MaskedRepr, masked_in_text

# -- adversarial texts -------------------------------------------------------------
# Each regex is linear: worst cases measured on these, not asserted (a timed assertion
# fails on a busy machine). The commits that changed the rules give the figures.


@pytest.mark.parametrize(
    "text",
    [
        "x" * 1990 + " https://shop:s3cr3t-pw@payments.example/charge",  # (cut in its last word)
        "token" * 400,
        "a:" * 1000,
        "a:@" * 700,
        "@" * 2000,
        "password: " * 250,
        "\\'" * 1000,
        "user:" + "a" * 1990 + "@",
        "https://" + "a@" * 1000,
        "a=b password: s3cr3t " * 140,
        "(password: s3cr3t)" * 120,
        "Cookie: " + "a=s3cr3t;" * 220,
        "password='" + "\\" * 2000,
    ],
)
def test_an_adversarial_text_is_masked_as_it_should_be(text: str) -> None:
    shown = masked_in_text(text)
    assert "s3cr3t" not in shown
    assert len(shown) <= 2_003


def test_a_text_cut_keeps_its_first_words_and_drops_the_one_it_cut() -> None:
    assert masked_in_text("word " * 500) == "word " * 400 + "..."
    assert masked_in_text("ab " + "x" * 2100) == "ab ..."
    assert masked_in_text("x" * 2100) == "..."


# -- URLs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A URL with user info had every query option masked (describe_url's rule for a
        # store's URL, whose options are all known): only the secret-named ones are now.
        ("https://u:s3cr3t@api.example/v1?region=eu&page=2 401", "https://u:***@api.example/v1?region=eu&page=2 401"),
        ("https://u:s3cr3t@api.example/v1?access_token=s3cr3t&region=eu",
         "https://u:***@api.example/v1?access_token=***&region=eu"),
        ("amqp://guest:s3cr3t@mq:5672//?heartbeat=30 refused", "amqp://guest:***@mq:5672//?heartbeat=30 refused"),
        # A query's key, signature, credential or auth (none was masked, with user info or not).
        ("GET https://maps.example/geo?key=AIzaS3cr3t&q=x: 403", "GET https://maps.example/geo?key=***&q=x: 403"),
        ("https://b.s3.example/o?X-Amz-Credential=AKIAS3CR3T&X-Amz-Signature=s3cr3t&X-Amz-Expires=60",
         "https://b.s3.example/o?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"),
        ("https://acct.blob.example/c/b?sv=2022-11-02&sig=s3cr3t%3D", "https://acct.blob.example/c/b?sv=2022-11-02&sig=***"),
        ("https://db.example/x.json?auth=s3cr3t", "https://db.example/x.json?auth=***"),
    ],
)  # fmt: skip
def test_a_urls_user_info_and_secret_named_options_are_masked_and_its_others_kept(text: str, shown: str) -> None:
    assert masked_in_text(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "GET https://api.example/v1?region=eu&page=2: 503",
        "https://api.example/v1?monkey=1&sortkey=name&keys=3 (from bob@example.com)",
        "the key=value form; sig=1 of 3",
    ],
)
def test_a_url_or_text_with_no_secret_is_left_as_it_is(text: str) -> None:
    assert masked_in_text(text) == text


# -- user info with no scheme ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("cannot log in as admin:s3cr3t@10.0.0.5:5672", "cannot log in as admin:***@10.0.0.5:5672"),
        ("ConnectionError('guest:s3cr3t@mq.example:5672/vhost refused')",
         "ConnectionError('guest:***@mq.example:5672/vhost refused')"),
        ("Error connecting to :s3cr3t@127.0.0.1:6379.", "Error connecting to :***@127.0.0.1:6379."),
        ("(admin:p@ss:s3cr3t@[::1]:5672)", "(admin:***@[::1]:5672)"),
    ],
)  # fmt: skip
def test_user_info_with_no_scheme_is_masked(text: str, shown: str) -> None:
    assert masked_in_text(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "mail to bob@example.com failed: 550",
        "<mailto:bob@example.com> bounced (To:alice@example.com)",
        "pull nginx:1.25@sha256:0e8f5a3b9c1d2e4f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f failed",
        "git@github.com:org/repo.git: ssh admin@10.0.0.5:22 refused at 12:30",
    ],
)
def test_an_address_with_no_user_info_is_left_as_it_is(text: str) -> None:
    assert masked_in_text(text) == text


# -- quoted values -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A repr quoting text that holds both quotes escapes its own: the value was cut
        # at the backslash, and the rest of the password shown.
        (r"""ConnectionError('connect(password=\'s3cr3t pw\', db="x")')""",
         r"""ConnectionError('connect(password=\'***\', db="x")')"""),
        (r"""ValueError('bad {\'password\': \'s3cr3t pw\', "n": 1}')""",
         r"""ValueError('bad {\'password\': \'***\', "n": 1}')"""),
        # An escaped quote in a quoted value ended it.
        (r"""{"password": "s3\"cr3t pw", "user": "x"}""", r"""{"password": "***", "user": "x"}"""),
        (r"""connect(password='it\'s s3cr3t') failed""", r"""connect(password='***') failed"""),
        # A bytes value: its "b" was taken for the value.
        ("connect(password=b's3cr3t pw') failed", "connect(password=b'***') failed"),
        ("{'password': b's3cr3t pw'}", "{'password': b'***'}"),
    ],
)  # fmt: skip
def test_a_quoted_value_is_masked_to_its_closing_quote(text: str, shown: str) -> None:
    assert masked_in_text(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        """it's the user's 'password' field, and "token" says 'expired'""",
        r"""the 'password\' key is missing; max_tokens=100""",
    ],
)
def test_quoted_text_with_no_secret_is_left_as_it_is(text: str) -> None:
    assert masked_in_text(text) == text


def test_a_failures_repr_quoting_both_quotes_is_masked() -> None:
    # What a breaker's DEBUG "recorded failure" line shows: the exception's repr.
    failure = ConnectionError("""connect(host='db', password='s3cr3t pw', note="x") failed""")
    assert repr(failure).count("\\'") == 4  # (its repr escapes its single quotes)
    shown = r"""ConnectionError('connect(host=\'db\', password=\'***\', note="x") failed')"""
    assert repr(MaskedRepr(failure)) == shown


# -- cookies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("401 with Cookie: session=s3cr3t; theme=dark", "401 with Cookie: session=***; theme=***"),
        ("HTTPError('Set-Cookie: sid=s3cr3t==; Path=/; HttpOnly')",
         "HTTPError('Set-Cookie: sid=***; Path=***; HttpOnly')"),
        ('cookie:sid="s3cr3t"; lang=en\nnext line', "cookie:sid=***; lang=***\nnext line"),
        ("{'Cookie': 'sid=s3cr3t; theme=dark', 'Accept': '*/*'}", "{'Cookie': '***', 'Accept': '*/*'}"),
        ('{"set-cookie": "sid=s3cr3t; Path=/"}', '{"set-cookie": "***"}'),
    ],
)  # fmt: skip
def test_a_cookie_headers_values_are_masked(text: str, shown: str) -> None:
    assert masked_in_text(text) == shown


@pytest.mark.parametrize("text", ["the Cookie header is missing", "accept the cookie banner; cookies=3", "Cookie:"])
def test_a_cookie_named_with_no_value_is_left_as_it_is(text: str) -> None:
    assert masked_in_text(text) == text


# -- name: value -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A pair opening the text, a line (YAML's, a repr's "\n"), a mapping or a string.
        ("password: s3cr3t", "password: ***"),
        ("db:\n  host: pg\n  password: s3cr3t\n", "db:\n  host: pg\n  password: ***\n"),
        (r"ValueError('db:\n  password: s3cr3t\n  host: pg')", r"ValueError('db:\n  password: ***\n  host: pg')"),
        ("{password: s3cr3t, user: bob}", "{password: ***, user: bob}"),
        ("login failed (api_key: s3cr3t)", "login failed (api_key: ***)"),
        ("- db_password: s3cr3t", "- db_password: ***"),
        # A pair among pairs, a log's.
        ("user=bob password: s3cr3t", "user=bob password: ***"),
        ("user: bob password: s3cr3t host: db", "user: bob password: *** host: db"),
        # Quoted, or with no space after its colon: a value wherever it stands.
        ("rejected password: 's3cr3t pw'", "rejected password: '***'"),
        ("rejected password:s3cr3t", "rejected password:***"),
    ],
)
def test_a_secret_in_a_name_value_pair_is_masked(text: str, shown: str) -> None:
    assert masked_in_text(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "invalid password: too short",
        "Error: invalid password: too short (8 characters at least)",
        "Error: token: expired",
        "invalid token: expired; max_tokens=100, password_length=8",
        "the secret: keep retries low, and tokens: 5 a second",
    ],
)
def test_a_secrets_name_in_prose_is_left_as_it_is(text: str) -> None:
    assert masked_in_text(text) == text


# -- webhooks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("POST https://hooks.slack.com/services/T000/B000/s3cr3t: 404", "POST https://hooks.slack.com/***: 404"),
        ("https://discord.com/api/webhooks/123/s3cr3t?wait=true", "https://discord.com/api/webhooks/***?wait=true"),
        ("https://o.webhook.office.com/webhookb2/a@b/IncomingWebhook/c/s3cr3t",
         "https://o.webhook.office.com/webhookb2/***"),
        ("https://api.telegram.org/bot123456:AAFs3cr3t/sendMessage 401",
         "https://api.telegram.org/bot123456:***/sendMessage 401"),
        ("https://u:p/w@hooks.example/s3cr3t", "https://u:***@hooks.example/***"),
    ],
)  # fmt: skip
def test_a_webhooks_secret_path_is_masked(text: str, shown: str) -> None:
    assert masked_in_text(text) == shown


@pytest.mark.parametrize(
    "text", ["https://api.example/v1/books/12?page=2", "see https://example.com/hooks/ and https://example.com/robots"]
)
def test_a_path_of_no_webhook_is_left_as_it_is(text: str) -> None:
    assert masked_in_text(text) == text
