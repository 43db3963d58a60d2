"""``celery breaker web``: the breakers of an app's shared store on a live page, served by the standard library.

One self-contained page (``web_page.html``: inline CSS and script, nothing fetched from
elsewhere) polls ``api/breakers``: the view a ``Board`` keeps, the store read every
``--interval`` seconds by one thread and followed across readings by ``watch.Watch``
(rates, time in state, recent changes), plus the parked backlog and how fast it drains,
and on RabbitMQ what waits in its delay queues (counted by a thread of its own over one
kept connection: ``delayed.py``).
With ``--allow-actions`` and a token, ``POST api/actions`` applies ``operator.operate``.

``ops/cli.py`` loads this module only when the command runs (it passes the command the
app as its ``obj``): the store, the monitoring and the server are no cost to other
``celery`` calls. Security: loopback unless ``--allow-remote``, under loopback's host
names and ``--allow-host``'s only (any with ``--allow-remote`` alone); actions need the opt-in,
the token (compared in constant time) and a same-origin request; HTTPS with
``--certfile`` (the handshake made in the request's own thread, so a client that never
finishes one holds up no other); see ``docs/web.md``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, cast

import click

from ..errors import BreakerKeyError, ConfigurationError, ParkedTasksError, StorageError, UnknownBreakerError
from ..labels import breaker_label, shown_label
from ..monitoring.serving import QUIET_FOR, Deadlined, Guarded
from ..monitoring.status import collect_metrics
from ..storage import describe_url
from ..storage.masking import MaskedText
from .actions import ACTIONS, DELETE
from .board import HISTORY, Board
from .console import STATE_STYLES
from .delayed import DelayCounter, elsewhere_view
from .operator import assess, delete, operate, shared_store
from .options import REFRESH_INTERVAL

__all__ = [
    "TOKEN_ENV", "Site", "WebServer", "host_allowed", "host_name", "load_token", "loopback", "same_origin",
    "tls_context", "web",
]  # fmt: skip

logger = logging.getLogger("celery_breaker")

DEFAULT_ADDRESS, DEFAULT_PORT = "127.0.0.1", 8787
#: Where the action token comes from when ``--token-file`` is not given (never the command line).
TOKEN_ENV = "CELERY_BREAKER_WEB_TOKEN"
MIN_TOKEN_LENGTH = 16
#: The largest action request read (a JSON object naming an action and a breaker).
MAX_BODY = 4096
#: A refused request's body, up to this many bytes, is read and dropped after the answer
#: (for at most ``DRAIN_FOR`` seconds): closed with it unread, the connection is reset
#: under a client still sending it, which then sees a broken pipe, not the answer.
DRAIN_AT_MOST = 8 << 20
DRAIN_FOR = 5.0
#: The actions the page offers: every state move, and delete.
NAMES = (*ACTIONS, DELETE.name)
#: click's colour names (``console.STATE_STYLES``) as the page draws them: readable on white.
CSS_COLOURS = {"magenta": "#a21caf", "red": "#cf222e", "yellow": "#9a6700", "green": "#1a7f37", "blue": "#0969da"}

# -- who may ask what ------------------------------------------------------------------


def loopback(address: str) -> bool:
    """Whether ``address`` (an IP address or ``localhost``) is reachable only from this machine."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def loopback_hosts(address: str, port: int) -> frozenset[str]:
    """The ``Host`` headers a loopback server answers: a page served under another name
    (DNS rebinding: an attacker's name resolving to 127.0.0.1) gets nothing."""
    names = {"localhost", "127.0.0.1", "[::1]", f"[{address}]" if ":" in address else address}
    return frozenset({*names, *(f"{name}:{port}" for name in names)})


def host_allowed(host: str | None, allowed: frozenset[str] | None) -> bool:
    """``allowed``: the accepted ``Host`` headers, a name alone accepting it with any port
    (a proxy on another port passes the browser's ``Host`` on); ``None`` accepts any
    (``--allow-remote`` without ``--allow-host``)."""
    if allowed is None:
        return True
    if host is None:
        return False
    host = host.lower()
    name, colon, port = host.rpartition(":")
    return host in allowed or (bool(colon) and port.isdigit() and name in allowed)


