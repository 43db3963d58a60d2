"""Runnable examples of celery-breaker (each is run by the test suite)."""
