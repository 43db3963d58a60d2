"""Secrets in free text (a downstream's error) masked by their shape: no URL to mask by is known."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable

from .urls import masked_user_info

__all__ = ["MaskedRepr", "MaskedText", "MaskedTracebacks", "masked_error", "masked_in_text"]

#: A URL in free text: its scheme to the next space (a password may hold any other mark).
#: A scheme starts where no scheme's character stands before it: tried from inside a run
#: of them, a match would scan the rest of the run again (2,000 letters: 15 ms, not 0.1).
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://\S+")
#: A word of free text (where user info with no scheme before it may stand).
_WORD = re.compile(r"\S+")
#: The host (and port) an "@" of user info is followed by, ending there: a name, an
#: IPv4 or a bracketed IPv6 address (``sha256:0e8f`` of an image digest is none).
_HOST_AFTER_AT = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)*)(?::[0-9]+)?(?![\w@:-]|\.\w)"
)
#: What a user name is made of, before its ":" (the word may open with a quote, a bracket).
_USER_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.%+~!$-")
#: Labels an e-mail address follows with no space (``mailto:bob@example.com``): no user info.
_MAIL_LABELS = frozenset({"mailto", "mail", "email", "e-mail", "to", "from", "cc", "bcc", "reply-to", "sender"})
#: A quoted value, to its closing quote (or the end): a quote in it is escaped
#: (``'it\'s'``, JSON's ``"a\"b"``), a ``bytes`` is ``b'x'``, and a repr quoting text
#: with both quotes escapes its own (``\'x\'``).
_QUOTED = (
    r"""[bB]?(?:'(?:[^'\\]|\\[\s\S]|\\\Z)*(?:'|\Z)|"(?:[^"\\]|\\[\s\S]|\\\Z)*(?:"|\Z)"""
    r"""|\\'(?:[^'\\]|\\[^']|\\\Z)*(?:\\?'|\Z)|\\"(?:[^"\\]|\\[^"]|\\\Z)*(?:\\?"|\Z))"""
)
#: Names a secret's name ends in (``password``, ``db_password``, ``access_token``).
_SECRET_NAMES = r"password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key"
#: A secret given by name in free text: a query option or a keyword (``password=x``,
#: ``access_token=x``, ``password='x'``), a dict's or JSON's key (``'password': 'x'``,
#: ``"client_secret": "x"``), a header (``Authorization: Bearer x``, ``X-Api-Key: x``).
#: Its value is quoted (``_QUOTED``), or runs to a separator.
_SECRET_IN_TEXT = re.compile(
    r"""(?P<name>\b(?:\w*?(?:""" + _SECRET_NAMES + r"""|authorization|cookie)"""
    r"""(?:\\?['"]\s*[:=]|\s*=)|(?:authorization|(?:x-)?api[_-]?key)\s*:)\s*)"""
    r"""(?P<value>(?:(?:bearer|basic|token|digest)\s+)?(?:""" + _QUOTED + r"""|[^&#\s'",;)}\]]+))""",
    re.I,
)
#: A secret's name and a colon, unquoted (``password: hunter2``: YAML's, a log's
#: ``key: value``). Its value is masked when quoted, when no space follows the colon, or
#: when the pair reads as one of a list of pairs (``_among_pairs``), not as prose
#: (``invalid password: too short``, ``invalid token: expired``).
_KEYED_IN_TEXT = re.compile(
    r"""\b(?P<name>\w*?(?:""" + _SECRET_NAMES + r""")[ \t]*:(?P<space>[ \t]*))"""
    r"""(?P<value>""" + _QUOTED + r"""|(?:[^\s'",;)}\]\\]|\\(?![nrt]))+)""",
    re.I,
)
#: The next pair of a list of them, after a value: `` host: db``, `` user=bob``.
_NEXT_PAIR = re.compile(r"[ \t]+[\w.-]+[ \t]*[:=]")
#: What ends a value of a list of pairs (``\\n``: a newline as a repr shows it).
_VALUE_ENDS = ("\r", "\n", ",", ";", ")", "}", "]", "'", '"', "\\n", "\\r")
#: What a pair follows when it opens a line, a mapping, a list or a string.
_PAIR_OPENS = ("\r", "\n", "{", "(", "[", ",", ";", "|", "-", "'", '"', "\\n", "\\r")
#: How far back the word before a pair is looked for (a bound on each match's cost).
_LOOK_BACK = 200
#: A query option named like a key, a signature, a credential or an auth value
#: (``?key=``, ``&sig=``, ``X-Amz-Signature=``, ``?auth=``): in a query, where such a
#: name holds a secret (an API key, a pre-signed URL's signature); in prose,
#: ``key=`` or ``auth=`` names nothing secret as often.
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&](?:[\w.-]*?[_.-])?(?:key|sig|signature|credential|auth)=)(?P<value>[^&#\s'\"]*)", re.I
)
#: A Cookie or Set-Cookie header (``Cookie: sid=x; theme=y``): its ``name=value`` pairs,
#: separated by ";", each value masked (which cookie holds the session is not known).
#: A quote ends them (the repr's own), but for a cookie's quoted value (``sid="x"``).
_COOKIE_IN_TEXT = re.compile(
    r"""\b(?P<name>(?:set-)?cookie[ \t]*:[ \t]*)"""
    r"""(?P<value>(?:"[^"\s;]*"|[^\s;'"])*(?:;[ \t]*(?:"[^"\s;]*"|[^\s;'"])*)*)""",
    re.I,
)
#: A cookie's value, in a header's pairs: from its "=" to the next ";".
_COOKIE_VALUE = re.compile(r"=[^;]*")
#: A bearer token standing alone (``sent Bearer eyJ0...``): 8 characters or more, a digit
#: among them (``bearer of bad news`` is no token).
_BEARER_IN_TEXT = re.compile(r"\b(?P<name>bearer\s+)(?=[A-Za-z._~+/=-]*\d)[A-Za-z0-9._~+/=-]{8,}", re.I)
#: Characters of a text masked at the most (what a log line quotes of it is shorter).
_MASKED_AT_MOST = 2_000


def _masked_value(found: re.Match[str]) -> str:
    """A named secret with its value masked, its quotes kept when it has both
    (``password='***'``, ``password=b'***'``, ``password=\\'***\\'``)."""
    value = found["value"]
    opening = _QUOTE_OPENING.match(value)
    if opening is None:
        return f"{found['name']}***"
    closing = opening[0].lstrip("bB")
    if not closing.startswith("\\") or not value.endswith(closing):
        closing = closing[-1]
    if len(value) < len(opening[0]) + len(closing) or not value.endswith(closing):
        return f"{found['name']}***"
    return f"{found['name']}{opening[0]}***{closing}"


#: How a quoted value opens: a quote, a ``bytes``' ``b'``, an escaped quote.
_QUOTE_OPENING = re.compile(r"[bB]?\\?['\"]")


def _masked_keyed_value(found: re.Match[str]) -> str:
    """``name: value`` with its value masked when it is a secret (``_KEYED_IN_TEXT``)."""
    if _QUOTE_OPENING.match(found["value"]):
        return _masked_value(found)
    if not found["space"] or _among_pairs(found):
        return f"{found['name']}***"
    return found[0]


def _among_pairs(found: re.Match[str]) -> bool:
    """Whether ``name: value`` is one of a list of pairs: another pair follows it
    (``user: bob password: x host: db``), or its value ends there (the end, a line's, a
    ",", a bracket) and it opens a line, a mapping or a string, or follows a pair
    (``user=bob password: x``). Prose has a word before it and more after."""
    text, start, end = found.string, found.start(), found.end()
    if _NEXT_PAIR.match(text, end):
        return True
    if end < len(text) and not text.startswith(_VALUE_ENDS, end):
        return False
    before = text[max(0, start - _LOOK_BACK) : start].rstrip(" \t")
    if not before or before.endswith(_PAIR_OPENS):
        return True
    word = before.rsplit(None, 1)[-1]
    return "=" in word or ":" in word[:-1]


def masked_in_text(text: str) -> str:
    """``text`` from code this package does not know (a health check's error), the user
    info of every URL in it masked (``masked_user_info``, and with no scheme:
    ``admin:pw@host``), a webhook URL's path, and the value of every secret given by name
    (``password=``, ``access_token=``, ``'password': 'x'``, ``Authorization: Bearer x``, a
    query's ``key=`` or ``sig=``, a ``Cookie:`` header's, ``password: hunter2`` among
    pairs): no URL to mask by is known, as ``scrub_secrets`` has, so all are found by
    their shape. A URL's other query options are the downstream's own, shown as they are
    (``describe_url``'s list of the options known to hold no secret is the stores').
    Only its first ``_MASKED_AT_MOST`` characters are kept, less the word they cut (a URL
    cut before its "@" would show its password)."""
    if len(text) > _MASKED_AT_MOST:
        text = _less_the_last_word(text[:_MASKED_AT_MOST]) + "..."
    text = _URL_IN_TEXT.sub(_masked_url, text)
    if "@" in text:
        text = _WORD.sub(_masked_bare_user_info, text)
    text = _SECRET_IN_TEXT.sub(_masked_value, text)
    text = _QUERY_SECRET.sub(r"\g<name>***", text)
    text = _KEYED_IN_TEXT.sub(_masked_keyed_value, text)
    text = _COOKIE_IN_TEXT.sub(lambda found: found["name"] + _COOKIE_VALUE.sub("=***", found["value"]), text)
    return _BEARER_IN_TEXT.sub(r"\g<name>***", text)


def _masked_url(found: re.Match[str]) -> str:
    """A URL in free text with its user info masked (``masked_user_info``), and the path
    of a webhook's: a webhook URL carries its secret in its path (``_masked_hook_path``)."""
    # Its path first (Teams' holds an "@" that would read as user info), and again after
    # the user info (a password's unencoded "/" hid the host).
    url = _masked_hook_path(found[0])
    return _masked_hook_path(masked_user_info(url)) if "@" in url else url


#: Path segments after which a webhook's URL holds its secret (Discord's
#: ``/api/webhooks/<id>/<token>``, Teams' ``/webhookb2/...``, ``/hooks/<token>``).
_HOOK_SEGMENTS = frozenset({"hooks", "webhook", "webhooks", "webhookb2"})
#: A Telegram bot's token, a path segment of its API's URLs (``/bot123456:AAF.../``).
_BOT_TOKEN = re.compile(r"(?P<name>bot[0-9]+:)[^/]+", re.I)


def _masked_hook_path(url: str) -> str:
    """``url`` with the secret of a webhook's path masked: every segment after a
    ``hooks``/``webhooks`` segment, or the whole path of a ``hooks.`` host (Slack's
    ``hooks.slack.com/services/T0/B0/<secret>``), and a bot token's segment. The URL
    names the capability: a general rule, no list of services."""
    shown = url.rstrip(".,:;!)]}'\"")  # (what a sentence puts after a URL, kept)
    scheme, sep, rest = shown.partition("://")
    end = min((at for at in (rest.find(mark) for mark in "?#") if at != -1), default=len(rest))
    netloc, slash, path = rest[:end].partition("/")
    if not sep or not slash or not path:
        return url
    segments = path.split("/")
    host = netloc.rpartition("@")[2].lower()
    cut = 0 if host.startswith("hooks.") else None
    for index, segment in enumerate(segments):
        if cut is None and segment.lower() in _HOOK_SEGMENTS:
            cut = index + 1
        segments[index] = _BOT_TOKEN.sub(r"\g<name>***", segment)
    if cut is not None and cut < len(segments) and any(segments[cut:]):
        segments[cut:] = ["***"]
    return f"{scheme}://{netloc}/{'/'.join(segments)}{rest[end:]}{url[len(shown) :]}"


def _masked_bare_user_info(found: re.Match[str]) -> str:
    """A word holding user info with no scheme before it (``admin:s3cret@10.0.0.5:5672``,
    as AMQP and Redis clients quote their peer), its password masked: from its first ":"
    to the last "@" that a host follows, so a password may hold either. A word with a
    URL in it was masked as one; ``mailto:bob@example.com`` is an e-mail address."""
    word = found[0]
    colon = word.find(":")
    if colon == -1 or "@" not in word or "://" in word:
        return word
    at = word.rfind("@")
    while at > colon:
        if _HOST_AFTER_AT.match(word, at + 1):
            break
        at = word.rfind("@", colon, at)
    else:
        return word
    start = colon
    while start and word[start - 1] in _USER_CHARACTERS:
        start -= 1
    if word[start:colon].lower() in _MAIL_LABELS:
        return word
    return f"{word[: colon + 1]}***{word[at:]}"


def _less_the_last_word(text: str) -> str:
    """``text`` less the word it ends in (none when it ends in a space): in one pass, where
    ``re.sub(r"\\S*\\Z", ...)`` tried ``\\S*`` from every character of the word (2,000: 46 ms)."""
    if not text or text[-1].isspace():
        return text
    words = text.rsplit(None, 1)
    return text[: len(text) - len(words[-1])]


def _masked(value: object, show: Callable[[object], str]) -> str:
    """``show(value)`` (``repr`` or ``str``), masked; a placeholder naming the type when
    it raises (the user's object: its text must not fail the line quoting it)."""
    try:
        text = show(value)
    except Exception:
        text = f"<{type(value).__name__}: {show.__name__}() failed>"
    return masked_in_text(text)


class MaskedRepr:
    """``repr(value)``, masked (``masked_in_text``), for a log line's argument: made only
    when the line is emitted, as logging formats its arguments (a DEBUG line that is not
    emitted costs no masking)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        return _masked(self.value, repr)

    __str__ = __repr__


class MaskedText:
    """``str(value)``, masked (``masked_in_text``): an error quoted as its text, by a log
    line's ``%s`` or an error's f-string (``MaskedRepr`` is its ``repr``, whatever the
    format). Made only when formatted, as logging formats its arguments: a DEBUG line
    that is not emitted costs no masking. A redis-py or kombu error's text may quote the
    URL it connects to (``Error connecting to redis://:pw@host``), its password too."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return _masked(self.value, str)

    def __repr__(self) -> str:
        return repr(MaskedRepr(self.value))


def masked_error(exc: BaseException) -> BaseException:
    """``exc``, each text among its arguments masked (``masked_in_text``) in place, and so
    in the errors it was raised from or during: for an error raised on into logs this
    package does not write, a ``Reject``'s reason or a failure's cause, whose text and
    whole chain Celery's log of the task prints (a kombu or redis-py error may quote the
    URL it connects to, its password too). ``repr`` and ``str`` read the arguments; an
    error whose text comes from elsewhere is left as it is."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen and len(seen) < 8:
        seen.add(id(link))
        masked = tuple(masked_in_text(arg) if isinstance(arg, str) else arg for arg in link.args)
        if masked != link.args:
            with contextlib.suppress(Exception):  # (an error that refuses new arguments: left as it is)
                link.args = masked
        link = link.__cause__ or link.__context__
    return exc


class MaskedTracebacks(logging.Filter):
    """On the ``celery_breaker`` logger (installed below, with the first module that masks
    anything): the traceback a record carries (``logger.exception``, ``exc_info=True``),
    masked line by line (``masked_in_text``) and set as the record's ``exc_text``, which
    a ``logging.Formatter`` shows instead of formatting the exception again. A listener's,
    a health check's or a watcher's error is the user's, and its message or a source line
    of its traceback may quote a URL with a password or a token; the log line's own
    arguments are masked where they are made (``MaskedRepr``). A handler whose formatter
    reads ``exc_info`` itself (not through ``exc_text``) sees the exception as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if exc_info and exc_info[0] is not None and not record.exc_text:
            try:
                shown = _FORMATTER.formatException(exc_info)
            except Exception:  # (the user's exception: its formatting must not lose the line)
                shown = f"{exc_info[0].__name__}: (its traceback could not be formatted)"
            record.exc_text = "\n".join(masked_in_text(line) for line in shown.splitlines())
        return True


_FORMATTER = logging.Formatter()
# (addFilter keeps one of each: a second import adds none)
_MASKED_TRACEBACKS = MaskedTracebacks()
logging.getLogger("celery_breaker").addFilter(_MASKED_TRACEBACKS)