def host_name(text: str) -> str:
    """An ``--allow-host`` value as a ``Host`` header names it: lower case, an IPv6
    address in brackets; ``ValueError`` for anything with a scheme, a port or a path."""
    name = text.strip().lower()
    try:
        if ipaddress.ip_address(name.strip("[]")).version == 6:
            return f"[{name.strip('[]')}]"
    except ValueError:
        pass
    if not name or any(char in name for char in ":/@[] \t"):
        raise ValueError(
            f"--allow-host {text!r} is not a host name: give the name the browser shows (breakers.example.com), "
            "without scheme, port or path"
        )
    return name


def same_origin(origin: str | None, host: str | None) -> bool:
    """Whether a request's ``Origin`` is the page's own: a browser sends the true origin,
    so another site's page cannot pass; a request without one is refused too."""
    if origin is None or host is None:
        return False
    return origin.lower() in (f"http://{host}".lower(), f"https://{host}".lower())


def load_token(path: str | None, environ: Mapping[str, str]) -> str:
    """The action token: the file at ``path``, else ``environ[TOKEN_ENV]``, stripped;
    ``ConfigurationError`` when there is none, it is shorter than ``MIN_TOKEN_LENGTH``, or
    it holds anything but printable Latin-1 text (which no browser could send in a header)."""
    make = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if path is not None:
        where = f"--token-file {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise ConfigurationError(f"cannot read the token in {where}: {exc}") from None
    else:
        where, found = TOKEN_ENV, environ.get(TOKEN_ENV)
        if found is None:
            raise ConfigurationError(
                "--allow-actions needs a token: put it in a file given with --token-file PATH, or in the "
                f"environment variable {TOKEN_ENV}, never on the command line; {make}"
            )
        text = found
    token = text.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"the token in {where} has {len(token)} characters; use at least {MIN_TOKEN_LENGTH}: {make}"
        )
    # The page sends it in an HTTP header, which a browser fills with ISO-8859-1 only and
    # no line break: any other token would start a server no action could ever reach.
    bad = next((char for char in token if not (char.isprintable() and ord(char) <= 0xFF)), None)
    if bad is not None:
        raise ConfigurationError(
            f"the token in {where} holds {bad!r} (character {token.index(bad) + 1}): the page sends the token in "
            f"an HTTP header, which a browser fills with printable ISO-8859-1 (Latin-1) text only; {make}"
        )
    return token


# -- the server ------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """What every request handler needs."""

    board: Board
    app: Any
    token: str | None = field(repr=False)
    """``None``: actions are off, and their endpoint does not exist. A secret: not in the
    repr (an error reporter that records a frame's locals shows them by their repr)."""
    hosts: frozenset[str] | None
    """The ``Host`` headers answered; ``None``: any (``--allow-remote`` without ``--allow-host``)."""
    template: str = field(repr=False)


#: Seconds a client has to complete the TLS handshake.
HANDSHAKE_TIMEOUT = 10.0


