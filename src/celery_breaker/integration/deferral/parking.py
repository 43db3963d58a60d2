"""Deferral by parking: the run's message waits in its breaker's store until the breaker lets it run.

While a breaker is open, a deferred task is *parked*: its message (the signature Celery
would publish again: same id, arguments, headers, options) is stored next to the
breaker and the delivery is acknowledged, so no worker holds it. The releaser
(``release.py``) publishes it again when the breaker lets it run. Parking needs a store
that can keep it (``Store.parking``: Redis); a store that is down, or a park that fails,
leaves the run to the next strategy (a countdown): nothing is lost either way.

A stored message (``encode_message``) is a small JSON envelope around the body in the
task's own serializer. A body of ``COMPRESS_FROM`` bytes or more is stored compressed
(zlib, then base64: Redis holds text here) when that saves at least a tenth: a backlog
of parked tasks lives in Redis's memory, and a task with a 7.4 KB JSON argument parks
in 0.9 KB. An envelope of a format this worker does not know (a newer release's) is
left parked for a worker that reads it, never dropped.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from collections.abc import Collection, Mapping
from typing import Any

from kombu.exceptions import DecodeError, SerializerNotInstalled
from kombu.serialization import dumps, loads, registry

from ...errors import StorageError
from ...storage.masking import MaskedRepr, MaskedText
from .plan import PARKED_HEADER, park_deadline
from .strategy import Deferral, in_a_serializer

__all__ = [
    "COMPRESS_FROM", "LARGEST_BODY", "NeedsCode", "NewerFormat", "NotAcceptedHere", "ParkInStore", "decode_message",
    "encode_message", "entry_id", "read_parked",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")


#: Bodies of at least this many bytes are stored compressed, if that saves a tenth.
COMPRESS_FROM = 512
#: The most bytes a compressed body may expand to when read: a stored value that claims
#: more (damaged, or written by no worker) is unreadable, not a worker out of memory.
LARGEST_BODY = 256 * 1024 * 1024
#: Envelope formats this worker reads: 1 (the body as text, or base64), 2 (1, or the body
#: compressed: ``"z": "zlib"``).
_FORMATS = (1, 2)


def encode_message(signature: dict[str, Any], serializer: str) -> str:
    """A signature (``dict(sig)``) as text, in the task's own serializer; compressed when
    it is large enough for that to pay (``COMPRESS_FROM``)."""
    content_type, encoding, body = dumps(signature, serializer=serializer)  # type: ignore[no-untyped-call]
    raw = body if isinstance(body, bytes) else body.encode(encoding if encoding not in ("binary", None) else "utf-8")
    if len(raw) >= COMPRESS_FROM:
        packed = base64.b64encode(zlib.compress(raw, 6)).decode("ascii")
        if len(packed) * 10 <= len(raw) * 9:
            return json.dumps({"v": 2, "ct": content_type, "ce": encoding, "z": "zlib", "body": packed})
    if isinstance(body, bytes):
        text, wrapped = base64.b64encode(body).decode("ascii"), True
    else:
        text, wrapped = body, False
    return json.dumps({"v": 1, "ct": content_type, "ce": encoding, "b64": wrapped, "body": text})


def _inflated(packed: str) -> bytes:
    """A body ``encode_message`` compressed; ValueError if it is not one, or would expand
    past ``LARGEST_BODY``."""
    inflater = zlib.decompressobj()
    raw = inflater.decompress(base64.b64decode(packed, validate=True), LARGEST_BODY)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError(f"compressed body truncated, or larger than {LARGEST_BODY} bytes")
    return raw


class NotAcceptedHere(ValueError):
    """A parked message in a content type this app does not accept (``accept_content``)
    or has no serializer for: readable by a worker that does, so it must not be dropped."""


class NeedsCode(NotAcceptedHere):
    """A parked message whose arguments name code this worker cannot import (a pickled
    object of a module or class it does not have: a rolling deploy's older worker):
    readable by a worker that has it, so it must not be dropped."""


class NewerFormat(NotAcceptedHere):
    """A parked message stored in a format this worker does not read (a newer release's):
    readable by a worker that does, so it must not be dropped."""


def decode_message(payload: str, accept: Collection[str] | None) -> dict[str, Any]:
    """The signature dict ``encode_message`` stored; raises ValueError when unreadable,
    ``NotAcceptedHere`` when only this app cannot read it.

    ``accept``: the content types the app accepts (``accept_content`` as content types,
    ``kombu.serialization.prepare_accept_content``), so a pickle, msgpack or yaml task
    the app accepts is read, and nothing else is: kombu refuses those by default.
    """
    return read_parked(payload, accept)[0]


def read_parked(payload: str, accept: Collection[str] | None) -> tuple[dict[str, Any], str | None]:
    """``decode_message``, and the serializer the message was stored in (``None`` if kombu
    names none for its content type): the one to publish it in again, since its
    arguments may take no other."""
    try:
        outer = json.loads(payload)
        version = outer["v"]
    except Exception as exc:
        raise ValueError(f"unreadable parked message: {MaskedRepr(exc)}") from exc
    if version not in _FORMATS:
        # (a newer release's format: a worker that reads it releases it; dropped, the task was lost)
        raise NewerFormat(
            f"parked message in format {version!r:.20}, which this worker does not read (it reads "
            f"{', '.join(map(str, _FORMATS))}): a worker of a newer celery-breaker does"
        )
    try:
        body: str | bytes = outer["body"]
        if outer.get("z") is not None:
            if outer["z"] != "zlib":
                raise ValueError(f"unknown compression {outer['z']!r:.40}")
            body = _inflated(str(body))
        elif outer.get("b64"):
            body = base64.b64decode(body)
        found = loads(body, outer["ct"], outer["ce"], accept=accept)  # type: ignore[no-untyped-call]
    except SerializerNotInstalled as exc:  # (ContentDisallowed too)
        raise NotAcceptedHere(
            f"parked message in {outer.get('ct')!r}, which this app does not accept: {MaskedText(exc)}"
        ) from exc
    except Exception as exc:  # any decoding failure: the caller reports the entry
        cause = exc.args[0] if isinstance(exc, DecodeError) and exc.args else exc  # (kombu wraps what it met)
        if isinstance(cause, (ImportError, AttributeError)):
            # (pickle: "No module named 'billing.money'", "Can't get attribute 'Money'")
            raise NeedsCode(
                f"parked message needs code this worker cannot import ({MaskedRepr(cause)!s:.200})"
            ) from exc
        raise ValueError(f"unreadable parked message: {MaskedRepr(exc)}") from exc
    if not isinstance(found, dict) or "task" not in found:
        # (its type only: a decoded body holds the task's arguments, not for a log)
        raise ValueError(f"unreadable parked message: a {type(found).__name__}, not a task's signature")
    serializer = registry.type_to_name.get(outer["ct"])
    return found, serializer if isinstance(serializer, str) else None


def entry_id(task_id: str, retries: int | None, count: int) -> str:
    """The parking entry of a task's ``count``-th deferral in its attempt ``retries``.

    A message redelivered after a crash (same attempt, same deferral) is the same entry,
    so it is parked once. A Celery retry of a released task starts its deferral count
    afresh, so without the attempt its next deferral would reuse the entry a releaser
    may still be publishing (and then forgetting)."""
    return f"{task_id}:{retries or 0}:{count}"


class ParkInStore:
    """Park the run in its breaker's store (``Store.parking``), in the order of its first
    deferral; a run that failed, its breaker open now, at the back.

    The back, because the first parked are the first released, and so the probes of the
    next half-open period: a task failing for a reason of its own (an input the
    downstream always refuses, under ``autoretry_for``) failed as a probe, reopened the
    breaker and was deferred (no retry spent) back to the head, to be the next probe, and
    the next: the breaker never closed, and the whole backlog waited (an acceptance
    tester's run: not closed after 120 s, the task deferred 40 times)."""

    name = "park"
    parks = True

    def deliver(self, deferral: Deferral) -> float | None:
        return self.park(deferral)

    def park(self, deferral: Deferral, route: Mapping[str, Any] | None = None) -> float | None:
        """Park the run; its delay, or ``None`` when it is not parked (the store is down or
        refused it, it expires first, a nested breaker rejected it). ``route``: the options
        that release it to a queue by name (the countdown's, when it parks a run in its
        place), instead of through the exchange and key it was delivered by."""
        plan = deferral.plan
        if plan.expires_first:
            return None  # it must arrive just after its expiry, to be revoked: a countdown does that
        rejected, breaker = deferral.rejected, deferral.breaker
        if rejected.name and (rejected.name, rejected.key) != (breaker.name, breaker.key):
            # Rejected by a breaker nested in the body: parked behind the task's own breaker
            # (closed), it would be released at once, rejected again and parked again, its
            # deferrals spent in a second. A countdown waits for the breaker that rejected it.
            return None
        store = breaker.store
        parking = store.parking
        if parking is None or store.down:
            # No parking here, or the shared store is down (its outage is logged once per
            # interval): the next strategy now, rather than Redis's timeouts for each task.
            return None
        task = deferral.task
        request = task.request
        headers = {**deferral.headers, PARKED_HEADER: 1}  # (released, it is paced: see PARKED_HEADER)
        signature = task.signature_from_request(
            request, deferral.args, deferral.kwargs, headers=headers, **deferral.options, **(route or {})
        )
        body = dict(signature)
        body["options"] = {k: v for k, v in body.get("options", {}).items() if k not in ("countdown", "eta")}
        try:
            payload = in_a_serializer(task, lambda serializer: encode_message(body, serializer))
        except Exception as exc:
            logger.warning(
                "task %s[%s]: cannot park it (%r); deferring it another way", task.name, request.id, MaskedRepr(exc)
            )
            return None
        deadline = park_deadline(deferral.expires_in, plan.since, deferral.max_defer_age, deferral.now)
        entry = entry_id(request.id, request.retries, plan.count)
        try:
            order = deferral.now if deferral.failed else plan.since
            parking.park(breaker.name, breaker.key, entry, order, payload, deadline)
        except StorageError:
            return None  # (the store reports its outage, once per interval)
        return plan.delay
