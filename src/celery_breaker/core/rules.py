"""Trip rules: when a CLOSED breaker trips, one small strategy object per rule (the machine owns the state).

Each rule sees every outcome of a CLOSED breaker and says whether it calls for a trip;
``rules_for`` builds a policy's rules in a fixed order. ``storage/lua/common.lua`` keeps
the same rules, under the same kind names, in its ``RULES`` table; the Redis policy text
carries each rule's ``kind`` and ``parameters``. A new rule is a class here, one line in
``rules_for`` and one entry in ``RULES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar, Protocol

from .policy import BreakerPolicy
from .windows import CountWindow, FailureTimes, RateWindow, TimeWindow

__all__ = ["ConsecutiveFailures", "FailuresWithin", "Rates", "TripRule", "rules_for"]


class TripRule(Protocol):
    """One way for a CLOSED breaker to trip. Not thread-safe: the machine's owner serialises calls."""

    kind: ClassVar[str]
    """The rule's name in the Redis policy text and in ``common.lua``'s ``RULES``."""

    @property
    def parameters(self) -> Mapping[str, int | float]:
        """The rule's parameters by name, as the Redis scripts read them (unset ones left out)."""
        ...

    minds_successes: ClassVar[bool]
    """Whether a success can ever change the rule (``succeed`` is called only then)."""
    quiet_varies: ClassVar[bool]
    """Whether ``quiet`` changes with the outcomes (else it is the same for ever)."""

    @property
    def quiet(self) -> bool:
        """True when a success would change nothing (so the memory store may count it without its lock)."""
        ...

    def succeed(self, now: float) -> None:
        """Count a success of a CLOSED breaker that was not slow (it trips no rule)."""
        ...

    def unlocked_success(self) -> Callable[[float], bool] | None:
        """A function counting such a success without the owner's lock, returning False
        when it cannot right now (then ``succeed`` counts it under the lock); or None
        when this rule always needs the lock (the memory store asks once per policy)."""
        ...

    def observe(self, failed: bool, slow: bool, now: float) -> str | None:
        """Count one outcome of a CLOSED breaker; the reason to trip, or None."""
        ...

    def failures(self, now: float) -> int:
        """Failures the rule holds at ``now`` (what a transition or snapshot shows)."""
        ...

    def calls(self, now: float) -> int:
        """Calls the rule holds at ``now`` (0 for a rule that counts only failures)."""
        ...

    def slow_calls(self, now: float) -> int:
        """Slow calls the rule holds at ``now`` (0 for a rule that does not judge durations)."""
        ...

    def clear(self) -> None:
        """Forget every outcome (on every transition into or out of CLOSED, and into OPEN)."""
        ...

    def at_rest(self, now: float) -> bool:
        """True when forgetting this rule's outcomes would change no decision."""
        ...


class FailuresWithin:
    """``threshold`` failures within ``window`` seconds, exactly; successes change nothing."""

    kind: ClassVar[str] = "failures_within"
    minds_successes: ClassVar[bool] = False
    quiet_varies: ClassVar[bool] = False
    quiet = True

    __slots__ = ("_times", "_reason", "parameters")

    def __init__(self, threshold: int, window: float) -> None:
        self._times = FailureTimes(threshold, window)
        self._reason = f"{threshold} failures within {window:g} s"
        self.parameters: Mapping[str, int | float] = {"threshold": threshold, "window": window}

    def observe(self, failed: bool, slow: bool, now: float) -> str | None:
        if failed and self._times.add(now):
            return self._reason
        return None

    def succeed(self, now: float) -> None:
        pass  # (never called: a success changes nothing here)

    def unlocked_success(self) -> Callable[[float], bool] | None:
        return None  # (never needed: the rule is always quiet)

    def failures(self, now: float) -> int:
        return self._times.count(now)

    def calls(self, now: float) -> int:
        return 0

    def slow_calls(self, now: float) -> int:
        return 0

    def clear(self) -> None:
        self._times.clear()

    def at_rest(self, now: float) -> bool:
        return self._times.count(now) == 0


