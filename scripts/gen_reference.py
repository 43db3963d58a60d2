"""Rewrite the generated tables of docs/configuration.md from the code, or check that they are current.

    .venv/bin/python scripts/gen_reference.py           # rewrite the tables in place
    .venv/bin/python scripts/gen_reference.py --check   # exit 1, with a diff, if they are stale

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``;
everything outside the markers is hand-written and left as it is. Defaults are read
from the code (``SETTINGS``, ``BreakerPolicy``'s fields, ``BreakerTask``'s class
attributes), descriptions from ``Doc`` rows (``celery_breaker.integration.setting_docs``' ``SETTING_DOCS`` and
``TASK_OPTION_DOCS``, the policy fields' metadata). A setting, field or option without a
description is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from celery_breaker import BreakerPolicy, BreakerTask  # noqa: E402
from celery_breaker.core.reference import DOC_KEY, Doc  # noqa: E402
from celery_breaker.integration.setting_docs import SETTING_DOCS, TASK_OPTION_DOCS  # noqa: E402
from celery_breaker.integration.settings import SETTINGS  # noqa: E402

REFERENCE = ROOT / "docs" / "configuration.md"
END = "<!-- end generated -->"
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(" + re.escape(END) + ")", re.DOTALL)


# -- what the code says ----------------------------------------------------------


def policy_docs(policy: type[Any] = BreakerPolicy) -> dict[str, tuple[Any, Doc | None]]:
    """Each init field of the policy dataclass: its default and its ``Doc`` (None if it has none)."""
    return {f.name: (f.default, f.metadata.get(DOC_KEY)) for f in dataclasses.fields(policy) if f.init}


def task_options(task: type[Any] = BreakerTask) -> dict[str, Any]:
    """Each ``breaker*`` option of the task class, with its class default.

    ``breaker`` is the option; the class keeps the name given to it in ``breaker_name``
    (``breaker`` itself becomes the ``self.breaker`` accessor)."""
    options = {}
    for name in dir(task):
        if name.startswith("breaker") and name != "breaker_name":
            options[name] = task.breaker_name if name == "breaker" else inspect.getattr_static(task, name)
    return options


def undocumented(
    settings: Mapping[str, Any] = SETTINGS,
    setting_docs: Mapping[str, Doc] = SETTING_DOCS,
    policy: type[Any] = BreakerPolicy,
    task: type[Any] = BreakerTask,
    option_docs: Mapping[str, Doc] = TASK_OPTION_DOCS,
) -> list[str]:
    """Everything the reference cannot describe: code without a ``Doc``, or a ``Doc`` for nothing."""
    problems = [f"setting {name}: no row in SETTING_DOCS" for name in settings if name not in setting_docs]
    problems += [
        f"SETTING_DOCS[{name!r}]: no such setting in SETTINGS" for name in setting_docs if name not in settings
    ]
    problems += [
        f"BreakerPolicy.{name}: no field(metadata=doc(...))"
        for name, (_, found) in policy_docs(policy).items()
        if not isinstance(found, Doc)
    ]
    options = task_options(task)
    problems += [f"task option {name}: no row in TASK_OPTION_DOCS" for name in options if name not in option_docs]
    problems += [
        f"TASK_OPTION_DOCS[{name!r}]: no such option on BreakerTask" for name in option_docs if name not in options
    ]
    every = [*setting_docs.values(), *option_docs.values()]
    every += [found for _, found in policy_docs(policy).values() if isinstance(found, Doc)]
    problems += [
        f"a Doc with an empty accepts or meaning: {found!r}" for found in every if not (found.accepts and found.meaning)
    ]
    return problems


# -- rendering -------------------------------------------------------------------


def literal(value: Any) -> str:
    """``value`` as Python source, the way a user would write it in a setting."""
    if isinstance(value, type) or inspect.isfunction(value):
        return str(value.__qualname__)
    if isinstance(value, tuple):
        items = [literal(item) for item in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value: Any, found: Doc) -> str:
    shown = f"`{literal(value)}`"
    return _cell(f"{shown}: {found.default}" if found.default else shown)


def _table(header: str, rows: list[str]) -> str:
    columns = header.count("|") - 1
    return "\n".join([header, "|" + "---|" * columns, *rows]) + "\n"


def render_settings() -> str:
    rows = []
    for name, value in SETTINGS.items():
        found = SETTING_DOCS[name]
        rows.append(f"| `{name}` | {_default(value, found)} | {_cell(found.accepts)} | {_cell(found.meaning)} |")
    return _table("| setting | default | type and validation | meaning |", rows)


def render_task_options() -> str:
    options = task_options()
    rows = []
    for name, found in TASK_OPTION_DOCS.items():
        rows.append(
            f"| `{name}` | {_default(options[name], found)} | {_cell(found.accepts)} | {_cell(found.meaning)} |"
        )
    return _table("| option | default | type and validation | meaning |", rows)


def render_policy() -> str:
    rows = []
    for name, (value, found) in policy_docs().items():
        assert isinstance(found, Doc)
        rows.append(f"| `{name}` | {_default(value, found)} | {_cell(found.accepts)} | {_cell(found.meaning)} |")
    return _table("| field | default | type and validation | meaning |", rows)


SECTIONS: dict[str, Callable[[], str]] = {
    "settings": render_settings,
    "task-options": render_task_options,
    "policy": render_policy,
}


def regenerate(text: str) -> str:
    """``text`` with every generated block rewritten; every section must appear exactly once."""
    found = [match.group("name") for match in _BLOCK.finditer(text)]
    for name in SECTIONS:
        if found.count(name) != 1:
            raise SystemExit(
                f"{REFERENCE.name}: expected one '<!-- generated: {name} -->' block, found {found.count(name)}"
            )
    unknown = sorted(set(found) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"{REFERENCE.name}: unknown generated block(s) {', '.join(unknown)}")

    def replace(match: re.Match[str]) -> str:
        # Blank lines around the table: Markdown would read a table touching the comment as HTML.
        return match.group(1) + "\n" + SECTIONS[match.group("name")]() + "\n" + match.group(4)

    return _BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if the file is stale")
    parser.add_argument("--file", type=Path, default=REFERENCE, help="the reference to rewrite (default: %(default)s)")
    args = parser.parse_args(argv)
    problems = undocumented()
    if problems:
        print("undocumented (add a Doc beside the code):", *problems, sep="\n  ", file=sys.stderr)
        return 1
    path: Path = args.file
    current = path.read_text(encoding="utf-8")
    fresh = regenerate(current)
    if not args.check:
        if fresh != current:
            path.write_text(fresh, encoding="utf-8")
            print(f"rewrote {path}")
        return 0
    if fresh == current:
        return 0
    diff = difflib.unified_diff(
        current.splitlines(keepends=True),
        fresh.splitlines(keepends=True),
        f"{path} (committed)",
        f"{path} (from the code)",
    )
    sys.stdout.writelines(diff)
    print(f"\n{path} is stale: run `python scripts/gen_reference.py`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
