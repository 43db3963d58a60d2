"""Throwaway TLS certificates for test servers, made with the ``openssl`` command line tool.

One CA signs a server certificate (for ``127.0.0.1`` and ``localhost``; the servers also
present it when they connect to each other) and a client certificate. A second CA,
which signed nothing here, is the "wrong CA" a client may be given.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["Certificates", "make_certificates"]

_DAYS = "2"
_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")  # fast to make, unlike RSA


@dataclass(frozen=True, slots=True)
class Certificates:
    """The files (PEM) a TLS test server and its clients use."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed neither certificate

    def server_args(self) -> tuple[str, ...]:
        """``redis-server`` options: TLS, and a client certificate required of every client."""
        return (
            "--tls-cert-file", str(self.server_cert), "--tls-key-file", str(self.server_key),
            "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes", "--tls-replication", "yes",
        )  # fmt: skip

    def sentinel_config(self) -> str:
        """The same, as lines of a Sentinel's configuration file."""
        return (
            f"tls-cert-file {self.server_cert}\ntls-key-file {self.server_key}\ntls-ca-cert-file {self.ca}\n"
            "tls-auth-clients yes\ntls-replication yes\n"
        )

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py keyword arguments of a client the servers accept."""
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
        }

    def query(self, *, ca: Path | None = None, client_certificate: bool = True) -> str:
        """A store URL's TLS options: this CA (or ``ca``), and the client certificate unless told not to."""
        options = {"ssl_ca_certs": ca or self.ca}
        if client_certificate:
            options.update(ssl_certfile=self.client_cert, ssl_keyfile=self.client_key)
        return "&".join(f"{name}={quote(str(path), safe='')}" for name, path in options.items())


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server and a client certificate it signed, and another CA, written to ``directory``."""
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("openssl is not installed; run ./scripts/test.sh, which installs it")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([binary, *args], cwd=directory, check=True, capture_output=True)

    # (The extensions Python 3.13's default strict verification (VERIFY_X509_STRICT) wants:
    # a CA's key usage; a certificate's authority key identifier.)
    for ca in ("ca", "other-ca"):
        run("req", "-x509", *_KEY, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", _DAYS,
            "-subj", f"/CN=celery-breaker test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    signed = "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer"
    extensions = {
        "server": f"subjectAltName=IP:127.0.0.1,DNS:localhost\n{signed}",
        "client": signed,
    }
    for name, extension in extensions.items():
        (directory / f"{name}.ext").write_text(extension + "\n")
        run("req", "-new", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=celery-breaker test {name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", _DAYS, "-extfile", f"{name}.ext")  # fmt: skip
    return Certificates(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )
