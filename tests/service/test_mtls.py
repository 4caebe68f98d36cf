"""Mutual TLS on every gRPC connection (issue 13): a deployment whose router, workers and
cluster-state service hold certificates of one CA (`splitserve certs`) serves requests end
to end over TLS, and nothing without a certificate of that CA connects to any of its ports:
not a plaintext client, not a TLS client without a certificate, not one with another CA's
certificate. A client-only certificate cannot pose as a member server. Real gRPC, a real
router, prefill and decode worker (in this process, then as plain processes)."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.bench.procs import free_port, spawn, wait_for_workers
from splitserve.client import Client, Unavailable
from splitserve.common import certs, tls
from splitserve.common.grpc_guard import sync_channel
from tests.deploy.test_image import load_healthcheck
from tests.service.deployment import Deployment, start_deployment

ENGINE = {"num_kv_blocks": 64, "block_size": 8, "max_num_batched_tokens": 128}
TOKEN = "cluster-token-0123456789abcdef"


def make_certs(out: Path) -> Path:
    ca = certs.load_or_create_ca(out)
    for name in certs.DEFAULT_MEMBERS:
        certs.issue(ca, out, name)
    certs.issue(ca, out, "alice", client_only=True)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture(scope="module")
def deployment(tiny_llama: Path, pki: Path) -> Iterator[Deployment]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITSERVE_TLS_DIR", str(pki / "router"))
        d = start_deployment(str(tiny_llama), 1, 1, engine=ENGINE, cluster_token=TOKEN,
                             router={"local_prefill_threshold": 4})
        try:
            yield d
        finally:
            d.stop()


def ports(d: Deployment) -> dict[str, str]:
    """Every gRPC listener of the deployment: router (with cluster state), workers."""
    return {"router": d.address, **{w.worker_id: w.address for w in [*d.prefill, *d.decode]}}


def health_check(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    channel = (grpc.secure_channel(address, credentials, options=[
        ("grpc.ssl_target_name_override", tls.SERVER_NAME)])
        if credentials is not None else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_requests_are_served_end_to_end_over_mutual_tls(deployment: Deployment,
                                                        pki: Path) -> None:
    # A remote prefill: router -> decode (Admit) and -> prefill, worker -> cluster state:
    # every hop is a TLS connection of this process's member certificate.
    with Client(deployment.address, tls_dir=str(pki / "alice"), timeout=60) as client:
        completion = client.generate(list(range(100, 140)), max_tokens=4, temperature=0.0,
                                     ignore_eos=True)
    assert len(completion.token_ids) == 4 and not completion.timings.prefill_local


def test_no_port_admits_a_caller_without_a_certificate_of_the_ca(
        deployment: Deployment, pki: Path, other_pki: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    member = tls.load(str(pki / "decode"))
    stranger = tls.load(str(other_pki / "decode"))
    ca_only = grpc.ssl_channel_credentials(root_certificates=member.ca)
    foreign = grpc.ssl_channel_credentials(root_certificates=member.ca,
                                           private_key=stranger.key,
                                           certificate_chain=stranger.cert)
    for name, address in ports(deployment).items():
        assert health_check(address, member.channel_credentials()) == "SERVING", name
        assert health_check(address, None) == "UNAVAILABLE", name  # plaintext
        assert health_check(address, ca_only) == "UNAVAILABLE", name  # no client certificate
        assert health_check(address, foreign) == "UNAVAILABLE", name  # another CA's
    monkeypatch.delenv("SPLITSERVE_TLS_DIR")  # the SDK without a certificate
    with Client(deployment.address, timeout=5, max_retries=0) as plain:
        with pytest.raises(Unavailable):
            plain.generate([1, 2, 3], max_tokens=1)


def test_a_client_certificate_cannot_pose_as_a_member_server(pki: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    alice = tls.load(str(pki / "alice"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = tls.add_port(server, "127.0.0.1:0", alice)  # a rogue "worker" with alice's cert
    server.start()
    try:
        monkeypatch.setenv("SPLITSERVE_TLS_DIR", str(pki / "router"))
        with sync_channel(f"127.0.0.1:{port}", None) as channel:
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no splitserve.cluster name
    finally:
        server.stop(0)


def test_the_container_health_check_speaks_mutual_tls(deployment: Deployment, pki: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    check = load_healthcheck()
    address = deployment.decode[0].address
    monkeypatch.setenv("SPLITSERVE_TLS_DIR", str(pki / "decode"))
    assert check.main([address]) == 0
    monkeypatch.delenv("SPLITSERVE_TLS_DIR")
    assert check.main([address]) == 1


def test_certs_command_writes_usable_folders_and_keeps_its_ca(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "splitserve.cli", "certs", "--out", str(tmp_path)]
    subprocess.run([*run, "--host", "10.1.2.3", "--client", "bob"], check=True,
                   capture_output=True)
    ca = (tmp_path / "ca.crt").read_bytes()
    for name in (*certs.DEFAULT_MEMBERS, "bob"):
        files = tls.load(str(tmp_path / name))
        assert files.ca == ca
        assert stat.S_IMODE((tmp_path / name / tls.KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    subprocess.run([*run, "--name", "extra"], check=True, capture_output=True)
    assert (tmp_path / "ca.crt").read_bytes() == ca  # issued from the same CA
    assert tls.load(str(tmp_path / "extra")).ca == ca


def test_a_bad_tls_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="tls.crt is missing"):
        tls.load(str(tmp_path))
    (tmp_path / "tls.crt").write_text("not a certificate")
    with pytest.raises(ValueError, match="tls.crt is not a PEM file"):
        tls.load(str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "splitserve.cli", "router", "--tls-dir",
                             str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode == 2 and "not a directory" in result.stderr


def test_plain_processes_with_their_own_certificates(tiny_llama: Path, pki: Path) -> None:
    """The CLI's --tls-dir: a router and a decode worker, each with its own certificate."""
    port = free_port()
    common = ["--model", str(tiny_llama), "--block-size", "8"]
    router, _ = spawn(["router", *common, "--port", str(port), "--http-port", "0",
                       "--tls-dir", str(pki / "router")])
    decode, _ = spawn(["decode", *common, "--num-kv-blocks", "64", "--cluster",
                       f"grpc://127.0.0.1:{port}", "--tls-dir", str(pki / "decode")])
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SPLITSERVE_TLS_DIR", str(pki / "alice"))
            wait_for_workers(f"127.0.0.1:{port}", 1)
            with Client(f"127.0.0.1:{port}", timeout=60) as client:
                out = client.generate([5, 6, 7, 8], max_tokens=3, temperature=0.0,
                                      ignore_eos=True)
        assert len(out.token_ids) == 3
        assert health_check(f"127.0.0.1:{port}", None) == "UNAVAILABLE"
    finally:
        for proc in (decode, router):
            proc.terminate()
            proc.wait(timeout=30)
