"""Who may call what. The public API takes an API key as a bearer token (HTTP Authorization, gRPC authorization
metadata; health and metrics stay open). Between services, mutual TLS with certificates this test makes (a CA
and leaf certificates for 127.0.0.1/localhost, with `cryptography`): a TLS stack serves requests, and a worker
refuses a client without a certificate, with one from another CA, or in plaintext."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import PreTrainedTokenizerBase

from baton.client import BatonClient, BatonError
from baton.health import is_serving
from baton.rpc.load import Role
from baton.rpc.server import TlsConfig
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.decode import main as decode_main
from services.prefill import main as prefill_main
from services.router import main as router_main
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler
from tests.support.inproc import Options, running_stack
from tests.support.processes import ROOT, free_port, processes, wait_serving


# ---- certificates --------------------------------------------------------------------------------------------
def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1)))
    if issuer is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:  # a service: serves and calls, on this machine
        builder = (builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(name: str) -> TlsConfig:
    """A fresh CA and one service certificate it signed."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name} CA", ca_key, None, ca_key)
    cert = _cert(f"{name} service", key, ca, ca_key)
    pem = serialization.Encoding.PEM
    return TlsConfig(cert.public_bytes(pem), _pem(key), ca.public_bytes(pem))


@dataclass
class Pki:
    good: TlsConfig  # the cluster's CA and a certificate it signed
    rogue: TlsConfig  # another CA and its certificate
    files: dict[str, Path]  # the good one's cert, key and ca, as files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    good, rogue = make_pki("baton"), make_pki("rogue")
    folder = tmp_path_factory.mktemp("pki")
    files = {"cert": folder / "service.pem", "key": folder / "service.key", "ca": folder / "ca.pem"}
    files["cert"].write_bytes(good.cert)
    files["key"].write_bytes(good.key)
    files["ca"].write_bytes(good.ca)
    return Pki(good, rogue, files)


@pytest.mark.parametrize("service", [decode_main, prefill_main, router_main])
def test_services_refuse_half_a_tls_configuration(service: Any, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    service.add_arguments(parser)
    argv = {router_main: ["--decode", "d:1", "--prefill", "p:1"], prefill_main: ["--decode", "d:1"]}.get(service, [])
    assert service.main(parser.parse_args([*argv, "--tls-cert", str(pki.files["cert"])])) == 2  # before any loading
    assert "--tls-key, --tls-ca missing" in caplog.text


def test_tls_config_from_files(pki: Pki, tmp_path: Path) -> None:
    assert TlsConfig.from_files(None, None, None) is None
    assert TlsConfig.from_files(*(str(pki.files[k]) for k in ("cert", "key", "ca"))) == pki.good
    with pytest.raises(ValueError, match="--tls-key, --tls-ca missing"):
        TlsConfig.from_files(str(pki.files["cert"]), None, "")
    with pytest.raises(ValueError, match="--tls-ca: cannot read"):
        TlsConfig.from_files(str(pki.files["cert"]), str(pki.files["key"]), str(tmp_path / "nope.pem"))


# ---- mutual TLS between services, in this process ------------------------------------------------------------
def health(address: str, credentials: grpc.ChannelCredentials | None) -> int:
    """A service's health status over a channel with these credentials (None: plaintext)."""
    ch = grpc.secure_channel(address, credentials) if credentials is not None else grpc.insecure_channel(address)
    with ch:
        return int(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status)


def test_mutual_tls_stack(pki: Pki, tokenizer: PreTrainedTokenizerBase) -> None:
    good, rogue = pki.good, pki.rogue
    with running_stack(tokenizer, Options(tls=good)) as stack:
        # router -> decode and prefill, prefill -> decode: all over mutual TLS
        with BatonClient(stack.grpc, timeout=60) as client:
            done = client.generate([5, 6, 7], max_new_tokens=5, ignore_eos=True)
        assert done.finish_reason == "length" and len(done.token_ids) == 5

        for address in (stack.decode_address, stack.prefill_address):
            assert health(address, good.channel_credentials()) == health_pb2.HealthCheckResponse.SERVING
            refused = {
                "plaintext": None,
                "no client certificate": grpc.ssl_channel_credentials(root_certificates=good.ca),
                "a certificate from another CA": grpc.ssl_channel_credentials(
                    root_certificates=good.ca, private_key=rogue.key, certificate_chain=rogue.cert),
                "a server it does not trust": grpc.ssl_channel_credentials(
                    root_certificates=rogue.ca, private_key=good.key, certificate_chain=good.cert),
            }
            for what, credentials in refused.items():
                with pytest.raises(grpc.RpcError) as e:
                    health(address, credentials)
                assert e.value.code() is grpc.StatusCode.UNAVAILABLE, what

        async def rogue_router_sees() -> list[bool]:
            pool = WorkerPool(Scheduler(), [stack.decode_address], [stack.prefill_address], tls=rogue)
            try:
                await pool.poll()
                return [w.healthy for role in Role for w in pool.scheduler.reports(role)]
            finally:
                await pool.close()

        assert asyncio.run(rogue_router_sees()) == [False, False]
        assert is_serving(stack.decode_address, 5, good) and not is_serving(stack.decode_address, 5, None)


# ---- the API key ---------------------------------------------------------------------------------------------
KEY = "s3cret-key"


def test_api_key(tokenizer: PreTrainedTokenizerBase) -> None:
    with running_stack(tokenizer, Options(api_key=KEY)) as stack:
        body = {"prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            r = httpx.post(f"{stack.http}/v1/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key"
        assert httpx.get(f"{stack.http}/v1/models", timeout=30).status_code == 401
        assert httpx.get(f"{stack.http}/health", timeout=30).status_code == 200  # probes need no key
        assert httpx.get(f"{stack.http}/metrics", timeout=30).status_code != 401
        r = httpx.post(f"{stack.http}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        with openai.OpenAI(base_url=f"{stack.http}/v1", api_key=KEY, max_retries=0, timeout=30) as oa:
            assert oa.models.list().data[0].id == "tiny-llama"
        with openai.OpenAI(base_url=f"{stack.http}/v1", api_key="nope", max_retries=0, timeout=30) as oa, \
                pytest.raises(openai.AuthenticationError):
            oa.models.list()

        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]),
                                     parameters=pb.SamplingParameters(max_new_tokens=2))
        with grpc.insecure_channel(stack.grpc) as ch:
            stub = baton_pb2_grpc.RouterStub(ch)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Generate(request, metadata=metadata, timeout=30)
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.GenerateStream(request, metadata=metadata, timeout=30))
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Generate(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30)
            assert len(reply.token_ids) == 2
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key
        with BatonClient(stack.grpc, timeout=30, api_key=KEY) as client:
            assert client.generate("Hello", max_new_tokens=2).completion_tokens == 2
        with BatonClient(stack.grpc, timeout=30) as client, pytest.raises(BatonError) as b:
            client.generate("Hello", max_new_tokens=2)
        assert b.value.code is grpc.StatusCode.UNAUTHENTICATED
        stack.wait_idle()


