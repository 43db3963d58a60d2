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

import contextlib
import functools
import io
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

import click
from celery.bin.base import CeleryCommand

# Every `celery` command imports this entry point: registering the remote-control
# commands here lets `celery inspect breakers` / `celery control breaker_open` be sent.
from ..errors import BreakerKeyError, ConfigurationError, ParkedTasksError, StorageError, UnknownBreakerError
from ..labels import breaker_label, shown_label, split_label, visible
from . import control  # noqa: F401
from .actions import ACTIONS, DELETE
from .options import REFRESH_INTERVAL

if TYPE_CHECKING:
    from ..clock import Clock
    from ..monitoring.status import BreakerStatus
    from .operator import Move

__all__ = [
    "EXIT_CONFIG",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "SIGPIPE_EXIT",
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
#: ``purge`` that discarded nothing in an app whose deferred tasks wait in the broker
#: (RabbitMQ's delay queues), where it cannot reach them: not done, as a ``delete``
#: refused for parked tasks.
EXIT_ELSEWHERE = 1
#: A reader that closed the pipe early (``| head``): what a shell reports for a command
#: killed by SIGPIPE (128 + 13), with nothing written to stderr.
SIGPIPE_EXIT = 141

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


def _confirm(question: str, skip: str) -> None:
    """Ask ``question`` on stderr (stdout carries only the report: ``--json`` stays JSON);
    abort unless the answer is yes. With no answer to read (a script, CI, a cron job: stdin
    at its end, not a terminal) the refusal says which option (``skip``) does it without
    asking, where it said only "Aborted!"."""
    try:
        answered = click.confirm(question, err=True)
    except click.Abort:
        if sys.stdin is not None and not sys.stdin.isatty():
            click.echo(err=True)  # (ends the question's line)
            raise click.ClickException(
                f"no answer to {question!r}: stdin is not a terminal; pass {skip} to go on without asking"
            ) from None
        raise
    if not answered:
        raise click.Abort


def _reporting(command: Callable[P, R]) -> Callable[P, R]:
    """Turn every error a command can meet into one line and an exit code, never a traceback."""

    @functools.wraps(command)
    def reported(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            # The reader went away (`celery breaker watch | head`): stop quietly, as a
            # command killed by SIGPIPE does, and let nothing else write to the pipe.
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            raise click.exceptions.Exit(SIGPIPE_EXIT) from None
        except (UnknownBreakerError, BreakerKeyError) as exc:
            raise BadInputError(str(exc)) from None
        except ParkedTasksError as exc:
            raise BreakerCommandError(str(exc)) from None
        except ConfigurationError as exc:
            raise NotConfiguredError(str(exc) + _without_app_hint()) from None
        except StorageError as exc:
            raise StoreUnavailableError(_unreachable(exc)) from None
        except Exception as exc:
            if os.environ.get(TRACEBACK_ENV):
                raise
            from ..storage.masking import MaskedText

            raise BreakerCommandError(
                f"unexpected {type(exc).__name__}: {MaskedText(exc)} (set {TRACEBACK_ENV}=1 to see the traceback)"
            ) from None

    return reported


def _unreachable(exc: Exception) -> str:
    from ..integration.settings import get_settings
    from ..storage import describe_url
    from ..storage.masking import masked_in_text
    from ..storage.redis.damage import advice, error_text

    cause = exc.__cause__
    reason = masked_in_text(error_text(cause) if cause is not None else str(exc))
    fix = advice(cause) if cause is not None else ""
    if fix:  # (Redis's own text, the cause's, never holds it)
        reason += f" ({fix})"
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
    _whole_writes()


#: The stdout ``_whole_writes`` replaced: kept, so that collecting it never closes the
#: file both write to.
_REPLACED: list[Any] = []


def _whole_writes() -> None:
    """Make stdout write all it is given, or raise ``BrokenPipeError``. Under
    ``PYTHONUNBUFFERED`` (usual in containers) its binary layer is the raw file, and a
    write the pipe's reader cut short (``status | head``) lost the rest with no error:
    the command exited 0, not ``SIGPIPE_EXIT``. A buffered layer writes until all is
    written, or raises."""
    stream = sys.stdout
    raw = getattr(stream, "buffer", None)
    if type(stream) is not io.TextIOWrapper or not isinstance(raw, io.RawIOBase):
        return  # (buffered already, or not a file: a test runner's capture)
    stream.flush()
    _REPLACED.append(stream)
    sys.stdout = io.TextIOWrapper(
        io.BufferedWriter(raw), encoding=stream.encoding, errors=stream.errors, line_buffering=True
    )


class NamingCommand(CeleryCommand):  # type: ignore[misc]  # (CeleryCommand is untyped)
    """A command whose arguments are breaker names or patterns. Click reads a word that
    starts with ``-`` as an option, so ``celery breaker reset -pay`` failed with "No such
    option '-p'" and no word of the way out: the error now says that a name starting
    with ``-`` goes after ``--`` and gives the command that reads it so."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        typed = list(args)  # (click's parser takes the words out of ``args`` as it reads them)
        try:
            return cast("list[str]", super().parse_args(ctx, args))
        except click.NoSuchOption as error:
            word = _unknown_word(self.get_params(ctx), typed)
            if word is None or word.split("=", 1)[0] in _sibling_options(ctx):
                raise  # (``status --key K``: an option of another command, no name)
            rest = [arg for arg in typed if arg is not word]
            after = rest.index("--") + 1 if "--" in rest else len(rest)
            words = ["celery", "breaker", ctx.info_name or "", *rest[:after], *(() if "--" in rest else ("--",)),
                     word, *rest[after:]]  # fmt: skip
            hint = f"If {word!r} is a breaker's name, put it after '--': {shlex.join(words)}"
            raise click.UsageError(f"{error.format_message()} {hint}", ctx=ctx) from None


def _sibling_options(ctx: click.Context) -> set[str]:
    """The options of every ``celery breaker`` command (this one's parent's)."""
    group = ctx.parent.command if ctx.parent is not None else None
    commands = group.commands.values() if isinstance(group, click.Group) else ()
    return {
        name
        for command in commands
        for param in command.params
        if isinstance(param, click.Option)
        for name in (*param.opts, *param.secondary_opts)
    }


def _unknown_word(params: list[click.Parameter], args: list[str]) -> str | None:
    """The first word of ``args`` (before ``--``) that starts with ``-`` and is none of
    ``params``' options (``--key=K``, ``-kK`` and ``-yf`` are theirs), or ``None``."""
    options = [param for param in params if isinstance(param, click.Option)]
    valued = {name for param in options if not param.is_flag for name in param.opts}
    known = {name for param in options for name in (*param.opts, *param.secondary_opts)}
    words = iter(args)
    for word in words:
        if word == "--":
            return None
        if word in valued:
            next(words, None)  # (its value, whatever it starts with)
        elif word.startswith("--") and word.split("=", 1)[0] in known:
            continue
        elif word.startswith("-") and len(word) > 1 and not _short_options(word, known, valued):
            return word
    return None


def _short_options(word: str, known: set[str], valued: set[str]) -> bool:
    """Whether ``word`` is short options run together (``-yf``), the last perhaps with
    its value attached (``-kt1``)."""
    if word.startswith("--"):
        return False
    for char in word[1:]:
        option = f"-{char}"
        if option not in known:
            return False
        if option in valued:
            return True  # (the rest of the word is its value)
    return True


@breaker.command(cls=NamingCommand)
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
    An app deferring into RabbitMQ's delay queues parks nothing in the store: a line under
    the table counts the tasks waiting there (all breakers together). One parking in the
    store (breaker_park=True) on RabbitMQ gets the line when tasks wait there.
    """
    import json

    from .console import listed_rows
    from .operator import shared_store
    from .selection import breakers_matching, unreached_text

    app = _app(ctx)
    store = shared_store(app)
    try:
        rows, everything = breakers_matching(store, patterns)
    except StorageError:
        if not as_json:
            _while_the_store_is_down(app)
        raise
    unreached = unreached_text(everything)
    if as_json:
        click.echo(json.dumps(listed_rows(rows), indent=2))  # (an unreadable breaker: a row of its own)
    else:
        _status_table(ctx, app, store.url, patterns, rows, everything, unreached is not None, wide, color)
    if unreached is not None:  # (what could be read is shown; the exit code says it is not all)
        click.echo(f"Warning: {unreached}.", err=True)
        ctx.exit(EXIT_UNAVAILABLE)


def _status_table(
    ctx: click.Context, app: Any, url: str, patterns: tuple[str, ...], rows: list[BreakerStatus],
    everything: list[BreakerStatus], partial: bool, wide: bool, color: bool | None,
) -> None:  # fmt: skip
    from ..storage import describe_url
    from .selection import unreadable_of

    where = describe_url(url)
    unreadable = unreadable_of(rows)
    if not everything and not unreadable_of(everything) and not partial:
        click.echo(f"No breakers in {where} yet: a breaker is stored once a task (or call) uses it.")
        return
    if not rows and not unreadable:
        read = " read" if partial else ""  # (it may be stored where the listing could not read)
        # (as typed, escaped as status shows names: a pattern pasted from a task's key may
        # hold an escape sequence, which the terminal ran)
        shown = " ".join(visible(pattern) for pattern in patterns)
        click.echo(f"No breaker matches {shown} ({len(everything)}{read} in {where}).")
        return
    from .console import status_text

    shown = status_text(rows, now=time.time(), wide=wide, color=_use_color(ctx, color), unreadable=unreadable)
    click.echo(shown, color=True)
    from .delayed import DelayCounter, status_line

    # What PARKED cannot show (RabbitMQ: PARKED 0 read as "nothing waits"), counted now:
    # a count that fails is said in the line and changes no exit code (the store's stands).
    counter = DelayCounter.of(app)
    line = status_line(app, None if counter is None else counter.count())
    if line is not None:
        click.echo(line)


def _while_the_store_is_down(app: Any) -> None:
    """Before the store's error: what an app that parks in its store (``breaker_park=True``
    on RabbitMQ) deferred into RabbitMQ's delay queues instead, as it does while its store
    is down; nothing when none wait there, it cannot be counted, or the app defers there
    anyway (its tasks' place does not depend on the store: the error alone is said)."""
    from .delayed import fallen_back_text

    said = fallen_back_text(app)
    if said is not None:
        click.echo(f"{said}.")


def _fallen_back_unpurged(app: Any) -> None:
    """After a purge, for an app that parks in its store (``breaker_park=True`` on
    RabbitMQ): the tasks it deferred into RabbitMQ's delay queues instead (every run while
    its store was down), which no purge reaches and which run once their delay is up;
    nothing when none wait there or they cannot be counted (as ``status`` says it). The
    exit code stays the purge's: what it was asked to discard, it did."""
    from .delayed import fallen_back_text

    said = fallen_back_text(app)
    if said is not None:
        click.echo(
            f"Note: {said}. The purge does not reach those: they run once their delay is up (drop them in the "
            "broker if they must not run).",
            err=True,
        )


def _report_move(move: Move, as_json: bool, warned: bool) -> None:
    if move.warning is not None and not warned:  # (--yes, or it began failing after we asked)
        click.echo(f"Warning: {move.warning}.", err=True)
    if as_json:
        import json

        before = move.before and move.before.value
        click.echo(json.dumps({"action": move.action, "before": before, "changed": move.changed,
                               "warning": move.warning, **move.after.as_dict()}, indent=2))  # fmt: skip
        return
    after = move.after.state.value
    if not move.changed:
        fresh = ", counters zero" if move.action == "reset" else ""
        click.echo(f"{shown_label(move.label)}: already {after}{fresh} in {move.store}, nothing changed: "
                   f"{ACTIONS[move.action].after}.")  # fmt: skip
        return
    was = "created" if move.before is None else f"was {move.before.value}"
    done = "reset: counters zeroed, " if move.action == "reset" else ""
    click.echo(f"{shown_label(move.label)}: {after} ({was}) in {move.store}: {done}{ACTIONS[move.action].after}.")
    if move.policy_differs and move.action == "reset":
        click.echo("The stored policy differed from the app's settings: the breaker now keeps the app's.")
    elif move.policy_differs:
        # (quoted as a shell reads it back: a name may hold spaces, quotes and glob characters;
        # a name is printable text, and is read back as typed, not as `visible` escapes it)
        from .console import breaker_command

        command = breaker_command("reset", move.after.name, move.after.key)
        click.echo(f"Note: the stored policy differs from the app's settings; `{command}` adopts it.")


_YES_OPTION = click.option(
    "--yes", "-y", is_flag=True, help="Do not ask when the breaker's downstream was failing (still warns)."
)


def _operator_command(action: str, summary: str) -> click.Command:
    details = "NAME[KEY] as `status` shows it, or NAME with --key KEY, names a per-key breaker."
    cautious = ACTIONS[action].cautious
    if cautious:
        details += (
            "\n\nIf the breaker tripped, or calls through it failed within its window, this warns"
            " that the tasks deferred behind it would run against a failing downstream and spend"
            " their retries, and asks first (--yes: do not ask)."
        )

    @click.command(name=action, cls=NamingCommand, help=f"{summary}\n\n{details}", short_help=summary)
    @click.argument("name")
    @click.option("--key", "-k", default=None, help="The key of a per-key breaker (NAME[KEY] works too).")
    @click.option("--create", is_flag=True, help="Act even on a breaker neither the store nor the app knows.")
    @click.option("--json", "as_json", is_flag=True, help="Print the resulting snapshot as JSON.")
    @_YES_OPTION
    @click.pass_context
    @_reporting
    def command(ctx: click.Context, name: str, key: str | None, create: bool, as_json: bool, yes: bool = False) -> None:
        from .operator import assess, operate, shared_store

        app = _app(ctx)
        app.loader.import_default_modules()  # the app's tasks name its breakers
        store = shared_store(app)
        warning = (
            assess(app, action, name, key, create=create, store=store, as_shown=True) if cautious and not yes else None
        )
        if warning is not None:
            click.echo(f"Warning: {warning}.", err=True)
            # (as typed: printable, and what the warning showed of it)
            _confirm(f"{action.capitalize()} {breaker_label(name, key)} anyway?", "--yes")
        move = operate(app, action, name, key, create=create, store=store, as_shown=True)
        _report_move(move, as_json, warned=warning is not None)

    if not cautious:  # (the option is for the actions that admit calls)
        command.params = [param for param in command.params if param.name != "yes"]
    return cast("click.Command", command)  # CeleryCommand is untyped


for _action in ACTIONS.values():
    breaker.add_command(_operator_command(_action.name, _action.summary))


@breaker.command(cls=NamingCommand, short_help=DELETE.summary)
@click.argument("name")
@click.option("--key", "-k", default=None, help="The key of a per-key breaker (NAME[KEY] works too).")
@click.option("--purge", "discard", is_flag=True, help="Discard the tasks parked behind it too: they never run.")
@_YES_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print what was deleted as JSON.")
@click.pass_context
@_reporting
def delete(ctx: click.Context, name: str, key: str | None, discard: bool, yes: bool, as_json: bool) -> None:
    """Delete NAME from the store: its state, counters, stored policy and metrics history.

    For a stray breaker (a typo given to --create, a task renamed): it leaves status,
    watch and the metrics. A call through it creates it afresh, closed. Tasks parked
    behind it make the command refuse, unless --purge discards them (after asking).
    If its downstream was failing, it warns and asks first, as close does (--yes: do not
    ask). NAME[KEY] as `status` shows it, or NAME with --key KEY, names a per-key breaker.
    """
    from .operator import delete as delete_breaker
    from .operator import shared_store

    app = _app(ctx)
    app.loader.import_default_modules()  # the app's tasks name its breakers
    store = shared_store(app)
    plan = delete_breaker(app, name, key, purge=discard, dry_run=True, store=store, as_shown=True)
    if not yes and (plan.warning is not None or plan.discarded):
        if plan.warning is not None:
            click.echo(f"Warning: {plan.warning}.", err=True)
        tasks = f" and discard the {plan.discarded} task(s) parked behind it (they will never run)"
        _confirm(f"Delete {shown_label(plan.label)}{tasks if plan.discarded else ''}?", "--yes")
    done = delete_breaker(app, name, key, purge=discard, store=store, as_shown=True)
    if done.warning is not None and (yes or plan.warning is None):
        click.echo(f"Warning: {done.warning}.", err=True)
    if as_json:
        import json

        before = done.before.as_dict() if done.before is not None else None
        click.echo(json.dumps({"breaker": done.label, "deleted": done.existed, "before": before,
                               "discarded": done.discarded,
                               "claimed": done.claimed, "in_app": done.in_app, "warning": done.warning,
                               "store": done.store}, indent=2))  # fmt: skip
        return
    if not done.existed:
        text = f"{shown_label(done.label)}: nothing to delete (the app names it, but {done.store} holds nothing of it)"
    else:
        was = f"was {done.before.state.value}" if done.before is not None else "only parked tasks were left of it"
        text = f"{shown_label(done.label)}: deleted ({was}) from {done.store}"
    text += f"; discarded {done.discarded} parked task(s)" if done.discarded else ""
    text += f"; {done.claimed} task(s) being published run" if done.claimed else ""
    click.echo(text + ".")
    if done.in_app:
        name, key = split_label(done.label)
        which = "their next call" if key is None else f"their next call for key {key!r}"
        shown = shown_label(done.label)
        click.echo(f"The app's tasks use {name}: {which} creates {shown} afresh, closed, under the app's policy.")


@breaker.command(cls=NamingCommand)
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
        plan = purge_parked(app, name, key, dry_run=True, as_shown=True)  # (one it would refuse: before asking)
        if plan.parked:
            tasks = "the task" if plan.parked == 1 else f"the {plan.parked} tasks"
            _confirm(f"Discard {tasks} parked behind {shown_label(plan.label)}? They will never run.", "--force")
    done = purge_parked(app, name, key, as_shown=True)
    if as_json:
        import json

        click.echo(json.dumps({"breaker": done.label, "discarded": done.discarded, "parked": done.parked,
                               "claimed": done.claimed, "store": done.store, "waiting_elsewhere": done.elsewhere},
                              indent=2))  # fmt: skip
    else:
        noun = "task" if done.discarded == 1 else "tasks"
        text = f"{shown_label(done.label)}: discarded {done.discarded} parked {noun} in {done.store}"
        left = [f"{done.parked} parked since"] if done.parked else []
        left += [f"{done.claimed} being published, which run"] if done.claimed else []
        click.echo(text + (f" ({'; '.join(left)})" if left else "") + ".")
    if done.elsewhere is not None:
        # (RabbitMQ: the tasks wait in its delay queues, where no purge of ours reaches them,
        # and run once their delay is up; "discarded 0" alone read as "there were none")
        click.echo(
            f"Warning: this app's deferred tasks wait {done.elsewhere}, not in {done.store}: none of those were "
            "discarded, and they run once their delay is up (drop them in the broker if they must not run).",
            err=True,
        )
        if not done.discarded:
            ctx.exit(EXIT_ELSEWHERE)
    else:
        _fallen_back_unpurged(app)


@breaker.command(cls=NamingCommand)
@_PATTERNS
@click.option(
    "--interval",
    "-i",
    type=REFRESH_INTERVAL,
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
    PATTERN: only breakers matching a glob, as for `status`. Under the table, the line
    `status` prints there, counted again at each refresh.
    """
    import textwrap

    from ..clock import SYSTEM_CLOCK
    from ..storage import describe_url
    from .delayed import DelayCounter, status_line
    from .operator import shared_store
    from .selection import breakers_matching
    from .watch import Watch, fit, run_watch

    app = _app(ctx)
    store = shared_store(app)
    terminal = sys.stdout.isatty()
    use_color = _use_color(ctx, color)
    clock = _clock or SYSTEM_CLOCK
    # Over one kept connection (a refresh each second must not open one each time), logging
    # nothing: the line says a failure, and a log line would be written over the view.
    counter = DelayCounter.of(app, kept=True, clock=clock)

    def fetch() -> list[BreakerStatus]:
        return breakers_matching(store, patterns)[0]

    def note() -> str | None:
        line = status_line(app, None if counter is None else counter.count())
        if line is None or not terminal:
            return line
        return "\n".join(textwrap.wrap(line, max(20, shutil.get_terminal_size().columns - 1)))  # (fit cuts lines)

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
            Watch(clock),
            store=describe_url(store.url),
            interval=interval,
            iterations=1 if once else iterations,
            sleep=_sleep,
            errors=(StorageError,),
            color=use_color,
            note=note,
        )
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends: no traceback, exit 0
        if terminal:
            click.echo("")  # the prompt comes back under the view, not after the ^C
    except StorageError:  # (the first reading: later ones are shown and survived)
        _while_the_store_is_down(app)
        raise
    finally:
        if counter is not None:
            counter.close()
        if terminal and drawn:
            click.echo(_SHOW_CURSOR, nl=False, color=True)


# `celery breaker web` (ops/web.py): its options, its server and what it reads load only when it runs.
@breaker.command(name="web", cls=CeleryCommand, add_help_option=False,
                 context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                 short_help="Serve a live page of the breakers in a browser (--help: its options).")  # fmt: skip
@click.pass_context
@_reporting
def web(ctx: click.Context) -> None:
    """A live page of the breakers in a browser: `celery breaker web --help` lists its options."""
    from .web import web as command

    with command.make_context("web", list(ctx.args), parent=ctx.parent, obj=_app(ctx)) as inner:
        command.invoke(inner)
