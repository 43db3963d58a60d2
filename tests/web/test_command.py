"""``celery breaker web``'s refusals, in-process: each is one line and the CLI's exit code, before anything listens."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.bin.celery import celery as celery_main
from click.testing import CliRunner, Result

from celery_breaker.integration.settings import reload_settings
from celery_breaker.ops.cli import EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_USAGE
from celery_breaker.ops.web import TOKEN_ENV, load_token
from tests.servers import free_port
from tests.tls import Certificates

from . import webproj
from .conftest import WebProcess


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """``celery -A tests.web.webproj:app breaker web <args>`` through Celery's own main command."""
    argv = ["-A", "tests.web.webproj:app", "breaker", "web", *args]
    return CliRunner().invoke(celery_main, argv, catch_exceptions=False, env=env)


@pytest.fixture
def use_store() -> Iterator[None]:
    """The test app's store is set back to memory:// after the test."""
    yield
    webproj.app.conf.update(breaker_storage_url="memory://")
    reload_settings(webproj.app)


def store(url: str) -> None:
    webproj.app.conf.update(breaker_storage_url=url)
    reload_settings(webproj.app)


def one_line_error(result: Result) -> str:
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: ")
    assert "Traceback" not in result.output
    return line


def test_a_memory_store_is_refused_as_by_every_breaker_command(use_store: None) -> None:
    result = run()
    assert result.exit_code == EXIT_CONFIG
    assert one_line_error(result).startswith("Error: breaker_storage_url is 'memory://': a memory store holds only")


def test_a_store_that_cannot_be_reached_exits_69(use_store: None) -> None:
    store(f"redis://127.0.0.1:{free_port()}/0")
    result = run()
    assert result.exit_code == EXIT_UNAVAILABLE
    assert one_line_error(result).startswith("Error: cannot reach the breaker store redis://127.0.0.1:")


def test_an_address_other_machines_reach_needs_allow_remote() -> None:
    result = run("--address", "0.0.0.0")
    assert result.exit_code == EXIT_USAGE
    assert "Error: --address 0.0.0.0 is reachable from other machines" in result.output
    assert "pass --allow-remote" in result.output


@pytest.mark.parametrize("value", ["https://breakers.example.com", "breakers.example.com:8443", "host/breakers", ""])
def test_allow_host_takes_a_host_name_alone(value: str) -> None:
    result = run("--allow-host", value)
    assert result.exit_code == EXIT_USAGE
    assert "is not a host name: give the name the browser shows" in result.output


@pytest.mark.slow
def test_allow_remote_without_allow_host_warns_that_any_name_is_answered(redis_url: str) -> None:
    # (a site whose name resolves to the server's address reads the page: DNS rebinding)
    url = f"{redis_url}/0?key_prefix=web-hosts"
    with WebProcess(url, "--allow-remote") as any_name:
        pass
    assert "Warning: the page answers under any host name" in any_name.stderr()
    assert "--allow-host NAME" in any_name.stderr()
    with WebProcess(url, "--allow-remote", "--allow-host", "breakers.example.com") as named:
        pass
    assert "any host name" not in named.stderr()


@pytest.mark.parametrize("interval", ["nan", "inf", "1e9"])
def test_an_interval_that_is_not_a_sane_number_of_seconds_is_a_usage_error(interval: str) -> None:
    """``nan`` passed click.FloatRange: the reader never slept and the page's config
    carried NaN (no JSON a browser reads); ``inf`` killed the reader thread."""
    result = run("--interval", interval)
    assert result.exit_code == EXIT_USAGE, result.output
    assert "Invalid value for '--interval' / '-i'" in result.output


def test_actions_need_a_long_enough_token_from_a_file_or_the_environment(tmp_path: Path) -> None:
    missing = run("--allow-actions", env={TOKEN_ENV: ""})
    assert missing.exit_code == EXIT_CONFIG
    assert "has 0 characters; use at least 16" in one_line_error(missing)
    unset = CliRunner().invoke(
        celery_main,
        ["-A", "tests.web.webproj:app", "breaker", "web", "--allow-actions"],
        catch_exceptions=False,
        env={TOKEN_ENV: None},
    )
    assert unset.exit_code == EXIT_CONFIG
    assert (
        f"--allow-actions needs a token: put it in a file given with --token-file PATH, or in the environment "
        f"variable {TOKEN_ENV}, never on the command line" in one_line_error(unset)
    )
    path = tmp_path / "token"
    path.write_text("short\n")
    short = run("--allow-actions", "--token-file", str(path))
    assert short.exit_code == EXIT_CONFIG
    assert f"the token in --token-file {path} has 5 characters" in one_line_error(short)
    alone = run("--token-file", str(path))
    assert alone.exit_code == EXIT_USAGE
    assert "--token-file is the token of --allow-actions, which was not given" in alone.output


