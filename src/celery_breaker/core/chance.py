"""The library's own source of randomness (jitter, spreads): never the global ``random``.

An application may seed the global ``random`` (reproducible tests, simulations): the
breaker's jitter must neither shift that sequence nor follow it. A forked process (a
prefork pool child) draws a sequence of its own, as the global one does, so workers'
jitter stays spread apart.
"""

from __future__ import annotations

import os
import random

__all__ = ["CHANCE"]

CHANCE = random.Random()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=CHANCE.seed)
