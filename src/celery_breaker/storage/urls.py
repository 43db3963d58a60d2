"""URL helpers every store shares (no driver imports)."""

from __future__ import annotations

import re

__all__ = ["describe_url"]


_SECRET_OPTIONS = re.compile(r"(?P<name>(?:^|[?&])(?:sentinel_|ssl_)?password=)[^&#]*")


def describe_url(url: str) -> str:
    """``url`` with every password masked (user info, ``password=``, ``sentinel_password=``, ``ssl_password=``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
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
