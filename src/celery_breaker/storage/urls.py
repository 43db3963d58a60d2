"""URL helpers every store shares (no driver imports)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

__all__ = [
    "ENCODE_PASSWORD",
    "SHOWN_OPTIONS",
    "MaskedRepr",
    "describe_url",
    "masked_in_text",
    "password_misread",
    "scrub_each",
    "scrub_secrets",
    "urls_in",
]

#: The fix for a password that a URL parser misreads.
ENCODE_PASSWORD = "percent-encode a password's '/', '?', '#' and '@' (as %2F, %3F, %23 and %40)"


_SECRET_OPTIONS = re.compile(r"(?P<name>(?:^|[?&])(?:sentinel_|ssl_)?password=)[^&#]*")

#: Query options known to hold no secret: the stores' own and redis-py's connection
#: options (a path to a key file is no secret; its password is). Any other option's value
#: is masked where a URL is shown: ``password=``, and ``pasword=``, ``token=``,
#: ``Password=``, which a store refuses as unknown, naming the option (not its value).
SHOWN_OPTIONS = frozenset({
    "key_prefix", "idle_ttl", "socket_timeout", "socket_connect_timeout", "time", "max_breakers",
    "db", "username", "client_name", "protocol", "max_connections", "health_check_interval",
    "socket_keepalive", "retry_on_timeout", "sentinel_username", "sentinel_ssl",
    "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname",
    "ssl_min_version",
})  # fmt: skip


def _shown_option(pair: str) -> str:
    """One ``name=value`` of a query, its value masked unless the option is in ``SHOWN_OPTIONS``."""
    name, equals, _ = pair.partition("=")
    if not equals:
        return pair if not pair or unquote(pair) in SHOWN_OPTIONS else "***"  # (a bare value: no name to tell)
    return pair if unquote(name) in SHOWN_OPTIONS else f"{name}=***"


def _masked_query(text: str) -> str:
    """``text`` (what follows a URL's hosts) with each query option's value masked unless it
    is known to hold no secret (``SHOWN_OPTIONS``)."""
    before, mark, rest = text.partition("?")
    if not mark:
        return _SECRET_OPTIONS.sub(r"\g<name>***", text)
    query, hash_mark, fragment = rest.partition("#")
    return f"{before}?{'&'.join(_shown_option(pair) for pair in query.split('&'))}{hash_mark}{fragment}"


def describe_url(url: str) -> str:
    """``url`` with every password masked (user info, ``password=``, ``sentinel_password=``,
    ``ssl_password=``, and the value of any query option not known to hold no secret,
    ``SHOWN_OPTIONS``): the one rule for every URL celery-breaker shows, in logs, errors,
    reprs and the CLI. Each URL of a kombu list (``a://...;b://...``) is masked; text that
    is no URL loses whatever stands before an ``@``."""
    urls = _each_url(url)
    if len(urls) > 1:
        return ";".join(describe_url(part) for part in urls)
    scheme, sep, rest = url.partition("://")
    if not sep:
        _, at, tail = url.rpartition("@")
        return _masked_query(f"***@{tail}" if at else url)
    credentials, after, cut = _user_info(scheme, rest)
    end = len(after)
    for mark in "/?#":
        found = after.find(mark)
        if found != -1:
            end = min(end, found)
    hosts, tail = after[:end], after[end:]
    netloc = hosts
    if cut != -1:
        user, colon, _ = credentials.partition(":")
        if any(mark in user for mark in "/?#"):
            user, colon = "", ":"
        netloc = f"{user}:***@{hosts}" if colon else f"***@{hosts}"
    return f"{scheme}://{netloc}" + _masked_query(tail)


#: Where a kombu list of URLs (``a://...;b://...``) goes on to its next URL: a ";" that
#: starts one. A ";" anywhere else is a URL's own (a password may hold one, unencoded).
_NEXT_URL = re.compile(r";(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def _each_url(text: str) -> list[str]:
    """The URLs of a kombu list (one for a single URL)."""
    return _NEXT_URL.split(text)


def _user_info(scheme: str, rest: str) -> tuple[str, str, int]:
    """A URL's user info, what follows it, and where its "@" is (-1: no user info);
    ``rest`` is what follows ``scheme://``. Where a parser would find it, unless the URL
    reads as a password holding an unencoded "/", "?" or "#" (``_misread``): then up to
    the "@" such a password ends at, masking too much rather than too little."""
    cut = _misread(scheme, rest)
    if cut is None:
        head = _HEAD_END.split(rest, maxsplit=1)[0]  # (what a parser reads as the user info and hosts)
        cut = head.rfind("@")
    if cut == -1:
        return "", rest, -1
    return rest[:cut], rest[cut + 1 :], cut


#: Where the part a URL parser reads as user info and hosts ends.
_HEAD_END = re.compile(r"[/?#]")
#: One ``host[:port]`` of a URL's host list: a name or an IPv6 address in brackets, and
#: a port of digits.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^:\[\]@/?#,]+)(?::[0-9]+)?")


def _hosts(text: str) -> bool:
    """Whether ``text`` is a list of ``host[:port]`` (comma-separated: Sentinel, Cluster)."""
    return all(_HOST.fullmatch(part) for part in text.split(","))


def _misread(scheme: str, rest: str) -> int | None:
    """Where the "@" that ends the user info is, when a password holds an unencoded "/",
    "?" or "#" (a parser would end the host there, and read a piece of the password as the
    host or the port); ``None`` when the URL parses as written. Told by its form: what a
    parser takes for the hosts is none (``:piece``, ``host:piece``), or an "@" stands in
    the path of a URL whose path is no file (``user/name:pw@host``, ``:p@ss/word@host``)."""
    head = _HEAD_END.split(rest, maxsplit=1)[0]
    unix = scheme.lower().endswith("unix")
    path = rest[len(head) :]
    path = _QUERY_START.split(path, maxsplit=1)[0] if path.startswith("/") else ""
    hosts = head.rpartition("@")[2]
    if unix:  # (no hosts: the path is a file's, and may hold an "@")
        if head and "@" not in head and "@/" in rest:
            return rest.find("@/")  # (":pw/rd@/run/redis.sock")
        return None
    if (hosts and _hosts(hosts)) and "@" not in path:
        return None
    if "@" not in rest[len(head) :]:
        return None  # (no "@" beyond: a bad host, but no password in it)
    for at in range(len(rest) - 1, -1, -1):  # (the last "@" followed by hosts)
        if rest[at] == "@" and _hosts(_HEAD_END.split(rest[at + 1 :], maxsplit=1)[0] or "-"):
            return at
    return rest.rfind("@")


_QUERY_START = re.compile(r"[?#]")


#: What splits a password a URL parser misread (an unencoded "/", "?", "#" or "@" in it)
#: into the pieces its error may quote.
_PIECES = re.compile(r"[:/?#@&=;,\[\]]")
#: Pieces shorter than this are left in a message: they give nothing away.
_SHORTEST_PIECE = 3


def scrub_secrets(text: str, url: str) -> str:
    """``text`` (a message about ``url``, such as a parser's error) with every password of
    ``url`` masked, and every piece of one: a password holding an unencoded "/" makes a
    parser read part of it as the host or the port, and its error quotes that part."""
    secrets: list[str] = []
    for one in _each_url(url):
        scheme, sep, rest = one.partition("://")
        credentials = _user_info(scheme, rest)[0] if sep else one.rpartition("@")[0]
        if credentials:
            user, colon, password = credentials.partition(":")
            misread = any(mark in user for mark in "/?#")
            secrets.append(password if colon and not misread else credentials)
        secrets += [found.group("value") for found in _SECRET_VALUES.finditer(one)]
    pieces: set[str] = set()
    for secret in secrets:
        for variant in (secret, unquote(secret)):
            pieces.add(variant)
            pieces.update(_PIECES.split(variant))
    for piece in sorted(pieces, key=len, reverse=True):
        if len(piece) >= _SHORTEST_PIECE:
            text = text.replace(piece, "***")
    return text


#: A URL in free text: its scheme to the next space (a password may hold any other mark).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
#: A secret given by name in free text: a query option or a keyword (``password=x``,
#: ``access_token=x``, ``password='x'``), a dict's or JSON's key (``'password': 'x'``,
#: ``"client_secret": "x"``), a header (``Authorization: Bearer x``, ``X-Api-Key: x``).
#: Its value is quoted (to the closing quote, or the end), or runs to a separator.
_SECRET_IN_TEXT = re.compile(
    r"""(?P<name>\b(?:\w*?(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|authorization)"""
    r"""(?:['"]\s*[:=]|\s*=)|(?:authorization|(?:x-)?api[_-]?key)\s*:)\s*)"""
    r"""(?P<value>(?:(?:bearer|basic|token|digest)\s+)?(?:'[^']*(?:'|\Z)|"[^"]*(?:"|\Z)|[^&#\s'",;)}\]]+))""",
    re.I,
)
#: A bearer token standing alone (``sent Bearer eyJ0...``): 8 characters or more, a digit
#: among them (``bearer of bad news`` is no token).
_BEARER_IN_TEXT = re.compile(r"\b(?P<name>bearer\s+)(?=[A-Za-z._~+/=-]*\d)[A-Za-z0-9._~+/=-]{8,}", re.I)
#: Characters of a text masked at the most (what a log line quotes of it is shorter).
_MASKED_AT_MOST = 2_000


def _masked_value(found: re.Match[str]) -> str:
    """A named secret with its value masked, its quotes kept (``password='***'``)."""
    value = found["value"]
    quote = value[-1] if value[:1] in ("'", '"') and len(value) > 1 and value[-1] == value[0] else ""
    return f"{found['name']}{value[:1] if quote else ''}***{quote}"


def masked_in_text(text: str) -> str:
    """``text`` from code this package does not know (a health check's error), the user
    info of every URL in it masked (``describe_url``) and the value of every secret given
    by name (``password=``, ``access_token=``, ``'password': 'x'``, ``Authorization:
    Bearer x``): no URL to mask by is known, as ``scrub_secrets`` has, so both are found by
    their shape. Only its first ``_MASKED_AT_MOST`` characters are kept, less the word
    they cut (a URL cut before its "@" would show its password)."""
    if len(text) > _MASKED_AT_MOST:
        text = re.sub(r"\S*\Z", "", text[:_MASKED_AT_MOST]) + "..."
    text = _URL_IN_TEXT.sub(lambda url: describe_url(url[0]) if "@" in url[0] else url[0], text)
    text = _SECRET_IN_TEXT.sub(_masked_value, text)
    return _BEARER_IN_TEXT.sub(r"\g<name>***", text)


class MaskedRepr:
    """``repr(value)``, masked (``masked_in_text``), for a log line's argument: made only
    when the line is emitted, as logging formats its arguments (a DEBUG line that is not
    emitted costs no masking)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        try:
            text = repr(self.value)
        except Exception:  # (the user's object: its repr must not fail the line)
            text = f"<{type(self.value).__name__}: repr() failed>"
        return masked_in_text(text)

    __str__ = __repr__


def urls_in(value: object, depth: int = 0) -> list[str]:
    """The URLs a setting's or a task option's value holds (itself, or in a dict, list or
    tuple, two levels deep): a store URL given where something else belongs, whose
    refusal quotes the value."""
    if isinstance(value, str):
        return [value] if "://" in value else []
    if depth >= 2:
        return []
    if isinstance(value, Mapping):
        value = [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple)):
        return [url for item in value for url in urls_in(item, depth + 1)]
    return []


def scrub_each(text: str, urls: Iterable[str]) -> str:
    """``text`` with every password of each of ``urls`` masked (``scrub_secrets``)."""
    for url in urls:
        text = scrub_secrets(text, url)
    return text


_SECRET_VALUES = re.compile(r"(?:^|[?&])(?:sentinel_|ssl_)?password=(?P<value>[^&#]*)")


def password_misread(url: str) -> bool:
    """Whether a password of ``url`` holds an unencoded "/", "?" or "#": URL parsers take
    it for the end of the host, then read a piece of the password as the host or the
    port, and their errors quote that piece (``ENCODE_PASSWORD`` is the fix)."""
    for one in _each_url(url):
        scheme, sep, rest = one.partition("://")
        if sep and _misread(scheme, rest) is not None:
            return True
    return False
