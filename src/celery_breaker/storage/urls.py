"""URL helpers every store shares."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["describe_url"]


def describe_url(url: str) -> str:
    """``url`` with any password masked, for logs (``redis://user:***@host/0``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