# ---- the flags, on the real processes ------------------------------------------------------------------------
def test_tls_flags_on_the_services(pki: Pki, tiny_llama_dir: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = ["--model", str(tiny_llama_dir), "--device", "cpu", "--threads", "1"]
    tls = ["--tls-cert", str(pki.files["cert"]), "--tls-key", str(pki.files["key"]), "--tls-ca", str(pki.files["ca"])]
    decode, prefill, router = (f"127.0.0.1:{free_port()}" for _ in range(3))
    with processes(tmp_path) as ps:
        decode_proc = ps.baton("decode", "decode", "--host", "127.0.0.1", "--port", decode.split(":")[1],
                               "--max-batch", "2", *model, *tls)
        for key, path in pki.files.items():  # the prefill worker and the router take them from the environment
            monkeypatch.setenv(f"BATON_TLS_{key.upper()}", str(path))
        prefill_proc = ps.baton("prefill", "prefill", "--host", "127.0.0.1", "--port", prefill.split(":")[1],
                                "--decode", decode, *model)
        for address, proc in ((decode, decode_proc), (prefill, prefill_proc)):
            wait_tls(address, proc, pki.good, tmp_path)
        router_proc = ps.baton("router", "router", "--host", "127.0.0.1", "--grpc-port", router.split(":")[1],
                               "--http-port", "0", "--decode", decode, "--prefill", prefill, "--api-key", KEY, *model)
        wait_serving(router, router_proc, tmp_path / "router.log")  # the public port stays plaintext
        with BatonClient(router, timeout=60, api_key=KEY) as client:
            done = client.generate([5, 6, 7], max_new_tokens=4, ignore_eos=True)
        assert len(done.token_ids) == 4
        health = [sys.executable, "-m", "baton.cli", "health", "--addr", decode]
        assert subprocess.run(health, cwd=ROOT, capture_output=True).returncode == 0  # BATON_TLS_* set
        plain = {k: v for k, v in os.environ.items() if not k.startswith("BATON_TLS_")}
        assert subprocess.run(health, cwd=ROOT, capture_output=True, env=plain).returncode == 1


def wait_tls(address: str, proc: subprocess.Popen[bytes], tls: TlsConfig, logs: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not is_serving(address, 1.0, tls):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{address} not serving over TLS: {list(logs.glob('*.log'))}")
        time.sleep(0.2)


@pytest.fixture(autouse=True)
def _no_inherited_tls(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in ("CERT", "KEY", "CA"):
        monkeypatch.delenv(f"BATON_TLS_{key}", raising=False)
    yield