class ConsecutiveFailures:
    """``threshold`` failures in a row (pybreaker's ``fail_max``): any success ends the run.

    Ignored outcomes never reach a rule, so they leave the run as it is. O(1), one integer.
    """

    kind: ClassVar[str] = "consecutive_failures"
    minds_successes: ClassVar[bool] = True
    quiet_varies: ClassVar[bool] = True

    __slots__ = ("_threshold", "_run", "_reason", "parameters")

    def __init__(self, threshold: int) -> None:
        self._threshold = threshold
        self._run = 0
        self._reason = f"{threshold} consecutive failures"
        self.parameters: Mapping[str, int | float] = {"threshold": threshold}

    @property
    def quiet(self) -> bool:
        return self._run == 0  # a success only matters while it ends a run

    def observe(self, failed: bool, slow: bool, now: float) -> str | None:
        if not failed:
            self._run = 0
            return None
        self._run += 1
        return self._reason if self._run >= self._threshold else None

    def succeed(self, now: float) -> None:
        self._run = 0

    def unlocked_success(self) -> Callable[[float], bool] | None:
        return None  # ending a run races with a failure extending it: under the lock

    def failures(self, now: float) -> int:
        return self._run

    def calls(self, now: float) -> int:
        return 0

    def slow_calls(self, now: float) -> int:
        return 0

    def clear(self) -> None:
        self._run = 0

    def at_rest(self, now: float) -> bool:
        return self._run == 0


class Rates:
    """The failure rate and the slow-call rate, over one window: the last ``count_window``
    calls, or else the last ``window`` seconds. Judged once ``calls_to_judge`` calls are in it,
    and only on a failed or slow call (a fast success only lowers both rates)."""

    kind: ClassVar[str] = "rates"
    minds_successes: ClassVar[bool] = True
    quiet_varies: ClassVar[bool] = False
    quiet = False  # every outcome is counted in the window

    __slots__ = ("_window", "_failure_rate", "_slow_rate", "_calls_to_judge", "parameters")

    def __init__(
        self,
        *,
        failure_rate: float | None,
        slow_rate: float | None,
        calls_to_judge: int,
        count_window: int | None,
        window: float,
    ) -> None:
        self._window: RateWindow = CountWindow(count_window) if count_window is not None else TimeWindow(window)
        self._failure_rate = failure_rate
        self._slow_rate = slow_rate
        self._calls_to_judge = calls_to_judge
        described: dict[str, int | float | None] = {
            "failure_rate_threshold": failure_rate,
            "slow_call_rate_threshold": slow_rate,
            "calls_to_judge": calls_to_judge,
        }
        described.update({"count_window": count_window} if count_window is not None else {"window": window})
        self.parameters: Mapping[str, int | float] = {k: v for k, v in described.items() if v is not None}

    def observe(self, failed: bool, slow: bool, now: float) -> str | None:
        window = self._window
        window.add(now, failed, slow)
        if not (failed or slow):
            return None
        calls, failures, slow_calls = window.totals(now)
        if calls < self._calls_to_judge:
            return None
        rate, slow_rate = self._failure_rate, self._slow_rate
        # (thresholds as percentages to six significant digits, as Lua's %g writes them in
        # the Redis scripts: a threshold of 0.001 read ">= 0%" rounded to whole percents)
        if rate is not None and failures >= rate * calls:
            return f"failure rate {failures}/{calls} >= {rate * 100:g}%"
        if slow_rate is not None and slow_calls >= slow_rate * calls:
            return f"slow-call rate {slow_calls}/{calls} >= {slow_rate * 100:g}%"
        return None

    def succeed(self, now: float) -> None:
        self._window.add(now, False, False)

    def unlocked_success(self) -> Callable[[float], bool] | None:
        return self._window.add_success_unlocked  # (a fast success only lowers both rates)

    def failures(self, now: float) -> int:
        return self._window.totals(now)[1]

    def calls(self, now: float) -> int:
        return self._window.totals(now)[0]

    def slow_calls(self, now: float) -> int:
        return self._window.totals(now)[2]

    def clear(self) -> None:
        self._window.clear()

    def at_rest(self, now: float) -> bool:
        return self._window.totals(now)[0] == 0


def rules_for(policy: BreakerPolicy) -> tuple[TripRule, ...]:
    """The policy's trip rules, in a fixed order: failures within a window, consecutive
    failures, rates. The first to give a reason trips the breaker; every rule sees every
    outcome. The last rule's counts are the ones transitions and snapshots show (a rate
    window counts every call, so it shows the most); ``common.lua`` follows the same order.
    """
    rules: list[TripRule] = []
    if policy.failure_threshold is not None:
        rules.append(FailuresWithin(policy.failure_threshold, policy.window))
    if policy.consecutive_failures is not None:
        rules.append(ConsecutiveFailures(policy.consecutive_failures))
    if policy.uses_rates:
        rules.append(
            Rates(
                failure_rate=policy.failure_rate_threshold,
                slow_rate=policy.slow_call_rate_threshold,
                calls_to_judge=policy.calls_to_judge,
                count_window=policy.count_window,
                window=policy.window,
            )
        )
    return tuple(rules)
