"""Unit tests of the breaker core: fake clock, no Celery worker, no sleeps."""