def tls_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    """The server side of HTTPS: the certificate (chain) in ``certfile`` and its private key
    (in ``keyfile``, else in ``certfile`` too), TLS 1.2 at least; ``ConfigurationError``
    naming the option and the fix when they cannot be used (never asks for a passphrase)."""
    where = f"--certfile {certfile}" + (f" / --keyfile {keyfile}" if keyfile is not None else "")

    def no_passphrase() -> str:
        raise ConfigurationError(
            f"{where}: the private key is encrypted; give an unencrypted key file (openssl pkey -in KEY -out "
            "PLAIN.key), readable by this user only"
        )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile, password=no_passphrase)
    except ssl.SSLError as exc:
        raise ConfigurationError(
            f"{where}: not a PEM certificate and its matching private key ({exc.reason or exc}); give the "
            "certificate in --certfile and its key in --keyfile (or both in --certfile)"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {where}: {exc.strerror or exc}") from None
    return context


class WebServer(Guarded, ThreadingHTTPServer):
    """The HTTP server of one ``Site`` (set once bound: the allowed hosts name its port), on
    IPv4 or IPv6; HTTPS with a ``tls`` context. At most ``max_connections`` at once, and a
    connection silent for ``QUIET_FOR`` seconds is closed (``monitoring.serving``): clients
    that connect and send nothing cannot take every file descriptor."""

    daemon_threads = True
    #: A few open pages (a browser opens up to six connections to a host) and actions.
    max_connections = 64
    site: Site

    def __init__(self, address: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.tls = tls
        super().__init__(address, _Handler)

    @property
    def scheme(self) -> str:
        """``https`` with a TLS context, else ``http``: what the server's URLs start with."""
        return "http" if self.tls is None else "https"

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        # Here, in the request's own thread (not in accept()): a client that connects and
        # never completes the handshake waits alone, for HANDSHAKE_TIMEOUT at most.
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            secured = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # plain HTTP to this port, a scanner, a timeout
            logger.debug("celery-breaker web: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            secured.settimeout(None)
            super().finish_request(secured, client_address)
        except (ssl.SSLError, ConnectionError) as exc:  # bytes that are no TLS record, a reset
            logger.debug("celery-breaker web: TLS connection from %s failed: %s", client_address[0], exc)
        finally:
            secured.close()


def _page(site: Site, nonce: str) -> bytes:
    actions = [{"name": action.name, "summary": action.summary} for action in (*ACTIONS.values(), DELETE)]
    config = {"interval": site.board.interval, "actions": actions if site.token else []}
    states = "".join(
        f".state-{state.value}{{color:{CSS_COLOURS[style['fg']]};font-weight:{700 if style.get('bold') else 400}}}"
        for state, style in STATE_STYLES.items()
    )
    # "<" escaped: nothing in the data block can close it.
    text = site.template.replace("{{config}}", json.dumps(config).replace("<", "\\u003c"))
    return text.replace("{{state_css}}", states).replace("{{nonce}}", nonce).encode()


class _Handler(Deadlined, BaseHTTPRequestHandler):
    server_version = "celery-breaker-web"
    timeout = QUIET_FOR  # (each read or write: a client that sends nothing is let go)
    _unread = 0  # (bytes of this request's body not read yet, -1 when its length is unknown)

    def version_string(self) -> str:
        return self.server_version  # (not the Python version)

    @property
    def site(self) -> Site:
        return cast("WebServer", self.server).site

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = self.path.partition("?")[0]
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
                   "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
            self._send(200, _page(self.site, nonce), "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        elif path == "/api/breakers":
            tag, body = self.site.board.encoded()
            if self.headers.get("If-None-Match") == tag:  # (the page has this view: nothing to send)
                self._not_modified(tag)
            else:
                self._send(200, body, "application/json", {"ETag": tag})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        self._unread = _content_length(self.headers.get("Content-Length"))
        try:
            self._post()
        finally:
            self._drop_unread()

    def _drop_unread(self) -> None:
        """Read and drop the body of a request answered without reading it (refused), so
        the client that sends it reads the answer instead of a reset; a body bigger than
        ``DRAIN_AT_MOST`` is not waited for."""
        left = self._unread
        if not 0 < left <= DRAIN_AT_MOST:
            return
        deadline = time.monotonic() + DRAIN_FOR
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass  # (gone, or quiet for the handler's timeout: closed either way)
        self._unread = 0

    def _post(self) -> None:
        if not self._host_ok():
            return
        site, client = self.site, self.client_address[0]
        if self.path.partition("?")[0] != "/api/actions" or site.token is None:
            self._json(404, {"error": "not found"})  # without --allow-actions there is no action endpoint
            return
        if not same_origin(self.headers.get("Origin"), self.headers.get("Host")):
            logger.warning("celery-breaker web: refused a cross-origin action request from %s (Origin %r)",
                           client, self.headers.get("Origin"))  # fmt: skip
            self._json(403, {"error": "cross-origin request refused: actions are taken from this page only"})
            return
        if not hmac.compare_digest(self.headers.get("X-Breaker-Token", "").encode(), site.token.encode()):
            logger.warning("celery-breaker web: refused an action request from %s: wrong or missing token", client)
            self._json(401, {"error": "wrong or missing token: enter the token in the page's Token field"})
            return
        try:
            asked = self._asked()
        except ValueError as exc:
            self._json(400, {"error": str(exc)})
            return
        self._json(*_perform(site, asked, client=client))

    def _asked(self) -> Asked:
        if self.headers.get_content_type() != "application/json":
            raise ValueError("an action request is a JSON object (Content-Type: application/json)")
        length = self._unread
        if not 0 < length <= MAX_BODY:
            raise ValueError(f"an action request has a body of 1 to {MAX_BODY} bytes, its Content-Length")
        self._unread = 0
        try:
            body = json.loads(self.rfile.read(length))  # (a JSONDecodeError is a ValueError)
        except RecursionError:  # ("[[[[..." : deeper than the parser goes; no action nests at all)
            raise ValueError("an action request is a flat JSON object; this body nests too deep") from None
        fields = ("action", "name", "key", "confirmed", "purge")
        action, name, key, confirmed, purge = (body.get(field) if isinstance(body, dict) else None for field in fields)
        if (action not in NAMES or not isinstance(name, str) or not (key is None or isinstance(key, str))
                or not isinstance(confirmed, bool | None) or not isinstance(purge, bool | None)):  # fmt: skip
            raise ValueError(f'expected {{"action": one of {", ".join(NAMES)}, "name": "...", "key": "..." or null, '
                             '"confirmed": true once asked, "purge": true to delete its parked tasks too}')  # fmt: skip
        return Asked(action, name, key, bool(confirmed), bool(purge))

    def _host_ok(self) -> bool:
        if host_allowed(self.headers.get("Host"), self.site.hosts):
            return True
        self._json(403, {"error": "unexpected Host header: open the page by the address the command printed"})
        return False

    def _json(self, status: int, body: Any) -> None:
        self._send(status, json.dumps(body).encode(), "application/json", {})

    def _not_modified(self, tag: str) -> None:
        """304: no body, so no Content-Length (it would have to be the view's)."""
        self.send_response(304)
        for name, value in {"ETag": tag, "Cache-Control": "no-store"}.items():
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                            "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                            "Referrer-Policy": "no-referrer", **headers}.items():  # fmt: skip
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: the page polls every interval. Actions are, by name."""


def _content_length(header: str | None) -> int:
    """A request's ``Content-Length``: 0 without one, -1 when it is no whole number."""
    try:
        return int(header or 0)
    except ValueError:
        return -1


@dataclass(frozen=True, slots=True)
class Asked:
    """One action request, as the page sends it."""

    action: str
    name: str
    key: str | None
    confirmed: bool
    """The page asked the user about the ``warning`` a 409 carried."""
    purge: bool
    """``delete`` only: discard the breaker's parked tasks with it (the user was asked)."""


def _perform(site: Site, asked: Asked, *, client: str) -> tuple[int, dict[str, Any]]:
    """Apply one action; log it with the client's address (who asked cannot be known).

    An action that would let calls through to a failing downstream (``operator.assess``)
    is not taken unless ``confirmed``, and a breaker with parked tasks is not deleted
    unless ``purge``: the answer is then 409, with the ``warning`` or ``parked`` the page
    asks the user about before it sends the request again, as the CLI asks.
    """
    label = shown_label(breaker_label(asked.name, asked.key))  # (as asked: logged, so made printable)
    try:
        if asked.action == DELETE.name:
            return _delete(site, asked, label, client)
        if ACTIONS[asked.action].cautious and not asked.confirmed:
            warning = assess(site.app, asked.action, asked.name, asked.key, create_hint=_GONE)
            if warning is not None:
                return 409, {"warning": warning, "error": f"{warning}: confirm to {asked.action} it anyway"}
        move = operate(site.app, asked.action, asked.name, asked.key, create_hint=_GONE)
    except (UnknownBreakerError, BreakerKeyError, StorageError, ConfigurationError) as exc:
        logger.warning(
            "celery-breaker web: %s %s, asked from %s, failed: %s", asked.action, label, client, MaskedText(exc)
        )
        return (503 if isinstance(exc, StorageError) else 400), {"error": str(MaskedText(exc))}
    except Exception as exc:
        logger.exception("celery-breaker web: %s %s, asked from %s, failed", asked.action, label, client)
        return 500, {"error": f"unexpected {type(exc).__name__}: {MaskedText(exc)}"}
    done = ACTIONS[asked.action].done
    _log_done(move.label, done, client, move.warning)
    site.board.wake()
    was = "created" if move.before is None else f"was {move.before.value}"
    message = f"{shown_label(move.label)}: {move.after.state.value} ({was}): {ACTIONS[asked.action].after}."
    if not move.changed:
        message = f"{shown_label(move.label)}: already {move.after.state.value}, nothing changed."
    return 200, {"ok": True, "label": move.label, "state": move.after.state.value, "message": message,
                 "warning": move.warning}  # fmt: skip


_GONE = "reload the page: it may have left the store"


def _delete(site: Site, asked: Asked, label: str, client: str) -> tuple[int, dict[str, Any]]:
    try:
        plan = delete(site.app, asked.name, asked.key, purge=asked.purge, dry_run=True)
    except ParkedTasksError as exc:
        return 409, {"parked": True, "error": str(exc)}
    except UnknownBreakerError as exc:
        raise UnknownBreakerError(f"{exc}; {_GONE}") from None
    if plan.warning is not None and not asked.confirmed:
        return 409, {"warning": plan.warning, "error": f"{plan.warning}: confirm to delete it anyway"}
    try:
        gone = delete(site.app, asked.name, asked.key, purge=asked.purge)
    except ParkedTasksError as exc:  # a worker parked a task since the dry run: ask, as if it had seen it
        return 409, {"parked": True, "error": str(exc)}
    _log_done(gone.label, "deleted" + (f" with {gone.discarded} parked task(s)" if gone.discarded else ""), client,
              gone.warning)  # fmt: skip
    site.board.wake()
    was = f"was {gone.before.state.value}" if gone.before is not None else "only parked tasks were left of it"
    shown = shown_label(gone.label)
    message = f"{shown}: deleted ({was})" + (f"; discarded {gone.discarded} parked task(s)" * bool(gone.discarded))
    if not gone.existed:
        message = f"{shown}: nothing to delete (the store holds nothing of it)"
    return 200, {"ok": True, "label": label, "state": None, "message": message + ".", "warning": gone.warning}


def _log_done(label: str, done: str, client: str, warning: str | None) -> None:
    beware = f"; beware: {warning}" if warning is not None else ""
    logger.warning("celery-breaker web: breaker %s %s, asked from %s%s", shown_label(label), done, client, beware)


# -- the command -------------------------------------------------------------------------


@click.command(name="web")
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True,
              help="The address to listen on. Anything but loopback needs --allow-remote.")  # fmt: skip
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="The port to listen on (0: any free port; the URL printed says which).")  # fmt: skip
@click.option("--interval", "-i", type=REFRESH_INTERVAL, default=1.0, show_default=True,
              help="Seconds between readings of the store, and between the page's updates.")  # fmt: skip
@click.option("--history", "-n", type=click.IntRange(min=1), default=HISTORY, show_default=True,
              help="How many recent changes the page lists.")  # fmt: skip
@click.option(
    "--allow-remote", is_flag=True, help="Allow an --address other machines reach: they all see every breaker."
)
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME", callback=lambda _c, _p, v: _host_names(v),
              help="Answer under this host name too (a proxy's), and, with --allow-remote, only under these "
                   "and loopback's (repeatable).")  # fmt: skip
@click.option("--allow-actions", is_flag=True,
              help=f"Show buttons for the actions; each needs the token (--token-file or {TOKEN_ENV}).")  # fmt: skip
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help=f"A file holding the action token (default: the environment variable {TOKEN_ENV}).")  # fmt: skip
@click.option("--certfile", default=None,
              help="Serve HTTPS with this PEM certificate (chain); its key in --keyfile, or here too.")  # fmt: skip
