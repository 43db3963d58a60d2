"""The ``celery breaker`` command: ``status``, ``open``/``close``/``reset``/``disable``, ``purge`` and ``watch``.

Celery imports this module on every ``celery`` call (the ``celery.commands`` entry
point), so at module level it imports only click, Celery's own CLI base (which
``celery`` has already loaded) and ``control``, which registers the remote-control
commands; importing it through the ``celery_breaker`` package also connects the plugin's
``worker_init`` hook, so CLI-started workers load the plugin's steps. The settings, the
store, Redis and the rendering load inside the commands that use them (import cost, not
import cycles: ``tests/test_architecture.py`` checks). Every error is one line on stderr
and an exit code (see ``docs/cli.md``).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import click
from celery.bin.base import CeleryCommand

# Every `celery` command imports this entry point: registering the remote-control
# commands here lets `celery inspect breakers` / `celery control breaker_open` be sent.
from ..errors import BreakerKeyError, ConfigurationError, StorageError, UnknownBreakerError
from ..labels import breaker_label, split_label
from . import control  # noqa: F401
from .actions import ACTIONS

if TYPE_CHECKING:
    from ..clock import Clock
    from ..monitoring.status import BreakerStatus
    from .operator import Move

__all__ = [
    "EXIT_CONFIG",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "BadInputError",
    "BreakerCommandError",
    "NotConfiguredError",
    "StoreUnavailableError",
    "breaker",
]

#: Exit codes: a bad argument (as click's own usage errors), the store cannot be
#: reached (as Celery's broker errors, sysexits ``EX_UNAVAILABLE``), and settings that
#: cannot work, a memory store included (sysexits ``EX_CONFIG``). Anything else: 1.
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78

#: Set to ``1`` to see the traceback of an unexpected error instead of its one line.
TRACEBACK_ENV = "CELERY_BREAKER_TRACEBACK"

# Test seams for ``watch``: where time comes from (None: the system clock) and how it waits.
_clock: Clock | None = None
_sleep: Callable[[float], None] = time.sleep

_HIDE_CURSOR, _SHOW_CURSOR, _HOME, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[?25l", "\x1b[?25h", "\x1b[H", "\x1b[K", "\x1b[J"

P = ParamSpec("P")
R = TypeVar("R")


class BreakerCommandError(click.ClickException):
    """A one-line error (``Error: ...`` on stderr); each subclass has its exit code."""

    exit_code = 1


class BadInputError(BreakerCommandError):
    """An unknown breaker or a malformed key."""

    exit_code = EXIT_USAGE


class StoreUnavailableError(BreakerCommandError):
    """The store could not be reached."""

    exit_code = EXIT_UNAVAILABLE


class NotConfiguredError(BreakerCommandError):
    """Settings that cannot work here (a memory store, a bad ``breaker_*`` value)."""

    exit_code = EXIT_CONFIG


def _reporting(command: Callable[P, R]) -> Callable[P, R]:
    """Turn every error a command can meet into one line and an exit code, never a traceback."""

    @functools.wraps(command)
    def reported(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (UnknownBreakerError, BreakerKeyError) as exc:
            raise BadInputError(str(exc)) from None
        except ConfigurationError as exc:
            raise NotConfiguredError(str(exc) + _without_app_hint()) from None
        except StorageError as exc:
            raise StoreUnavailableError(_unreachable(exc)) from None
        except Exception as exc:
            if os.environ.get(TRACEBACK_ENV):
                raise
            raise BreakerCommandError(
                f"unexpected {type(exc).__name__}: {exc} (set {TRACEBACK_ENV}=1 to see the traceback)"
            ) from None

    return reported


def _unreachable(exc: Exception) -> str:
    from ..integration.settings import get_settings
    from ..storage import describe_url

    cause = exc.__cause__
    reason = str(cause) if cause is not None else str(exc)
    try:
        url = describe_url(get_settings(_app(click.get_current_context())).storage_url)
    except Exception:  # the settings were read before the store failed; this is only the message
        url = "(breaker_storage_url)"
    return f"cannot reach the breaker store {url}: {reason}"


def _without_app_hint() -> str:
    """A hint when ``celery`` was not told which app: Celery's default one has no settings."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.find_root().params.get("app") is not None:
        return ""
    return " (no -A/--app was given: `celery -A proj breaker ...` reads proj's settings)"


