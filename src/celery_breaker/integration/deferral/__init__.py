"""Deferral: publishing a rejected run again so that it runs once its breaker admits it.

``plan`` is the arithmetic (headers, delay, budget; no Celery calls), ``strategy`` the
seam, ``parking`` and ``countdown`` the two strategies, ``selection`` the choice between
them, ``defer`` the one entry point a task calls, ``release`` the worker thread that
publishes parked runs again.
"""

__all__: list[str] = []