@click.option("--keyfile", default=None, help="The private key (PEM, unencrypted) of --certfile.")
@click.pass_obj
def web(app: Any, address: str, port: int, interval: float, history: int, allow_remote: bool,
        allow_hosts: tuple[str, ...], allow_actions: bool, token_file: str | None, certfile: str | None,
        keyfile: str | None) -> None:  # fmt: skip
    """Serve a live page of the breakers: states, time to half-open, failure rates,
    rejections and deferrals per second, parked tasks and their release, trips and the
    recent changes. Ctrl-C quits.

    Loopback only unless --allow-remote; under loopback's names only, and those of
    --allow-host. With --allow-actions, the page has buttons for open, close, reset and
    disable; each needs the token.
    """
    if not allow_remote and not loopback(address):
        raise click.UsageError(f"--address {address} is reachable from other machines, which would all see every "
                               "breaker: pass --allow-remote to listen there anyway")  # fmt: skip
    if token_file is not None and not allow_actions:
        raise click.UsageError("--token-file is the token of --allow-actions, which was not given")
    if keyfile is not None and certfile is None:
        raise click.UsageError("--keyfile is the key of --certfile, which was not given")
    token = load_token(token_file, os.environ) if allow_actions else None
    tls = None if certfile is None else tls_context(certfile, keyfile)
    app.loader.import_default_modules()  # the app's tasks name its breakers (for the actions)
    store = shared_store(app)
    where = describe_url(store.url)
    # RabbitMQ's delay queues, counted by a thread of the board's over one kept connection
    # (opened at the first count); a failure is on the page, and logged once a minute (not
    # for an app that parks in its store: its views say nothing of it).
    counter = DelayCounter.of(app, kept=True, logged_as="web", meanwhile="the page says it is not counted")
    # (An app deferring by countdown: where they wait, as `status` says, never how many.)
    board = Board(lambda: collect_metrics(store), store=where, interval=interval, history=history,
                  delays=None if counter is None else counter.count,
                  elsewhere=elsewhere_view(app) if counter is None else None)  # fmt: skip
    board.refresh(raising=True)  # a store that cannot be reached now: exit 69, as `watch`
    try:
        server = WebServer((address, port), tls)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {address} port {port}: {exc.strerror or exc}") from None
    bound = server.server_port  # (--port 0: the one the system chose)
    template = resources.files(__package__).joinpath("web_page.html").read_text(encoding="utf-8")
    # (Any name only with --allow-remote and no --allow-host: a name rebound to this address reads the page.)
    hosts = None if allow_remote and not allow_hosts else loopback_hosts(address, bound) | frozenset(allow_hosts)
    server.site = Site(board, app, token, hosts, template)
    shown = socket.getfqdn() if address in ("0.0.0.0", "::") else (f"[{address}]" if ":" in address else address)
    url = f"{server.scheme}://{shown}:{bound}/"
    if not loopback(address):
        click.echo(f"Warning: listening on {address} port {bound}: anyone who reaches it sees every breaker"
                   + (" (actions need the token)." if token else "."), err=True)  # fmt: skip
        if token and tls is None:
            click.echo("Warning: without --certfile the token crosses the network in the clear: serve HTTPS "
                       "(--certfile), or keep the default address behind a TLS proxy.", err=True)  # fmt: skip
    if hosts is None:
        click.echo("Warning: the page answers under any host name: a site whose name resolves to this address "
                   "(DNS rebinding) can read it in its visitors' browsers; name the page's host names with "
                   "--allow-host NAME.", err=True)  # fmt: skip
    if token:
        click.echo(f"Actions are on ({', '.join(NAMES)}): each needs the token, and is logged.")
    try:
        _serve(server, url, f"Serving the breakers of {where} at {url} (Ctrl-C to quit)")
    finally:
        if counter is not None:
            counter.close()


