"""The HTTP server in-process (no store, no browser): what a request gets, and every refusal of an action."""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib import resources
from types import SimpleNamespace

import pytest

from celery_breaker.errors import ParkedTasksError
from celery_breaker.monitoring.serving import QUIET_FOR, REQUEST_WITHIN
from celery_breaker.ops import web
from celery_breaker.ops.board import Board
from celery_breaker.ops.web import Site, WebServer, loopback_hosts, tls_context
from tests.servers import check_connection_guard
from tests.tls import Certificates

from .conftest import request
from .test_board import status

TOKEN = "t0ken-that-is-long-enough-" + "9" * 8

Serve = Callable[..., str]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """``serve(token=...)``: a server on a free loopback port, in a thread; its base URL."""
    servers: list[tuple[WebServer, threading.Thread]] = []

    def start(*, token: str | None = None, tls: ssl.SSLContext | None = None) -> str:
        board = Board(lambda: [status("crm", key="tenant-3"), status("partner-api")], store="redis://h/0", interval=1.0)
        board.refresh()
        template = resources.files("celery_breaker.ops").joinpath("web_page.html").read_text(encoding="utf-8")
        server = WebServer(("127.0.0.1", 0), tls)
        server.site = Site(board, None, token, loopback_hosts("127.0.0.1", server.server_port), template)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return f"{server.scheme}://127.0.0.1:{server.server_port}/"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_the_page_is_self_contained_and_locked_down(serve: Serve) -> None:
    url = serve()
    with urllib.request.urlopen(url, timeout=5) as response:
        page = response.read().decode()
        headers = response.headers
    nonce = re.search(r"script-src 'nonce-([^']+)'", headers["Content-Security-Policy"])
    assert nonce is not None
    assert f'<script nonce="{nonce.group(1)}">' in page
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY"  # no clickjacking of the action buttons
    assert headers["Cache-Control"] == "no-store"
    # Nothing is fetched from elsewhere: no src/href but the empty data: icon, no URL in the page.
    assert re.findall(r'(?:src|href)="([^"]*)"', page) == ["data:,"]
    assert "http://" not in page
    assert "https://" not in page
    assert '"actions": []' in page  # no buttons without --allow-actions
    assert "{{" not in page


def test_the_json_endpoint_serves_the_boards_view(serve: Serve) -> None:
    status_code, view = request(serve() + "api/breakers")
    assert status_code == 200
    assert [row["label"] for row in view["breakers"]] == ["crm[tenant-3]", "partner-api"]
    assert view["store"] == "redis://h/0"


def test_a_view_the_page_has_already_is_not_sent_again(serve: Serve) -> None:
    # Every open page fetched the whole view every --interval: with 40,000 breakers, 19 MB
    # encoded anew (0.24 s) for each page each second, though it changes once per reading.
    url = serve()
    with urllib.request.urlopen(url + "api/breakers", timeout=5) as response:
        tag, body = response.headers["ETag"], response.read()
    assert tag.startswith('"')
    assert len(body) > 100
    host = url.split("//")[1].rstrip("/")
    connection = http.client.HTTPConnection(host, timeout=5)
    connection.request("GET", "/api/breakers", headers={"If-None-Match": tag})
    again = connection.getresponse()
    assert (again.status, again.read(), again.headers["ETag"]) == (304, b"", tag)
    assert again.headers["Content-Length"] is None
    connection.request("GET", "/api/breakers", headers={"If-None-Match": '"another"'})
    other = connection.getresponse()
    assert (other.status, other.read()) == (200, body)
    connection.close()


def test_without_allow_actions_there_is_no_action_endpoint(serve: Serve) -> None:
    url = serve()
    status_code, _ = request(
        url + "api/actions",
        method="POST",
        body={"action": "open", "name": "crm"},
        headers={"Origin": url.rstrip("/"), "Content-Type": "application/json", "X-Breaker-Token": TOKEN},
    )
    assert status_code == 404


