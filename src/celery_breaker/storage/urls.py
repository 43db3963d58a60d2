"""URL helpers every store shares (no driver imports)."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

__all__ = ["ENCODE_PASSWORD", "describe_url", "password_misread", "scrub_secrets"]

#: The fix for a password that a URL parser misreads.
ENCODE_PASSWORD = "percent-encode a password's '/', '?', '#' and '@' (as %2F, %3F, %23 and %40)"


_SECRET_OPTIONS = re.compile(r"(?P<name>(?:^|[?&])(?:sentinel_|ssl_)?password=)[^&#]*")


def describe_url(url: str) -> str:
    """``url`` with every password masked (user info, ``password=``, ``sentinel_password=``,
    ``ssl_password=``): the one rule for every URL celery-breaker shows, in logs, errors,
    reprs and the CLI. Each URL of a kombu list (``a://...;b://...``) is masked; text that
    is no URL loses whatever stands before an ``@``."""
    if ";" in url:
        return ";".join(describe_url(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        _, at, tail = url.rpartition("@")
        return _SECRET_OPTIONS.sub(r"\g<name>***", f"***@{tail}" if at else url)
    credentials, after, cut = _user_info(rest)
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
    return f"{scheme}://{netloc}" + _SECRET_OPTIONS.sub(r"\g<name>***", tail)


def _user_info(rest: str) -> tuple[str, str, int]:
    """A URL's user info, what follows it, and where its "@" is (-1: no user info);
    ``rest`` is what follows ``scheme://``."""
    # The user info ends at the last "@" before the query; a password with an unencoded
    # "/", "?" or "#" puts its "@" further on: then the last "@" of all (masking too much,
    # if a query value holds one, rather than too little).
    before_query = re.split(r"[?#]", rest, maxsplit=1)[0]
    cut = before_query.rfind("@")
    if cut == -1:
        cut = rest.rfind("@")
    if cut == -1:
        return "", rest, -1
    return rest[:cut], rest[cut + 1 :], cut


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
    for one in url.split(";"):
        _, sep, rest = one.partition("://")
        credentials = _user_info(rest)[0] if sep else one.rpartition("@")[0]
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


_SECRET_VALUES = re.compile(r"(?:^|[?&])(?:sentinel_|ssl_)?password=(?P<value>[^&#]*)")


def password_misread(url: str) -> bool:
    """Whether a password of ``url`` holds an unencoded "/", "?" or "#": URL parsers take
    it for the end of the host, then read a piece of the password as the host or the
    port, and their errors quote that piece (``ENCODE_PASSWORD`` is the fix)."""
    for one in url.split(";"):
        _, sep, rest = one.partition("://")
        if not sep or _user_info(rest)[2] == -1:
            continue
        try:
            parts = urlsplit(one)
            if "@" in parts.netloc:
                # (the parser's user info ends at an earlier "@": the password holds one)
                if parts.netloc.rpartition("@")[0] != _user_info(rest)[0]:
                    return True
                continue
            parts.port  # noqa: B018 (raises on a port that is no number)
        except ValueError:
            return True
        if not parts.hostname or "@" in parts.path:  # (a netloc of ":piece"; "user/name:pw@host")
            return True
    return False
