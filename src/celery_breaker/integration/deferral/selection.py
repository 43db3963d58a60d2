"""Which strategies defer an app's tasks, tried in order: chosen once per app, from the broker and the settings.

Adding a mechanism is one module implementing ``DeferralStrategy`` and one line here.
"""

from __future__ import annotations

import threading
from typing import Any

from ...storage import resolve_store
from ..settings import BreakerSettings, get_settings
from .countdown import CountdownRepublish
from .parking import ParkInStore
from .strategy import DeferralStrategy

__all__ = ["choose_strategies", "deferral_strategies"]

_ATTRIBUTE = "_celery_breaker_strategies"
_LOCK = threading.Lock()


def choose_strategies(settings: BreakerSettings) -> tuple[DeferralStrategy, ...]:
    """The strategies for these settings, most preferred first; the last always delivers."""
    chosen: list[DeferralStrategy] = []
    if settings.park is not False and resolve_store(settings.storage_url).parking is not None:
        chosen.append(ParkInStore())
    chosen.append(CountdownRepublish())
    return tuple(chosen)


def deferral_strategies(app: Any) -> tuple[DeferralStrategy, ...]:
    """The app's strategies (chosen again when its settings are read again)."""
    settings = get_settings(app)
    found: tuple[BreakerSettings, tuple[DeferralStrategy, ...]] | None = getattr(app, _ATTRIBUTE, None)
    if found is None or found[0] is not settings:
        with _LOCK:
            found = (settings, choose_strategies(settings))
            setattr(app, _ATTRIBUTE, found)
    return found[1]
