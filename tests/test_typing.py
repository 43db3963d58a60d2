"""The public API's types, checked from a consumer's side of the package boundary.

``tests/typing/consumer.py`` is a program using the public API. Here mypy --strict checks
it from outside the checkout, so ``celery_breaker`` resolves through the installed
package (its ``py.typed`` marker and inline types), not through the project's ``src``.
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from celery_breaker import BreakerPolicy
from celery_breaker.core import policy
from celery_breaker.core.reference import DOC_KEY

CONSUMER = Path(__file__).parent / "typing" / "consumer.py"
# A user's strict configuration: Celery ships no types (so ``@app.task`` is an untyped
# decorator); everything else must be typed.
CONFIG = """\
[mypy]
strict = True
warn_unreachable = True
disallow_untyped_decorators = False

[mypy-celery.*,kombu.*]
ignore_missing_imports = True
"""


def mypy(workdir: Path, source: Path) -> subprocess.CompletedProcess[str]:
    (workdir / "mypy.ini").write_text(CONFIG)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--no-incremental", source.name],
        cwd=workdir, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    workdir = tmp_path_factory.mktemp("consumer")
    shutil.copy(CONSUMER, workdir / CONSUMER.name)
    return workdir, mypy(workdir, workdir / CONSUMER.name)


def test_a_strict_consumer_type_checks_against_the_installed_package(
    checked: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, done = checked
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues found in 1 source file" in done.stdout


def test_a_misuse_of_the_public_api_is_a_type_error(checked: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    workdir, _ = checked
    broken = workdir / "broken.py"
    text = CONSUMER.read_text()
    # Drop the ignore on one misuse: mypy must now report that very line.
    misuse = 'breaker.call(charge, "1", amount=9.5)  # type: ignore[arg-type]'
    assert misuse in text
    broken.write_text(text.replace(misuse, 'breaker.call(charge, "1", amount=9.5)'))
    done = mypy(workdir, broken)
    assert done.returncode == 1, done.stdout
    assert 'Argument 2 to "call" of "CircuitBreaker" has incompatible type "str"; expected "int"' in done.stdout


def test_the_consumer_program_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(CONSUMER)], capture_output=True, text=True, timeout=120, check=False, cwd=CONSUMER.parent
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "public API ok"


def test_the_policy_constructors_typed_signature_keeps_to_its_fields() -> None:
    # BreakerPolicy declares its constructor for type checkers only (durations as a
    # timedelta too): a field added, renamed or moved without it would be a type error
    # for a correct program, or a misspelt argument one mypy lets pass.
    tree = ast.parse(Path(policy.__file__).read_text())
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "BreakerPolicy").body
    guarded = next(node for node in body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    init = next(node for node in guarded.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    typed = {arg.arg: ast.unparse(arg.annotation) for arg in init.args.kwonlyargs if arg.annotation is not None}
    fields = [found for found in dataclasses.fields(BreakerPolicy) if found.init]
    assert list(typed) == [found.name for found in fields]
    assert [arg.arg for arg in init.args.args] == ["self"]
    assert init.args.vararg is None
    assert init.args.kwarg is None
    for found in fields:
        if "timedelta" in found.metadata[DOC_KEY].accepts:
            assert "timedelta" in typed[found.name], found.name
