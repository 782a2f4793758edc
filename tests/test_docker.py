"""The image and the compose stack on a real Docker engine (marker `docker`; `pytest -m docker` runs it alone).

What users run, run as they run it: scripts/image.sh (what `make image` calls) builds the CPU image from the
wheelhouse with no network inside the build, on stand-in base images made locally (scripts/standin_bases.sh: a
Debian bookworm root file system with Debian's Python and Redis, since no registry is reachable here); then
`docker compose` (v2) starts the topology of docker-compose.yml with docker-compose.cpu.yml, the files users
run, with only image names and published ports set through their environment variables: Redis, the router, a
prefill and two decode workers. It waits for every HEALTHCHECK to say healthy, then checks:
- requests through the router's published ports (the `openai` client over HTTP, and gRPC) give exactly the tokens
  of generate() alone;
- `docker kill` of a decode container mid-stream loses nothing: the router resumes its requests elsewhere;
- `docker stop` of a decode worker holding requests: it finishes them (drains) and exits 0;
- the services run as the unprivileged user of the image;
- the models volume outlives the containers: a second `up` does not convert the model again.

Skipped, with the reason, where there is no engine, no Compose v2, or no way to make the stand-in bases
(scripts/docker_engine.sh provides all three on a Debian machine as root, as in CI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from baton.engine.models import LoadedModel
from tests.support.cluster import check_exact, load, prompts
from tests.support.metrics import Scrape
from tests.support.processes import ROOT, free_port

pytestmark = [pytest.mark.docker, pytest.mark.slow]

IMAGE = "baton-test:cpu"
PYTHON_BASE = "baton-standin/python:bookworm"  # scripts/standin_bases.sh
REDIS_IMAGE = "baton-standin/redis:bookworm"
UID = "10001"  # the image's unprivileged user (deploy/docker/Dockerfile)
STREAMS = 12  # half over gRPC, half through the openai client
NEW_TOKENS = 64
CONVERTING = "converting SmolLM2"  # baton/engine/models.py logs this when it converts the embedded model


def engine() -> Any:
    """The Docker SDK's client, or a skip saying what is missing."""
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as e:
        pytest.skip(f"no Docker engine reachable (DOCKER_HOST={os.environ.get('DOCKER_HOST', 'unset')}: "
                    f"{type(e).__name__}); scripts/docker_engine.sh starts one on Debian as root")
    version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True)
    if version.returncode != 0 or not version.stdout.strip().lstrip("v").startswith("2"):
        pytest.skip("needs Docker Compose v2 (`docker compose`); scripts/docker_engine.sh installs it")
    return client


def ensure_standin_bases(client: Any) -> None:
    """Make the stand-in base images unless they exist (debootstrap needs root)."""
    have = {tag for image in client.images.list() for tag in image.tags}
    if {PYTHON_BASE, REDIS_IMAGE} <= have:
        return
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the stand-in base images need root and debootstrap (scripts/docker_engine.sh installs it)")
    subprocess.run([str(ROOT / "scripts" / "standin_bases.sh")], check=True)