def _app(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        from celery import current_app

        app = current_app
    return app


def _use_color(ctx: click.Context, flag: bool | None) -> bool:
    """``--color``/``--no-color`` if given; else off under ``celery --no-color`` (or
    ``NO_COLOR``), on when stdout is a terminal."""
    if flag is not None:
        return flag
    if getattr(ctx.find_root().obj, "no_color", False):
        return False
    return sys.stdout.isatty()


def _matching(rows: Sequence[BreakerStatus], patterns: Sequence[str]) -> list[BreakerStatus]:
    """Rows matching a glob (every row without globs): ``crm*`` matches names,
    ``crm[tenant-*]`` a name and a key (so brackets are not a character class there)."""
    if not patterns:
        return list(rows)
    import fnmatch

    def matches(row: BreakerStatus, pattern: str) -> bool:
        name_glob, key_glob = split_label(pattern)
        snapshot = row.snapshot
        if not fnmatch.fnmatchcase(snapshot.name, name_glob):
            return False
        return key_glob is None or (snapshot.key is not None and fnmatch.fnmatchcase(snapshot.key, key_glob))

    return [row for row in rows if any(matches(row, pattern) for pattern in patterns)]


_COLOR_OPTION = click.option(
    "--color/--no-color",
    default=None,
    help="Colour the states (default: when stdout is a terminal and `celery --no-color` is not given).",
)
_PATTERNS = click.argument("patterns", nargs=-1, metavar="[PATTERN]...")


@click.group(name="breaker")
def breaker() -> None:
    """Show and operate the app's circuit breakers (celery-breaker).

    Reads and changes the breakers in the app's shared store (breaker_storage_url,
    by default the Redis broker's server): no worker needs to be running.
    """


@breaker.command(cls=CeleryCommand)
@_PATTERNS
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per breaker.")
@click.option(
    "--wide",
    "-w",
    is_flag=True,
    help="Add the clock time open breakers may probe, rejections, claimed tasks, streak, generation.",
)
@_COLOR_OPTION
@click.pass_context
@_reporting
def status(ctx: click.Context, patterns: tuple[str, ...], as_json: bool, wide: bool, color: bool | None) -> None:
    """Every breaker in the store: state, failure rate, calls, open until, trips, deferred, parked.

    PATTERN: only breakers matching a glob, by name ('crm*') or NAME[KEY] ('crm[tenant-*]').
    """
    import json

    from ..monitoring.status import collect_metrics
    from ..storage import describe_url
    from .operator import shared_store

    app = _app(ctx)
    store = shared_store(app)
    everything = collect_metrics(store)
    rows = _matching(everything, patterns)
    if as_json:
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
        return
    where = describe_url(store.url)
    if not everything:
        click.echo(f"No breakers in {where} yet: a breaker is stored once a task (or call) uses it.")
        return
    if not rows:
        click.echo(f"No breaker matches {' '.join(patterns)} ({len(everything)} in {where}).")
        return
    from .console import status_text

    click.echo(status_text(rows, now=time.time(), wide=wide, color=_use_color(ctx, color)), color=True)


def _report_move(move: Move, as_json: bool) -> None:
    if as_json:
        import json

        click.echo(
            json.dumps(
                {"action": move.action, "before": move.before and move.before.value, **move.after.as_dict()}, indent=2
            )
        )
        return
    after = move.after.state.value
    was = "created" if move.before is None else f"was {move.before.value}"
    done = "reset: counters zeroed, " if move.action == "reset" else ""
    click.echo(f"{move.label}: {after} ({was}) in {move.store}: {done}{ACTIONS[move.action].after}.")
    if move.policy_differs and move.action == "reset":
        click.echo("The stored policy differed from the app's settings: the breaker now keeps the app's.")
    elif move.policy_differs:
        name = move.label if move.after.key is None else f"{move.after.name} --key {move.after.key}"
        click.echo(f"Note: the stored policy differs from the app's settings; `celery breaker reset {name}` adopts it.")


def _operator_command(action: str, summary: str) -> click.Command:
    details = "NAME[KEY] as `status` shows it, or NAME with --key KEY, names a per-key breaker."

    @click.command(name=action, cls=CeleryCommand, help=f"{summary}\n\n{details}", short_help=summary)
    @click.argument("name")
    @click.option("--key", "-k", default=None, help="The key of a per-key breaker (NAME[KEY] works too).")
    @click.option("--create", is_flag=True, help="Act even on a breaker neither the store nor the app knows.")
    @click.option("--json", "as_json", is_flag=True, help="Print the resulting snapshot as JSON.")
    @click.pass_context
    @_reporting
    def command(ctx: click.Context, name: str, key: str | None, create: bool, as_json: bool) -> None:
        from .operator import operate

        app = _app(ctx)
        app.loader.import_default_modules()  # the app's tasks name its breakers
        _report_move(operate(app, action, name, key, create=create), as_json)

    return cast("click.Command", command)  # CeleryCommand is untyped


for _action in ACTIONS.values():
    breaker.add_command(_operator_command(_action.name, _action.summary))


@breaker.command(cls=CeleryCommand)
@click.argument("name")
@click.option("--key", "-k", default=None, help="The key of a per-key breaker (NAME[KEY] works too).")
@click.option("--force", "-f", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print what was discarded as JSON.")
@click.pass_context
@_reporting
def purge(ctx: click.Context, name: str, key: str | None, force: bool, as_json: bool) -> None:
    """Discard the tasks parked behind NAME: they never run, and their results stay PENDING.

    As many as were parked when the command began go, oldest first; tasks a worker is
    publishing again are left. The breaker's state is not touched. Asks first, unless
    --force. NAME[KEY] as `status` shows it, or NAME with --key KEY, names a per-key breaker.
    """
    from .operator import purge as purge_parked

    app = _app(ctx)
    app.loader.import_default_modules()  # the app's tasks name its breakers
    if not force:
        label = breaker_label(name, key)
        click.confirm(f"Discard the tasks parked behind {label}? They will never run.", abort=True)
    done = purge_parked(app, name, key)
    if as_json:
        import json

        click.echo(json.dumps({"breaker": done.label, "discarded": done.discarded, "parked": done.parked,
                               "claimed": done.claimed, "store": done.store}, indent=2))  # fmt: skip
        return
    noun = "task" if done.discarded == 1 else "tasks"
    text = f"{done.label}: discarded {done.discarded} parked {noun} in {done.store}"
    left = [f"{done.parked} parked since"] if done.parked else []
    left += [f"{done.claimed} being published, which run"] if done.claimed else []
    click.echo(text + (f" ({'; '.join(left)})" if left else "") + ".")


@breaker.command(cls=CeleryCommand)
@_PATTERNS
@click.option(
    "--interval",
    "-i",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--iterations", "-n", type=click.IntRange(min=1), default=None, help="Stop after N refreshes.")
@click.option("--once", is_flag=True, help="Draw one refresh and stop (as --iterations 1).")
@_COLOR_OPTION
@click.pass_context
@_reporting
def watch(
    ctx: click.Context,
    patterns: tuple[str, ...],
    interval: float,
    iterations: int | None,
    once: bool,
    color: bool | None,
) -> None:
    """A live view of the breakers: states, time in state, calls/deferrals/rejections per
    second, and the changes seen between refreshes. Ctrl-C quits.

    On a terminal it redraws in place; otherwise each refresh is printed after the last.
    PATTERN: only breakers matching a glob, as for `status`.
    """
    from ..clock import SYSTEM_CLOCK
    from ..monitoring.status import collect_metrics
    from ..storage import describe_url
    from .operator import shared_store
    from .watch import Watch, fit, run_watch

    store = shared_store(_app(ctx))
    terminal = sys.stdout.isatty()
    use_color = _use_color(ctx, color)

    def fetch() -> list[BreakerStatus]:
        return _matching(collect_metrics(store), patterns)

    drawn = False

    def draw(frame: str) -> None:
        nonlocal drawn
        if terminal:  # redraw in place: home, each line cleared to its end, the rest cleared
            size = shutil.get_terminal_size()
            frame = fit(frame, size.columns, size.lines - 1)
            frame = _HOME + frame.replace("\n", _CLEAR_LINE + "\n") + _CLEAR_LINE + "\n" + _CLEAR_BELOW
            if not drawn:
                frame = _HIDE_CURSOR + frame
        else:
            frame += "\n\n"
        click.echo(frame, nl=False, color=True)  # the frame is plain unless colour was chosen
        drawn = True

    try:
        run_watch(
            fetch,
            draw,
            Watch(_clock or SYSTEM_CLOCK),
            store=describe_url(store.url),
            interval=interval,
            iterations=1 if once else iterations,
            sleep=_sleep,
            errors=(StorageError,),
            color=use_color,
        )
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends: no traceback, exit 0
        if terminal:
            click.echo("")  # the prompt comes back under the view, not after the ^C
    finally:
        if terminal and drawn:
            click.echo(_SHOW_CURSOR, nl=False, color=True)
