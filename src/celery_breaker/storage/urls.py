"""URL helpers every store shares (no driver imports)."""

from __future__ import annotations

import re

__all__ = ["describe_url"]


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
    # The user info ends at the last "@" before the query; a password with an unencoded
    # "/", "?" or "#" puts its "@" further on: then the last "@" of all (masking too much,
    # if a query value holds one, rather than too little).
    before_query = re.split(r"[?#]", rest, maxsplit=1)[0]
    cut = before_query.rfind("@")
    if cut == -1:
        cut = rest.rfind("@")
    if cut == -1:
        credentials, after = "", rest
    else:
        credentials, after = rest[:cut], rest[cut + 1 :]
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
