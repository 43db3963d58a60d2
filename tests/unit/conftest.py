"""Fixtures for the unit tests."""

from __future__ import annotations

import pytest

from celery_breaker.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
