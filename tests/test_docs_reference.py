"""docs/configuration.md's generated tables match the code, and everything in the code is described."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from celery_breaker import BreakerTask
from celery_breaker.core.reference import Doc, doc
from celery_breaker.integration import task_prepare
from celery_breaker.integration.setting_docs import SETTING_DOCS, TASK_OPTION_DOCS
from celery_breaker.integration.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gen_reference.py"
REFERENCE = ROOT / "docs" / "configuration.md"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen: Any = _load_generator()


def test_the_committed_reference_is_what_the_code_generates() -> None:
    committed = REFERENCE.read_text(encoding="utf-8")
    assert gen.regenerate(committed) == committed, (
        "docs/configuration.md is stale: run `python scripts/gen_reference.py`"
    )


def test_every_setting_policy_field_and_task_option_is_described() -> None:
    assert gen.undocumented() == []


def test_a_setting_without_a_description_is_reported() -> None:
    settings = {**SETTINGS, "breaker_new_thing": 1}
    assert gen.undocumented(settings=settings) == ["setting breaker_new_thing: no row in SETTING_DOCS"]


def test_a_description_of_a_setting_that_does_not_exist_is_reported() -> None:
    docs = {**SETTING_DOCS, "breaker_gone": Doc(accepts="x", meaning="y")}
    assert gen.undocumented(setting_docs=docs) == ["SETTING_DOCS['breaker_gone']: no such setting in SETTINGS"]


def test_a_policy_field_without_a_description_is_reported() -> None:
    @dataclasses.dataclass(frozen=True)
    class Policy:
        described: int = dataclasses.field(default=1, metadata=doc(accepts="int", meaning="counted"))
        bare: int = 2

    assert gen.undocumented(policy=Policy) == ["BreakerPolicy.bare: no field(metadata=doc(...))"]


def test_a_task_option_without_a_description_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # (An option added to BreakerTask itself; on a subclass, as here, the task refuses a
    # breaker_* name that is no option, which this test is not about.)
    monkeypatch.setattr(task_prepare, "_check_option_names", lambda cls, base: None)

    class Task(BreakerTask):
        breaker_new_option: Any = None

    assert gen.undocumented(task=Task) == ["task option breaker_new_option: no row in TASK_OPTION_DOCS"]
    docs = {name: found for name, found in TASK_OPTION_DOCS.items() if name != "breaker_scope"}
    assert gen.undocumented(option_docs=docs) == ["task option breaker_scope: no row in TASK_OPTION_DOCS"]


def test_defaults_in_the_tables_come_from_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SETTINGS, "breaker_release_ramp", 75.0)
    assert "| `breaker_release_ramp` | `75.0` |" in gen.render_settings()
    assert "| `reset_timeout` | `30.0` |" in gen.render_policy()
    assert "| `record_exceptions` | `(downstream_error,)`: every `Exception` except" in gen.render_policy()
    assert '| `breaker_scope` | `None`: `"run"` |' in gen.render_task_options()


def test_check_exits_1_with_a_diff_when_the_file_is_stale(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(REFERENCE.read_text(encoding="utf-8").replace("| `window` | `60.0` |", "| `window` | `61.0` |"))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--file", str(stale)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "-| `window` | `61.0` |" in done.stdout
    assert "+| `window` | `60.0` |" in done.stdout
    assert "is stale" in done.stderr
    fresh = tmp_path / "fresh.md"
    fresh.write_text(REFERENCE.read_text(encoding="utf-8"))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--file", str(fresh)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_a_missing_marker_is_an_error() -> None:
    text = REFERENCE.read_text(encoding="utf-8").replace("<!-- generated: policy -->", "")
    with pytest.raises(SystemExit, match="generated: policy"):
        gen.regenerate(text)
