"""Mutual TLS on every gRPC connection of a deployment (torch-free).

A process has TLS when it is given a folder (`--tls-dir`, or SPLITSERVE_TLS_DIR) holding
`ca.crt` (the deployment's CA), `tls.crt` (this process's certificate, signed by that CA)
and `tls.key` (its private key): the layout of a Kubernetes TLS secret with a CA, as
cert-manager writes it, and as `splitserve certs` writes it. Then:

- every gRPC server (router, workers, the standalone cluster-state server) listens with TLS
  and **requires** a client certificate signed by the CA (`server_credentials`);
- every gRPC channel (router -> workers, workers -> cluster state, the SDK) presents the
  process's certificate and accepts only a server whose certificate is signed by the CA and
  names SERVER_NAME (`secure_channel_args`). Pod and node addresses change, so peers are not
  checked by address: membership is "holds a certificate of the deployment's CA with the
  cluster's name". Certificates of other CAs, and clients with none, cannot connect.

Without a folder everything stays plaintext, as before. The KV data channel (gloo/NCCL) and
its TCPStore rendezvous cannot be wrapped in TLS: they must stay on a private network (the
KV handshake refuses peers without the cluster token, see kvtransfer._rendezvous).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from splitserve.common import envs

CA_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
# The name every member's certificate carries (a DNS SAN) and every channel checks.
SERVER_NAME = "splitserve.cluster"


@dataclass(frozen=True)
class TLSFiles:
    """The PEM bytes of one process's TLS material."""

    folder: str
    ca: bytes
    cert: bytes
    key: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS that requires a client certificate signed by the CA."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS that trusts only the CA and presents this process's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, Any]]:
        """Check the server's certificate for SERVER_NAME, whatever address was dialled."""
        return [("grpc.ssl_target_name_override", SERVER_NAME)]


@functools.lru_cache(maxsize=8)
def load(folder: str) -> TLSFiles:
    """The TLS files in `folder`; a clear error when one is missing or not PEM."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"TLS folder {folder}: not a directory")
    blobs = []
    for name, marker in ((CA_FILE, b"-----BEGIN CERTIFICATE-----"),
                         (CERT_FILE, b"-----BEGIN CERTIFICATE-----"),
                         (KEY_FILE, b"PRIVATE KEY-----")):
        file = path / name
        if not file.is_file():
            raise ValueError(f"TLS folder {folder}: {name} is missing "
                             f"(expected {CA_FILE}, {CERT_FILE}, {KEY_FILE})")
        data = file.read_bytes()
        if marker not in data:
            raise ValueError(f"TLS folder {folder}: {name} is not a PEM file")
        blobs.append(data)
    return TLSFiles(folder, *blobs)


def current(given: str | None = None) -> TLSFiles | None:
    """This process's TLS files (`given` folder, else SPLITSERVE_TLS_DIR), or None."""
    folder = envs.tls_dir(given)
    return load(str(Path(folder).resolve())) if folder else None


def secure_channel_args(tls: TLSFiles | None
                        ) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """(credentials, options) for a channel: (None, []) means plaintext."""
    if tls is None:
        return None, []
    return tls.channel_credentials(), tls.channel_options()


def add_port(server: grpc.Server | grpc.aio.Server, address: str,
             tls: TLSFiles | None) -> int:
    """Bind `address` with TLS when `tls` is given, plaintext otherwise; the bound port
    (0 when grpc could not bind)."""
    if tls is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, tls.server_credentials()))
