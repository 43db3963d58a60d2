"""A worker's process tree from Linux ``/proc``: its pids and resident memory (main process, pool children)."""

from __future__ import annotations

import contextlib
import os

__all__ = ["children", "rss", "tree_rss"]


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies, killed but not yet reaped, are left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                state, parent = stat.read().rsplit(")", 1)[1].split()[:2]
                if parent == str(pid) and state not in ("Z", "X"):
                    found.append(int(entry))
    return found


def rss(pid: int) -> int:
    """``VmRSS`` of ``pid`` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def tree_rss(pid: int) -> tuple[int, int]:
    """(RSS of ``pid``, RSS of its children summed), bytes."""
    return rss(pid), sum(rss(child) for child in children(pid))