def _host_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """``--allow-host``'s values as ``Host`` headers name them; a usage error (exit 2) for one that is no name."""
    try:
        return tuple(host_name(value) for value in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


#: The signals that stop the server: Ctrl-C, and SIGTERM (systemd, docker stop).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _serve(server: WebServer, url: str, ready: str) -> None:
    """Print ``ready``, then read the store and answer requests until Ctrl-C (or SIGTERM);
    then stop both. From the moment ``ready`` is printed, Ctrl-C is a clean exit 0.

    A stop signal asks the server to shut down (from a thread of its own: ``shutdown``
    waits for ``serve_forever``, which runs in this thread). It raised
    ``KeyboardInterrupt`` here instead, and a signal that came while a finalizer ran (a
    connection pool collected) was swallowed with it ("Exception ignored in ... __del__"):
    the server went on serving after SIGTERM (three runs of the test suite in a row)."""
    handler = None
    if not logger.hasHandlers():  # a CLI process has no logging set up: the actions' log goes to stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    board = server.site.board
    reader = threading.Thread(target=board.run, name="celery-breaker-web", daemon=True)
    counting = threading.Thread(target=board.run_delay_counts, name="celery-breaker-web-delays", daemon=True)
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, name="celery-breaker-web-stop", daemon=True).start()

    previous = {signum: signal.signal(signum, stop) for signum in _STOP_SIGNALS}
    try:
        reader.start()
        if board.counts_delays:
            counting.start()
        click.echo(ready)  # the last line before serving: scripts and tests wait for it
        server.serve_forever(poll_interval=0.2)
        click.echo(f"Stopped serving {url}")  # (no traceback, exit 0)
    except KeyboardInterrupt:  # (a Ctrl-C before the handler was set, or from Python itself)
        click.echo(f"Stopped serving {url}")
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
        board.stop()
        server.server_close()
        for thread in (reader, counting):
            if thread.is_alive():
                thread.join(timeout=5)
        if handler is not None:
            logger.removeHandler(handler)
