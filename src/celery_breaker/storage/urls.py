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
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if found != -1:
            end = min(end, found)
    netloc, tail = rest[:end], rest[end:]
    credentials, at, hosts = netloc.rpartition("@")
    if at:
        user = credentials.partition(":")[0]
        netloc = f"{user}:***@{hosts}" if ":" in credentials else f"***@{hosts}"
    return f"{scheme}://{netloc}" + _SECRET_OPTIONS.sub(r"\g<name>***", tail)