@dataclass
class Stack:
    """The compose project under test, and how to reach it."""

    client: Any  # docker.DockerClient
    compose: list[str]  # `docker compose -p ... -f ... -f ...`
    env: dict[str, str]
    http: str  # the router's published HTTP port, as a base URL
    grpc: str  # the router's published gRPC port, host:port

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.compose, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def up(self) -> None:
        """Start (or complete) the topology and wait until every health check says healthy."""
        done = self.run("up", "-d", "--no-build", "--scale", "decode=2", "--wait", "--wait-timeout", "600")
        assert done.returncode == 0, done.stdout + done.stderr + self.logs(tail=3000)

    def containers(self, service: str | None = None) -> list[Any]:
        labels = [f"com.docker.compose.project={self.compose[self.compose.index('-p') + 1]}"]
        if service:
            labels.append(f"com.docker.compose.service={service}")
        found = self.client.containers.list(all=True, filters={"label": labels})
        return sorted(found, key=lambda c: c.name)

    def logs(self, service: str | None = None, tail: int | None = None) -> str:
        """The containers' logs, each whole or its last `tail` characters."""
        return "\n".join(f"---- {c.name}\n" + c.logs().decode(errors="replace")[-(tail or 0):]
                         for c in self.containers(service))

    def recovered(self) -> int:
        """Requests the router resumed or restarted on another decode worker, from its published /metrics."""
        scrape = Scrape(httpx.get(f"{self.http}/metrics", timeout=10).text)
        return int(sum(scrape.value("baton_router_recoveries_total", kind=k) for k in ("resumed", "restarted")))

    def rows_used(self, container: Any) -> int:
        """Rows in a decode worker's batch, from its /metrics inside the container (worker ports stay private)."""
        code = ("import os, urllib.request; print(urllib.request.urlopen('http://127.0.0.1:%s/metrics' % "
                "os.environ['BATON_METRICS_PORT'], timeout=5).read().decode())")
        out = container.exec_run(["python3", "-c", code]).output.decode()
        assert "baton_decode_batch_rows_used" in out, out[-2000:]
        return int(Scrape(out).value("baton_decode_batch_rows_used"))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    client = engine()
    ensure_standin_bases(client)
    started = time.monotonic()
    build = subprocess.run([str(ROOT / "scripts" / "image.sh")], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "VARIANT": "cpu", "BASE": PYTHON_BASE, "TAG": IMAGE,
                                "PYTHON": sys.executable})
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    print(f"\nimage {IMAGE} built in {time.monotonic() - started:.0f} s: {build.stdout.splitlines()[-1]}")
    taken: set[int] = set()
    http_port, grpc_port = free_port(taken), free_port(taken)
    env = {**os.environ, "BATON_IMAGE": IMAGE, "BATON_REDIS_IMAGE": REDIS_IMAGE,
           "BATON_HTTP_PUBLISH": str(http_port), "BATON_GRPC_PUBLISH": str(grpc_port)}
    compose = ["docker", "compose", "-p", f"baton-test-{os.getpid()}",
               "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.cpu.yml")]
    s = Stack(client, compose, env, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    try:
        s.up()
        yield s
    finally:
        s.run("down", "--volumes", "--timeout", "120")


def test_every_service_is_healthy_and_unprivileged(stack: Stack) -> None:
    services = {c.labels["com.docker.compose.service"]: c for c in stack.containers()}
    assert sorted(services) == ["decode", "prefill", "redis", "router"]
    assert len(stack.containers("decode")) == 2
    for c in stack.containers():
        c.reload()
        assert c.attrs["State"]["Health"]["Status"] == "healthy", c.name
    for name in ("router", "prefill", "decode"):
        for c in stack.containers(name):
            assert c.exec_run(["id", "-u"]).output.decode().strip() == UID, c.name
            assert c.attrs["Config"]["User"].split(":")[0] == UID


def test_outputs_through_the_published_ports_are_exact(stack: Stack, smollm2: LoadedModel) -> None:
    ids = prompts(STREAMS, seed=21)
    outs = asyncio.run(load(stack.http, stack.grpc, NEW_TOKENS, ids, lambda: None, 0))
    check_exact(outs, ids, smollm2, NEW_TOKENS)


def test_a_killed_decode_container_loses_nothing(stack: Stack, smollm2: LoadedModel) -> None:
    ids = prompts(STREAMS, seed=22)
    killed: list[Any] = []

    def kill_the_busier_decode_container() -> None:
        busiest = max(stack.containers("decode"), key=stack.rows_used)
        busiest.kill()  # docker kill: SIGKILL
        killed.append(busiest)

    before = stack.recovered()
    outs = asyncio.run(load(stack.http, stack.grpc, NEW_TOKENS, ids, kill_the_busier_decode_container,
                            STREAMS * NEW_TOKENS // 4))
    assert killed, "the fault was not injected"
    check_exact(outs, ids, smollm2, NEW_TOKENS)
    assert stack.recovered() > before, "no request was on the killed container"
    killed[0].reload()
    assert killed[0].attrs["State"]["ExitCode"] == 137
    # A kill by hand is a stop to Docker's restart policy (a crash is restarted): put the topology back.
    stack.up()


def test_a_stopped_decode_worker_drains_and_exits_0(stack: Stack, smollm2: LoadedModel) -> None:
    ids = prompts(STREAMS, seed=23)
    stopped: list[tuple[Any, int, threading.Thread]] = []

    def stop_a_busy_decode_worker() -> None:
        busy = max(stack.containers("decode"), key=stack.rows_used)
        rows = stack.rows_used(busy)
        # docker stop: SIGTERM, SIGKILL after the grace period; it returns once the container has exited, so off
        # the event loop, which goes on reading the streams
        stopping = threading.Thread(target=busy.stop, kwargs={"timeout": 120})
        stopping.start()
        stopped.append((busy, rows, stopping))

    before = stack.recovered()
    outs = asyncio.run(load(stack.http, stack.grpc, NEW_TOKENS, ids, stop_a_busy_decode_worker,
                            STREAMS * NEW_TOKENS // 4))
    assert stopped, "the stop was not sent"
    container, rows, stopping = stopped[0]
    assert rows > 0, "the stopped worker held no request"
    check_exact(outs, ids, smollm2, NEW_TOKENS)
    stopping.join(timeout=150)
    assert not stopping.is_alive(), "docker stop did not return"
    container.reload()
    assert container.attrs["State"]["Status"] == "exited"
    assert container.attrs["State"]["ExitCode"] == 0, stack.logs("decode", tail=3000)
    assert stack.recovered() == before, "the stopped worker left requests to others instead of finishing them"
    stack.up()


def test_the_models_volume_outlives_the_containers(stack: Stack, smollm2: LoadedModel) -> None:
    assert CONVERTING in stack.logs(), "the first start converted the embedded model into the volume"
    down = stack.run("down", "--timeout", "120")  # containers go, the named volume stays
    assert down.returncode == 0, down.stderr
    assert not stack.containers()
    stack.up()
    assert CONVERTING not in stack.logs(), "the model was converted again"
    ids = prompts(2, seed=24)
    check_exact(asyncio.run(load(stack.http, stack.grpc, NEW_TOKENS, ids, lambda: None, 0)), ids, smollm2,
                NEW_TOKENS)
