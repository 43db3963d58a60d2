"""URL helpers every store shares (no driver imports)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import unquote

__all__ = [
    "ENCODE_PASSWORD",
    "SHOWN_OPTIONS",
    "describe_url",
    "masked_user_info",
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
    ``SHOWN_OPTIONS``): the one rule for every URL celery-breaker is given (a store's, the
    broker's, a probe given as one), in logs, errors, reprs and the CLI. Each URL of a
    kombu list (``a://...;b://...``) is masked; text that is no URL loses whatever stands
    before an ``@``."""
    return _described(url, _masked_query)


def masked_user_info(url: str) -> str:
    """``url`` with the user info of each URL masked as ``describe_url`` masks it, its query
    as it is: for a URL of code this package does not know (quoted in a downstream's
    error), whose query options are its own; ``masking.masked_in_text`` masks those named
    like a secret."""
    return _described(url, lambda tail: tail)


def _described(url: str, query: Callable[[str], str]) -> str:
    """``url`` with the user info of each URL masked, and what follows its hosts as
    ``query`` masks it."""
    urls = _each_url(url)
    if len(urls) > 1:
        return ";".join(_described(part, query) for part in urls)
    scheme, sep, rest = url.partition("://")
    if not sep:
        _, at, tail = url.rpartition("@")
        return query(f"***@{tail}" if at else url)
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
    return f"{scheme}://{netloc}" + query(tail)


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
