"""`baton health`: ask a Baton service's standard gRPC health service whether it is SERVING (exit 0) or not
(exit 1). It is the container HEALTHCHECK: with no --addr it asks this host on the port the service was told to
listen on (BATON_GRPC_PORT for the router, BATON_PORT for workers), else on each service's default port. With
--tls-* (or their BATON_TLS_* twins, as a worker with mutual TLS has) it asks over mutual TLS."""

from __future__ import annotations

import argparse
import asyncio
import os

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.flags import add_tls_arguments
from baton.rpc.server import TlsConfig, channel

DEFAULT_PORTS = (50051, 50061, 50071)  # router gRPC, decode, prefill


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", action="append", help="host:port to ask (repeatable; default: see above)")
    p.add_argument("--timeout-s", type=float, default=3.0, help="seconds to wait for an answer")
    add_tls_arguments(p)


def candidates(addr: list[str] | None) -> list[str]:
    if addr:
        return addr
    ports = [os.environ[k] for k in ("BATON_GRPC_PORT", "BATON_PORT") if os.environ.get(k)]
    return [f"127.0.0.1:{p}" for p in (ports or [str(p) for p in DEFAULT_PORTS])]


async def _check(address: str, timeout_s: float, tls: TlsConfig | None) -> bool:
    async with channel(address, tls) as ch:
        try:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout_s)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def is_serving(address: str, timeout_s: float, tls: TlsConfig | None = None) -> bool:
    return asyncio.run(_check(address, timeout_s, tls))


def main(args: argparse.Namespace) -> int:
    try:
        tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as e:
        print(e)
        return 2
    for address in candidates(args.addr):
        if is_serving(address, args.timeout_s, tls):
            print(f"{address}: SERVING")
            return 0
    print(f"not serving: {', '.join(candidates(args.addr))}")
    return 1