def test_another_host_name_gets_nothing_dns_rebinding(serve: Serve) -> None:
    url = serve()
    port = url.rstrip("/").rsplit(":", 1)[1]
    status_code, body = request(url + "api/breakers", headers={"Host": f"evil.example:{port}"})
    assert status_code == 403
    assert "unexpected Host header" in body["error"]


def test_every_action_request_needs_the_same_origin_the_token_and_a_json_body(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    url = serve(token=TOKEN)
    origin = url.rstrip("/")
    good = {"Origin": origin, "Content-Type": "application/json", "X-Breaker-Token": TOKEN}
    body = {"action": "open", "name": "crm", "key": "tenant-3"}

    def post(headers: dict[str, str], sent: object = body, raw: bytes | None = None) -> tuple[int, str]:
        code, answer = request(url + "api/actions", method="POST", body=sent, headers=headers, raw=raw)
        return code, answer["error"]

    with caplog.at_level(logging.WARNING, logger="celery_breaker"):
        assert post({**good, "Origin": "http://evil.example"})[0] == 403  # another site's page
        assert post({k: v for k, v in good.items() if k != "Origin"})[0] == 403  # no Origin at all
        assert post({**good, "X-Breaker-Token": "wrong" * 8}) == (
            401,
            "wrong or missing token: enter the token in the page's Token field",
        )
        assert post({k: v for k, v in good.items() if k != "X-Breaker-Token"})[0] == 401
        # A plain HTML form can only send text/plain or form bodies, and no token header.
        assert post({**good, "Content-Type": "text/plain"})[0] == 400
        assert post(good, raw=b"{not json")[0] == 400
        code, error = post(good, sent={"action": "explode", "name": "crm"})
        assert code == 400
        assert "one of open, close, reset, disable, delete" in error
        assert post(good, sent={"action": "delete", "name": "crm", "purge": "yes"})[0] == 400  # purge is a boolean
        # A body nested deeper than the JSON parser goes: answered, not a dropped connection and a traceback.
        # (Too deep for the parser up to Python 3.12; 3.13's reads to the end and finds no value.)
        assert post(good, raw=b"[" * 4000) in {
            (400, "an action request is a flat JSON object; this body nests too deep"),
            (400, "Expecting value: line 1 column 4001 (char 4000)"),
        }
        assert post({**good, "Content-Length": "12 bytes"}, raw=b'{"a": "b"}') == (
            400,
            "an action request has a body of 1 to 4096 bytes, its Content-Length",
        )
    assert "refused a cross-origin action request from 127.0.0.1 (Origin 'http://evil.example')" in caplog.text
    assert "wrong or missing token" in caplog.text
    assert TOKEN not in caplog.text
    assert "wrong" * 8 not in caplog.text  # not even a wrong token is logged


@pytest.mark.parametrize("refused", ["too big", "no token", "no actions"])
def test_a_refused_request_with_a_big_body_gets_its_answer_not_a_reset(serve: Serve, refused: str) -> None:
    """A POST refused before its body is read (too big for an action, no token, no action
    endpoint): the answer is sent, then up to ``DRAIN_AT_MOST`` of the body is read and
    dropped. Closed with the body unread, the connection was reset under the client,
    which saw a broken pipe or a reset instead of the 4xx that says what is wrong."""
    url = serve(token=None if refused == "no actions" else TOKEN)
    headers = {"Origin": url.rstrip("/"), "Content-Type": "application/json", "X-Breaker-Token": TOKEN}
    if refused == "no token":
        del headers["X-Breaker-Token"]
    body = b'{"action": "open", "name": "' + b"x" * 3_000_000 + b'"}'
    code, answer = request(url + "api/actions", method="POST", headers=headers, raw=body)
    expected = {"too big": 400, "no token": 401, "no actions": 404}[refused]
    assert code == expected, answer
    if refused == "too big":
        assert answer["error"] == "an action request has a body of 1 to 4096 bytes, its Content-Length"


def test_a_task_parked_between_the_check_and_the_delete_is_a_409_that_asks(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete checks for parked tasks (a dry run), then deletes: a worker can park a
    task in between. The page gets the 409 that asks whether to discard them, as if the
    check had seen it, never a 500."""
    asked: list[bool] = []

    def delete(app: object, name: str, key: str | None, *, purge: bool, dry_run: bool = False) -> object:
        asked.append(dry_run)
        if dry_run:
            return SimpleNamespace(warning=None)  # nothing parked yet
        raise ParkedTasksError(f"1 task is parked behind {name}: deleting it would leave it waiting")

    monkeypatch.setattr(web, "delete", delete)
    url = serve(token=TOKEN)
    headers = {"Origin": url.rstrip("/"), "Content-Type": "application/json", "X-Breaker-Token": TOKEN}
    code, answer = request(url + "api/actions", method="POST", body={"action": "delete", "name": "stray"},
                           headers=headers)  # fmt: skip
    assert asked == [True, False]
    assert code == 409, answer
    assert answer == {"parked": True, "error": "1 task is parked behind stray: deleting it would leave it waiting"}


def test_https_serves_the_page_and_a_client_that_never_completes_a_handshake_holds_up_no_one(
    serve: Serve, tls_certificates: Certificates, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tls_certificates
    url = serve(tls=tls_context(str(certs.server_cert), str(certs.server_key)))
    assert url.startswith("https://127.0.0.1:")
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    trusting = ssl.create_default_context(cafile=str(certs.ca))
    # Connected, silent: its handshake waits in its own thread, not in the accept loop.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        with urllib.request.urlopen(url + "api/breakers", context=trusting, timeout=5) as response:
            assert response.status == 200
            assert b'"crm[tenant-3]"' in response.read()
        # Plain HTTP to the HTTPS port gets no answer, and costs the server nothing.
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            urllib.request.urlopen(url.replace("https://", "http://"), timeout=5)
        with urllib.request.urlopen(url, context=trusting, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    # A client that completes the handshake, then sends bytes that are no TLS record.
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with trusting.wrap_socket(raw, server_hostname="127.0.0.1") as secured:
        os.write(secured.fileno(), b"GARBAGE GARBAGE\r\n\r\n")
        try:
            answered = secured.recv(100)
        except ConnectionResetError:  # (Python 3.13: the close, as a reset)
            answered = b""
        assert answered == b""  # the server closed it
    # A client that does not trust the certificate's CA refuses it.
    doubting = ssl.create_default_context(cafile=str(certs.other_ca))
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(url, context=doubting, timeout=5)
    assert "Traceback" not in capsys.readouterr().err  # failed handshakes are no server errors


def test_the_sites_repr_holds_no_token() -> None:
    """An error reporter that records a frame's locals (``_perform(site, ...)``, which logs
    a failed action with ``logger.exception``) shows them by their repr: the dataclass's
    showed the action token."""
    board = Board(lambda: [status("crm")], store="redis://h/0", interval=1.0)
    site = Site(board, None, TOKEN, loopback_hosts("127.0.0.1", 8787), "<html>")
    assert TOKEN not in repr(site)
    assert "<html>" not in repr(site)  # (nor the whole page)


def test_idle_connections_are_closed_and_never_pile_up(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server started a thread per connection, without limit, and waited for a
    request forever: connections that sent nothing (128 under a 128-descriptor limit)
    took every file descriptor, accept() then failed in a loop at full CPU, and the page
    could not be reached while they stayed open. Now a silent connection is closed after
    the handler's timeout, one that trickles its request after ``REQUEST_WITHIN``, and one
    beyond ``max_connections`` at once."""
    assert (web._Handler.timeout, web._Handler.request_within) == (QUIET_FOR, REQUEST_WITHIN)
    assert WebServer.max_connections == 64
    monkeypatch.setattr(WebServer, "max_connections", 4)  # (fewer to hold: each connection costs the test time)
    url = serve()
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")))
    check_connection_guard(
        address,
        4,
        lambda seconds: monkeypatch.setattr(web._Handler, "timeout", seconds),
        lambda seconds: monkeypatch.setattr(web._Handler, "request_within", seconds),
    )