@pytest.mark.parametrize(
    ("token", "says"),
    [("\u20acuro-token-that-is-long-enough", "'\u20ac' (character 1)"),
     ("first-line-of-it\nsecond-line-too", "'\\n' (character 17)")],
)  # fmt: skip
def test_a_token_no_browser_can_send_is_refused_at_start(tmp_path: Path, token: str, says: str) -> None:
    """The page sends the token in an X-Breaker-Token header: a browser refuses a header
    value outside ISO-8859-1 or with a line break. Such a token started the server, and
    every action then failed in the page with "cannot reach the server (Failed to execute
    'fetch' on 'Window': ... String contains non ISO-8859-1 code point.)"."""
    path = tmp_path / "token"
    path.write_text(token + "\n", encoding="utf-8")
    for result in (run("--allow-actions", "--token-file", str(path)), run("--allow-actions", env={TOKEN_ENV: token})):
        assert result.exit_code == EXIT_CONFIG, result.output
        line = one_line_error(result)
        assert f"holds {says}: the page sends the token in an HTTP header, which a browser fills with printable" in line
        assert token not in line
    accented = "token-with-an-accent-\u00e9-in-it"  # (ISO-8859-1: a browser sends it, and it works)
    assert load_token(None, {TOKEN_ENV: accented}) == accented


def test_https_needs_a_usable_certificate_and_key_named_by_their_options(tmp_path: Path) -> None:
    alone = run("--keyfile", str(tmp_path / "server.key"))
    assert alone.exit_code == EXIT_USAGE
    assert "--keyfile is the key of --certfile, which was not given" in alone.output
    path = tmp_path / "server.pem"
    missing = run("--certfile", str(path))
    assert missing.exit_code == EXIT_CONFIG
    assert one_line_error(missing) == f"Error: cannot read --certfile {path}: No such file or directory"


@pytest.mark.slow
def test_https_serves_with_the_certificate_it_is_given(redis_url: str, tls_certificates: Certificates) -> None:
    certs = tls_certificates
    args = ("--certfile", str(certs.server_cert), "--keyfile", str(certs.server_key))
    with WebProcess(f"{redis_url}/0?key_prefix=web-https", *args) as served:
        assert served.url.startswith("https://127.0.0.1:")
        trusting = ssl.create_default_context(cafile=str(certs.ca))
        with urllib.request.urlopen(served.url + "api/breakers", context=trusting, timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["breakers"] == []
    assert served.stdout.endswith(f"Stopped serving {served.url}\n")


def test_a_busy_port_is_one_line(redis_url: str, use_store: None) -> None:
    store(f"{redis_url}/0?key_prefix=web-busy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("--port", str(taken.getsockname()[1]))
    assert result.exit_code == 1
    assert one_line_error(result).startswith("Error: cannot listen on 127.0.0.1 port ")


def test_help_lists_the_options_and_every_other_celery_call_does_not_load_the_server() -> None:
    result = CliRunner().invoke(celery_main, ["breaker", "web", "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.output.startswith("Usage: celery breaker web [OPTIONS]")
    for option in (
        "--address",
        "--port",
        "--interval",
        "--history",
        "--allow-remote",
        "--allow-host",
        "--allow-actions",
        "--token-file",
        "--certfile",
        "--keyfile",
    ):
        assert option in result.output
    listed = CliRunner().invoke(celery_main, ["breaker", "--help"], catch_exceptions=False)
    assert "web " in listed.output
    heavy = ["celery_breaker.ops.web", "http.server", "celery_breaker.monitoring"]
    check = f"import sys, celery_breaker.ops.cli; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.slow
def test_ctrl_c_as_soon_as_it_serves_and_sigterm_end_it_with_exit_0(redis_url: str) -> None:
    store_url = f"{redis_url}/0?key_prefix=web-stop"
    with WebProcess(store_url) as at_once:
        assert at_once.interrupt() == 0  # right after the URL is printed
    assert at_once.stdout.endswith(f"Stopped serving {at_once.url}\n")
    with WebProcess(store_url) as terminated:
        assert terminated.terminate() == 0  # systemctl stop, docker stop
    assert terminated.stdout.endswith(f"Stopped serving {terminated.url}\n")
    for web in (at_once, terminated):
        assert "Traceback" not in web.stderr()
        assert "Aborted" not in web.stderr()
