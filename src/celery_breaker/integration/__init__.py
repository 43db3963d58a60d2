"""celery-breaker inside Celery (internal): the task class, its options and settings, deferral, the worker's steps.

``plugin`` is how celery-breaker gets into a worker (``install`` and the ``worker_init``
hook name the worker steps); ``worker`` holds those steps; ``task`` is ``BreakerTask``;
``deferral`` publishes a rejected run again, by one of its strategies; ``settings`` is
the one place Celery settings are read. See ``docs/architecture.md``.
"""

__all__: list[str] = []
