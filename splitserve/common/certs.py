"""`splitserve certs`: a local CA and certificates for a deployment's mutual TLS.

    splitserve certs --out certs/ [--name router --name prefill ...] [--host 10.0.0.5 ...]
                     [--client alice ...]

writes `certs/ca.crt` and `certs/ca.key` (kept if they exist, so more certificates can be
issued later from the same CA) and, per name, a folder `certs/<name>/` with `ca.crt`,
`tls.crt` and `tls.key`: exactly what `--tls-dir` / SPLITSERVE_TLS_DIR expect, and the
layout of a Kubernetes TLS secret (`kubectl create secret generic NAME --from-file=certs/router/`).

Member certificates (router, workers, cluster-state server) serve and call: they carry the
cluster name common.tls.SERVER_NAME, localhost, 127.0.0.1 and every `--host`. Client
certificates (`--client`, for SDK users when the router requires them) can only call: they
do not carry the cluster name, so no client can pose as a member server. Keys are ECDSA
P-256; private keys are written with mode 0600.

For tests and small deployments. A production cluster may use its own PKI (cert-manager,
Vault): any CA works if member certificates carry SERVER_NAME as a DNS name.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.common.tls import CA_FILE, CERT_FILE, KEY_FILE, SERVER_NAME

DEFAULT_MEMBERS = ("router", "prefill", "decode")
CA_KEY_FILE = "ca.key"


@dataclass(frozen=True)
class Authority:
    cert: Any  # cryptography.x509.Certificate
    key: Any  # cryptography's EllipticCurvePrivateKey


def _x509() -> Any:
    try:
        from cryptography import x509
    except ImportError as exc:  # pragma: no cover - cryptography is a dependency
        raise SystemExit("splitserve certs needs the `cryptography` package") from exc
    return x509


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _builder(subject: str, issuer: Any, public_key: Any, days: int) -> Any:
    x509 = _x509()
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer if issuer is not None else name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def load_or_create_ca(out: Path, days: int = 3650) -> Authority:
    """The CA in `out` (ca.crt + ca.key), created when absent."""
    x509 = _x509()
    from cryptography.hazmat.primitives import hashes, serialization

    cert_path, key_path = out / CA_FILE, out / CA_KEY_FILE
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return Authority(cert, key)
    key = _new_key()
    cert = (_builder("splitserve deployment CA", None, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(key_path, _pem_key(key), secret=True)
    _write(cert_path, _pem_cert(cert))
    return Authority(cert, key)


def _san(host: str) -> Any:
    x509 = _x509()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(ca: Authority, out: Path, name: str, hosts: tuple[str, ...] = (),
          client_only: bool = False, days: int = 825) -> Path:
    """Write `out/<name>/{ca.crt,tls.crt,tls.key}`; returns that folder."""
    x509 = _x509()
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = _builder(name, ca.cert.subject, key.public_key(), days)
    if not client_only:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        names = [SERVER_NAME, "localhost", "127.0.0.1", "::1", *hosts]
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(names)]), critical=False)
    cert = (builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(ca.key, hashes.SHA256()))
    folder = out / name
    _write(folder / KEY_FILE, _pem_key(key), secret=True)
    _write(folder / CERT_FILE, _pem_cert(cert))
    _write(folder / CA_FILE, _pem_cert(ca.cert))
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for ca.crt/ca.key and <name>/")
    parser.add_argument("--name", action="append", default=None,
                        help="a member certificate to issue (repeatable; default: "
                             + ", ".join(DEFAULT_MEMBERS) + ")")
    parser.add_argument("--client", action="append", default=[],
                        help="a client-only certificate to issue (repeatable)")
    parser.add_argument("--host", action="append", default=[],
                        help="an extra DNS name or IP address for member certificates")
    parser.add_argument("--days", type=int, default=825, help="validity of issued certificates")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    ca = load_or_create_ca(out)
    members = args.name if args.name is not None else list(DEFAULT_MEMBERS)
    for name in members:
        print(f"member {name}: {issue(ca, out, name, tuple(args.host), days=args.days)}")
    for name in args.client:
        print(f"client {name}: {issue(ca, out, name, client_only=True, days=args.days)}")
    return 0
